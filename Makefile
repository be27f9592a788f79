# The two commands of the README's quick start: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q -c constraints.txt
DEMO_OUT ?= demo_out

.PHONY: install demo test gpu-check clean

install:
	$(PIP) -e ".[dev]"

demo: install
	$(PYTHON) -m derestainer demo --out $(DEMO_OUT)

test: install
	$(PYTHON) -m pytest -q

# On a machine with a CUDA GPU: tests on CUDA, then train/infer benchmarks (JSON into $$OUT or ./gpu_out).
gpu-check: install
	bash scripts/gpu_check.sh

clean:
	rm -rf $(DEMO_OUT) build .pytest_cache

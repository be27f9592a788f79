#!/usr/bin/env bash
# GPU evidence in one run (< 8 minutes on one H100/H200): the tests marked `gpu` (bf16 training
# steps, fast-path tolerances, torch.compile) on CUDA, DDP with NCCL when there are two or more
# GPUs, `derestainer bench` for train and infer at 512 px, plain eager fp32 vs the optimised path,
# for DeReStainer, pix2pix and PyramidPix2Pix, then the rest of the test suite with the time left
# (BUDGET_S, default 460 s, bounds the whole run).
#
#   bash scripts/gpu_check.sh                      # on the GPU machine; results in $OUT (default ./gpu_out)
#   bash scripts/gpu_check.sh --device cpu --quick # smoke run of the same steps on CPU, tiny sizes (a test runs this)
#
# Writes into $OUT: env.txt, pytest_gpu.txt, pytest_suite.txt, ddp.txt, bench_<model>_<mode>.json
# (+ .txt), summary.md (the rows for docs/performance.md) and status.txt (one line per step: ok/FAILED/skipped).
# Every step has its own time limit; a failed step is recorded and the script goes on, and exits 1 at the end.
set -uo pipefail

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (use --device cpu|cuda, --quick)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
# Use the checkout's sources even where the package is not installed (the device machine is offline).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STATUS="$OUT/status.txt"
: > "$STATUS"
FAILED=0
T0=$(date +%s)
BUDGET_S="${BUDGET_S:-460}"  # the whole run stays under 8 minutes: each step gets at most what is left

step() {  # step NAME LIMIT_S LOGFILE CMD...
  local name="$1" limit="$2" log="$3"; shift 3
  local t=$(date +%s)
  local left=$(( BUDGET_S - (t - T0) ))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped (time budget spent)" >> "$STATUS"; FAILED=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" >&2
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  if [ $rc -eq 0 ]; then
    echo "$name: ok (${dt}s)" >> "$STATUS"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "$name: FAILED (timeout after ${dt}s)" >> "$STATUS"; FAILED=1
  else
    echo "$name: FAILED (exit $rc, ${dt}s; see $(basename "$log"))" >> "$STATUS"; FAILED=1
  fi
  tail -n 3 "$log" >&2
}

# ------------------------------------------------------------------ environment
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'gpus', torch.cuda.device_count()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >&2

if [ "$DEVICE" != "cpu" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "CUDA is not available here; run with --device cpu --quick for a smoke run" | tee -a "$STATUS" >&2
  exit 1
fi

# ------------------------------------------------------------------ tests (gpu-marked)
if [ "$QUICK" = 0 ]; then TESTS=(tests); else TESTS=(tests/test_fastpath.py tests/test_bench.py); fi
step "pytest (gpu-marked)" 150 "$OUT/pytest_gpu.txt" "$PY" -m pytest -q -m gpu -p no:cacheprovider "${TESTS[@]}"

# ------------------------------------------------------------------ DDP with NCCL (needs 2 GPUs)
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$DEVICE" != "cpu" ] && [ "$NGPU" -ge 2 ]; then
  DDP_DATA="$OUT/ddp_data"
  "$PY" -m derestainer synth --out "$DDP_DATA" --train 16 --test 4 --size 128 > /dev/null 2>&1
  step "DDP NCCL (2 ranks)" 90 "$OUT/ddp.txt" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m derestainer train --config tiny --data "$DDP_DATA" --out "$OUT/ddp_run" \
    --set data.size=128 --set train.steps=20 --set train.batch_size=4 --set train.tensorboard=off --set train.device=cuda
else
  echo "DDP NCCL: skipped ($NGPU GPU(s); NCCL needs one GPU per rank)" >> "$STATUS"
fi

# ------------------------------------------------------------------ benchmarks
if [ "$QUICK" = 1 ]; then
  SIZE=32; BASE=(--base tiny); IB=2; TB=2; ITERS=(--warmup 1 --iters 1)
else
  SIZE=512; BASE=(); IB=8; TB=4; ITERS=(--warmup 3 --iters 10)
fi
for model in derestainer pix2pix pyramidpix2pix; do
  for mode in infer train; do
    if [ "$mode" = infer ]; then B=$IB; EXTRA=(); else B=$TB; EXTRA=(--loader both --workers 4); fi
    [ "$QUICK" = 1 ] && [ "$mode" = train ] && EXTRA=(--loader both --workers 0)
    json="$OUT/bench_${model}_${mode}.json"
    step "bench $model $mode ${SIZE}px" 90 "$OUT/bench_${model}_${mode}.txt" \
      "$PY" -m derestainer bench --model "$model" "${BASE[@]}" --size "$SIZE" --batch "$B" --mode "$mode" \
      --device "$DEVICE" --compare "${ITERS[@]}" "${EXTRA[@]}" --json "$json"
  done
done

# ------------------------------------------------------------------ the rest of the suite, with the time left
if [ "$QUICK" = 0 ]; then
  step "pytest (whole suite, not gpu)" 400 "$OUT/pytest_suite.txt" "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider tests
else
  echo "pytest (whole suite): skipped (--quick)" >> "$STATUS"
fi

"$PY" - "$OUT" > "$OUT/summary.md" 2>>"$OUT/summary_errors.txt" <<'EOF'
import sys
from pathlib import Path
from derestainer.speed import summary_table
print(summary_table(sorted(Path(sys.argv[1]).glob("bench_*.json"))))
EOF
[ $? -eq 0 ] || { echo "summary: FAILED" >> "$STATUS"; FAILED=1; }

echo "total: $(( $(date +%s) - T0 ))s" >> "$STATUS"
cat "$STATUS" >&2
exit $FAILED

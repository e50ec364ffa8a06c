#!/usr/bin/env bash
# The GPU check of the fused norms (issue 14), in one run of under 5 minutes on one H100/H200 with torch and
# triton preinstalled: from the source tree (PYTHONPATH=.), nothing installed, no network.
#   1. environment: GPU, Python, torch, triton, liger-kernel (optional)
#   2. the kernel tests on CUDA (not the interpreter: the GPU's fp32 sqrt/div re-validate the tolerances),
#      in parallel with pytest-xdist when it is there
#   3. the quick benchmark (widths 1024/4096/16384, bf16 and fp32, eager / torch.compile / Liger columns, engine
#      rows), which writes the norm-kernels section of BENCHMARKS.md
# Logs and BENCHMARKS.md are copied to $OUT when it is set. Exit status: non-zero if any step failed (all run).
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run]
#   --dry-run: on CPU, every step but the CUDA timing: step 2 collects the kernel tests and runs one of them in the
#   Triton interpreter, step 3 runs the benchmark with --dry-run into a temporary file. $PYTHON picks the
#   interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
LOGS="$(mktemp -d)"
TESTS=(tests/test_kernels.py tests/test_kernel_orders.py tests/test_kernel_integration.py)
STATUS=0
step() { echo; echo "== gpu_check step $1: $2 ($(date +%T))"; }
fail() { echo "== gpu_check: step $1 FAILED"; STATUS=1; }

step 1 "environment"
if [ "$DRY" = 1 ]; then
  echo "dry run on CPU: no GPU is used"
  export TRITON_INTERPRET=1
else
  nvidia-smi -L || fail 1
fi
"$PY" - <<'EOF' || fail 1
import importlib.util, platform
import torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")
print("cuda:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("liger-kernel:", "importable" if importlib.util.find_spec("liger_kernel") else "not installed")
EOF
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check needs a CUDA GPU (use --dry-run on CPU)"; exit 2
fi

step 2 "kernel tests"
if [ "$DRY" = 1 ]; then
  "$PY" -m pytest -q -p no:cacheprovider --collect-only "${TESTS[@]}" > "$LOGS/tests.log" 2>&1 || fail 2
  tail -n 1 "$LOGS/tests.log"
  "$PY" -m pytest -q -p no:cacheprovider "tests/test_kernels.py::test_gradcheck_and_gradgradcheck[7-rms-True]" \
    >> "$LOGS/tests.log" 2>&1 || fail 2
  tail -n 1 "$LOGS/tests.log"
else
  PARALLEL=()
  "$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
  timeout 200 "$PY" -m pytest -q -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} "${TESTS[@]}" 2>&1 | tee "$LOGS/tests.log" \
    | tail -n 25 || fail 2
fi

step 3 "quick benchmark"
if [ "$DRY" = 1 ]; then
  BENCH_OUT="$LOGS/BENCHMARKS.md"
  "$PY" benchmarks/norm_kernels.py --quick --dry-run --out "$BENCH_OUT" > "$LOGS/bench.log" 2>&1 || fail 3
else
  BENCH_OUT="BENCHMARKS.md"
  timeout 270 "$PY" benchmarks/norm_kernels.py --quick --out "$BENCH_OUT" 2>&1 | tee "$LOGS/bench.log" || fail 3
fi
grep -q "<!-- norm-kernels:end -->" "$BENCH_OUT" && echo "norm-kernels section written to $BENCH_OUT" || fail 3

if [ -n "${OUT:-}" ]; then
  cp "$LOGS"/*.log "$BENCH_OUT" "$OUT"/ 2>/dev/null
fi
echo
echo "== gpu_check done ($(date +%T)): $([ $STATUS = 0 ] && echo all steps passed || echo FAILED); logs in $LOGS"
exit $STATUS

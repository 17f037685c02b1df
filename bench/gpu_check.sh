#!/usr/bin/env bash
# The one command to run on a GPU machine: build for the local GPU, run the GPU tests,
# run the GPU microbenchmarks, and write logs and the table into OUTDIR.
#
#   bash bench/gpu_check.sh [OUTDIR]        (default bench/results/gpu/)
#
# Works with the machine's own Python and torch (no venv, nothing downloaded): the
# extension is built in place and the packages are used from this tree via PYTHONPATH.
# Each step has its own time limit so a hang cannot eat the whole lease; the summary
# (card, build, tests, table) is printed last and saved as OUTDIR/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export ASTRA_CUDA_ARCHS=${ASTRA_CUDA_ARCHS:-90}
BUILD_LIMIT=${BUILD_LIMIT:-240}
TEST_LIMIT=${TEST_LIMIT:-180}
BENCH_LIMIT=${BENCH_LIMIT:-200}
t0=$SECONDS

card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
{
  echo "card: ${card:-none}"
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
} | tee "$OUT/info.txt"

echo "== build (sm_${ASTRA_CUDA_ARCHS}, $MAX_JOBS jobs)"
bstart=$SECONDS
timeout "$BUILD_LIMIT" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
build_s=$((SECONDS - bstart))
echo "build rc=$build_rc in ${build_s}s" | tee -a "$OUT/info.txt"
[ $build_rc -ne 0 ] && tail -40 "$OUT/build.log"
$PY -m astra.cli info >> "$OUT/info.txt" 2>&1

echo "== GPU tests"
per_test=""
$PY -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=120"
timeout "$TEST_LIMIT" $PY -m pytest -q -p no:cacheprovider $per_test \
  tests/test_ops.py tests/test_triton.py tests/test_cuda.py tests/test_runner_gpu.py \
  > "$OUT/tests.log" 2>&1
test_rc=$?
tail -25 "$OUT/tests.log"

echo "== GPU microbenchmarks"
timeout "$BENCH_LIMIT" $PY -m astra.cli bench kernels --device cuda --json "$OUT/kernels.json" \
  > "$OUT/kernels.txt" 2> "$OUT/bench_err.log"
bench_rc=$?

{
  echo "==================== Astra GPU check: ${card:-no GPU}"
  cat "$OUT/info.txt"
  echo "tests rc=$test_rc: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
  echo "bench rc=$bench_rc"
  cat "$OUT/kernels.txt"
  [ $bench_rc -ne 0 ] && tail -20 "$OUT/bench_err.log"
  echo "total $((SECONDS - t0)) s"
} | tee "$OUT/summary.txt"

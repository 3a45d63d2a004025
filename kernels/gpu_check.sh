#!/usr/bin/env bash
# One device call: GPU property tests, benchmark, numerics study. Logs and results to $OUT.
# usage: bash kernels/gpu_check.sh [tests|bench|numerics ...]   (default: all three)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
steps=${*:-tests bench numerics}
for s in $steps; do
  case $s in
    tests)
      echo "== GPU property tests"
      HYPOTHESIS_PROFILE=gpu timeout ${TEST_TIMEOUT:-330} python3 -m pytest property_tests/test_kernels*.py -q -p no:cacheprovider \
        -n 12 --tb=short -rf 2>&1 | grep -v -e PytestBenchmarkWarning -e "warner(" > "$OUT/tests.log"; tail -25 "$OUT/tests.log" ;;
    bench)
      echo "== benchmark"
      timeout ${BENCH_TIMEOUT:-200} python3 -m kernels.bench --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" ;;
    numerics)
      echo "== numerics"
      timeout ${NUM_TIMEOUT:-150} python3 -m kernels.numerics --out "$OUT" 2>&1 | tee "$OUT/numerics.log" | tail -5 ;;
  esac
done

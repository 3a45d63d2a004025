#!/usr/bin/env bash
# One device call: GPU property tests, benchmark, numerics study. Logs and results to $OUT.
# usage: bash kernels/gpu_check.sh [tests|bench|train|numerics|cp ...]   (default: tests bench numerics)
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
      HYPOTHESIS_PROFILE=gpu timeout ${TEST_TIMEOUT:-450} python3 -m pytest property_tests/test_kernels*.py -q -p no:cacheprovider \
        -n 12 --tb=short -rf -o addopts="" 2>&1 | grep -v -e PytestBenchmarkWarning -e "warner(" > "$OUT/tests.log"; tail -25 "$OUT/tests.log" ;;
    bench)
      echo "== benchmark"
      timeout ${BENCH_TIMEOUT:-200} python3 -m kernels.bench --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" ;;
    train)
      # the whole training grid in one call (fla autotunes once per head size, ~140 s each)
      echo "== training grid (forward+backward)"
      timeout ${TRAIN_TIMEOUT:-580} python3 -m kernels.bench --train --out "$OUT" 2>&1 | tee "$OUT/train.log" | tail -30 ;;
    cp)
      echo "== context parallel: float64 equality on 2 and 4 GPUs (NCCL), then the scaling benchmark"
      # a fresh machine compiles every float64 kernel first: 200 s did not cover both world sizes
      timeout ${CP_TEST_TIMEOUT:-420} python3 -m pytest property_tests/test_cp.py -o addopts="" -q -p no:cacheprovider -k gpu \
        --tb=short -rf 2>&1 | tail -20 | tee "$OUT/cp_tests.log"
      timeout ${CP_BENCH_TIMEOUT:-420} python3 -m kernels.bench_cp --out "$OUT" ${CP_ARGS:-} 2>&1 | tee "$OUT/bench_cp.log" ;;
    numerics)
      echo "== numerics"
      timeout ${NUM_TIMEOUT:-150} python3 -m kernels.numerics --out "$OUT" 2>&1 | tee "$OUT/numerics.log" | tail -5 ;;
  esac
done

#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (the device tool): builds mmcl_fast against the torch that
# is already there (CPU + CUDA kernels for the local card), runs the whole test suite on the GPU,
# then the benchmark files given as arguments (default: all), and prints the table of medians.
# Logs and the benchmark JSON go to ${OUT:-/tmp/mmcl_fast_device}.
#   bash scripts/device_check.sh [benchmarks/bench_x.py ...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/mmcl_fast_device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
t0=$SECONDS
cap=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "torch $("$py" -c 'import torch; print(torch.__version__)'), triton $("$py" -c 'import triton; print(triton.__version__)'), capability $cap"
TORCH_CUDA_ARCH_LIST=$cap MAX_JOBS=$(nproc) MMCL_FAST_FORCE_CUDA=1 \
  "$py" -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "== built in $((SECONDS - t0)) s"
PYTHONSAFEPATH=1 "$py" -m pytest tests -q -ra -p no:cacheprovider --benchmark-disable ${MMCL_FAST_TEST_ARGS:-} 2>&1 | tee "$out/tests.log" | tail -25
echo "== tests done at $((SECONDS - t0)) s"
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(benchmarks)
PYTHONSAFEPATH=1 "$py" -m pytest "${benches[@]}" -q -p no:cacheprovider --benchmark-only \
  --benchmark-json="$out/bench.json" > "$out/bench.log" 2>&1 || tail -30 "$out/bench.log"
echo "== benchmarks done at $((SECONDS - t0)) s"
"$py" benchmarks/report.py "$out/bench.json"

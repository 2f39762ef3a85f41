#!/usr/bin/env bash
# The main job, for now: install (scripts/setup_env.sh), then the benchmark comparison of op families
# A and B against the PyTorch way, printed as a table of medians, ratios, GB/s and peak memory.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
venv=$(realpath -m "${MMCL_FAST_VENV:-.venv}")
out=${MMCL_FAST_BENCH_JSON:-bench-main.json}
"$venv/bin/python" -m pytest benchmarks/bench_modality_step.py benchmarks/bench_shared_key_attention.py --benchmark-only \
  --benchmark-json="$out" -p no:cacheprovider -q "$@"
"$venv/bin/python" benchmarks/report.py "$out"

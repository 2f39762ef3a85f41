#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup_env.sh), then runs the whole suite with
# the Triton kernels on the CPU interpreter, and checks that the install compiled mmcl_fast._C.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
venv=$(realpath -m "${MMCL_FAST_VENV:-.venv}")
# PYTHONSAFEPATH (Python >= 3.11): the checkout's root stays off sys.path, or its kernels/ folder
# (installed as mmcl_fast.kernels) would shadow the PyPI package `kernels` that transformers >= 5.25
# imports
PYTHONSAFEPATH=1 TRITON_INTERPRET=1 MMCL_FAST_EXPECT_EXTENSION=1 "$venv/bin/python" -m pytest tests -q -ra "$@"
# the benchmark files still run (each competitor once, at a small size, untimed)
MMCL_FAST_BENCH_SMALL=1 PYTHONSAFEPATH=1 "$venv/bin/python" -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider

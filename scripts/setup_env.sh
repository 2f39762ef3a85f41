#!/usr/bin/env bash
# Creates (or reuses) the virtual environment ${MMCL_FAST_VENV:-.venv} and installs mmcl_fast into it
# in editable mode with its test extras, compiling mmcl_fast._C. Torch: the CPU build 2.13.0 by
# default (MMCL_FAST_TORCH overrides, e.g. "torch==2.14.1" for the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${MMCL_FAST_VENV:-.venv}")
torch_req=${MMCL_FAST_TORCH:-torch==2.13.0}
py=${PYTHON:-python3}
t0=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade "setuptools>=70" wheel ninja
"$venv/bin/python" -m pip install -q "$torch_req"
echo "setup_env: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') ready after $((SECONDS - t0)) s" >&2
# --no-build-isolation: the build must use this torch, not fetch its own
MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" -m pip install -q --no-build-isolation -e ".[test]"
echo "setup_env: mmcl_fast installed (extension compiled) after $((SECONDS - t0)) s" >&2

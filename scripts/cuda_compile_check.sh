#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU needed): an environment with the CUDA build of torch
# (2.14.1, cu130) and mmcl_fast installed with MMCL_FAST_FORCE_CUDA=1 for sm_80 and sm_90, then a
# check that every op of csrc/mmcl_fast.cpp has a CPU and a CUDA kernel registered, and that the
# wheel's layout is right (mmcl_fast.kernels inside the package, no top-level `kernels`).
# MMCL_FAST_CUDA_CHECK_REUSE=1 takes the environment ${MMCL_FAST_CUDA_VENV} as it is when it
# already holds a CUDA build (CI: the one scripts/test.sh made, with MMCL_FAST_FORCE_CUDA=1), so
# nothing is compiled twice; otherwise a regular (non-editable) forced-CUDA install is made.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${MMCL_FAST_CUDA_VENV:-.venv-cuda}")  # absolute: the check below runs from /tmp
. scripts/cuda_env.sh
if [ -z "$nvcc_bin" ]; then
  echo "cuda_compile_check: SKIPPED - nvcc is absent on this machine, the CUDA sources were not compiled"
  exit 0
fi
t0=$SECONDS
has_cuda_build() {
  "$venv/bin/python" -c 'import sys, torch, mmcl_fast._C; sys.exit(not torch._C._dispatch_has_kernel_for_dispatch_key("mmcl_fast::modality_adamw_", "CUDA"))' 2>/dev/null
}
if [ "${MMCL_FAST_CUDA_CHECK_REUSE:-0}" = 1 ] && [ -x "$venv/bin/python" ] && has_cuda_build; then
  echo "cuda_compile_check: reusing the CUDA build in $venv"
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade "setuptools>=70" wheel ninja numpy
  "$venv/bin/python" -m pip install -q "torch==2.14.1"
  echo "cuda_compile_check: $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'), $("$nvcc_bin" --version | tail -1), after $((SECONDS - t0)) s"
  cuda_env_export
  MMCL_FAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} \
    "$venv/bin/python" -m pip install --no-build-isolation --no-deps --force-reinstall . 2>&1 | tail -n 5
  echo "cuda_compile_check: compiled after $((SECONDS - t0)) s"
fi
schema="$PWD/csrc/mmcl_fast.cpp"
(cd /tmp && MMCL_SCHEMA="$schema" "$venv/bin/python" - <<'PY'
import importlib, os, re, torch
import mmcl_fast
importlib.import_module("mmcl_fast._C")
ops = sorted(set(re.findall(r'm\.def\(\s*"(\w+)\(', open(os.environ["MMCL_SCHEMA"]).read())))
assert ops, "no op found in csrc/mmcl_fast.cpp"
missing = [f"{op}/{key}" for op in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mmcl_fast::{op}", key)]
assert not missing, f"ops without a kernel: {missing}"
print("cuda_compile_check: CPU and CUDA kernels registered for", ", ".join(ops))
print("cuda_compile_check: _C at", mmcl_fast._C.__file__)
PY
)
# the wheel's layout, from a pure-Python wheel (MMCL_FAST_NO_EXT=1: nothing compiled again)
whl_dir=$(mktemp -d)
MMCL_FAST_NO_EXT=1 "$venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$whl_dir" . > /dev/null
"$venv/bin/python" - "$whl_dir"/*.whl <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("mmcl_fast/kernels/") for n in names), "mmcl_fast/kernels missing from the wheel"
for sub in ("nn", "ops", "optim", "continual", "methods", "data"):
    assert any(n.startswith(f"mmcl_fast/{sub}/") for n in names), f"mmcl_fast/{sub} missing from the wheel"
assert not any(n.startswith("kernels/") for n in names), "a top-level 'kernels' package is in the wheel"
print("cuda_compile_check: wheel layout ok:", sorted({n.split("/")[0] + "/" + n.split("/")[1] for n in names if n.count("/") > 1 and n.startswith("mmcl_fast/")}))
PY
rm -rf "$whl_dir"

echo "cuda_compile_check: done after $((SECONDS - t0)) s"

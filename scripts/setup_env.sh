#!/usr/bin/env bash
# Creates (or reuses) the virtual environment ${MMCL_FAST_VENV:-.venv} and installs mmcl_fast into it
# in editable mode with its test and integration extras, compiling mmcl_fast._C.
# Torch: ${MMCL_FAST_TORCH:-torch==2.14.1} with ${MMCL_FAST_TORCHVISION:-torchvision==0.29.1}: the
# pair that timm and transformers (the drop-in tests) need; it runs on the CPU too. With
# MMCL_FAST_TORCH="torch==2.13.0" MMCL_FAST_TORCHVISION="" you get the small CPU build instead
# (the timm/transformers tests then skip).
# When nvcc is found, the CUDA toolkit is set up for the build (CUDA_HOME, the cu13 headers of the
# torch wheel on CPATH); the CUDA kernels are then compiled too (MMCL_FAST_FORCE_CUDA=1 insists).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(realpath -m "${MMCL_FAST_VENV:-.venv}")
torch_req=${MMCL_FAST_TORCH:-torch==2.14.1}
vision_req=${MMCL_FAST_TORCHVISION-torchvision==0.29.1}
py=${PYTHON:-python3}
t0=$SECONDS
# Debian packages the data needs: the emoji font the countries KG draws its flags with, and ISO 639
# language names (iso-codes). Installed when missing and we are root (CI); otherwise say so.
apt_missing=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || apt_missing+=(fonts-noto-color-emoji)
[ -f /usr/share/iso-codes/json/iso_639-3.json ] || apt_missing+=(iso-codes)
# WordNet 3.0 (MSPT's offline data set); the sense index is the corpus's index.sense
[ -f /usr/share/wordnet/data.noun ] || apt_missing+=(wordnet-base)
[ -f /usr/share/wordnet/index.sense ] || apt_missing+=(wordnet-sense-index)
if [ ${#apt_missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get install -y -q "${apt_missing[@]}" > /dev/null || { apt-get update -q > /dev/null && apt-get install -y -q "${apt_missing[@]}" > /dev/null; }
    echo "setup_env: installed ${apt_missing[*]} after $((SECONDS - t0)) s" >&2
  else
    echo "setup_env: missing Debian packages ${apt_missing[*]} (sudo apt-get install ${apt_missing[*]}): the countries KG's flags need the first" >&2
  fi
fi
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
# setuptools_scm<9: seqeval (MSPT's NER metric) is an sdist whose setup_requires would otherwise
# fetch setuptools_scm 10, which fails without vcs_versioning
"$venv/bin/python" -m pip install -q --upgrade "setuptools>=70" wheel ninja "setuptools_scm<9"
# torch (and the torchvision built for it) first and pinned together, so that installing timm
# below cannot swap torch for another build
"$venv/bin/python" -m pip install -q "$torch_req" $vision_req
echo "setup_env: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') ready after $((SECONDS - t0)) s" >&2
extras="test,run"
[ -n "$vision_req" ] && extras="test,run,integrations"
. scripts/cuda_env.sh
if [ -n "$nvcc_bin" ] && "$venv/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  cuda_env_export
  echo "setup_env: nvcc found ($("$nvcc_bin" --version | tail -1)): the CUDA kernels are compiled too" >&2
fi
# --no-build-isolation: the build must use this torch, not fetch its own. Pinning torch again keeps
# pip from replacing it while it resolves the extras.
MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" -m pip install -q --no-build-isolation -e ".[$extras]" "$torch_req" $vision_req
echo "setup_env: mmcl_fast installed (extension compiled) after $((SECONDS - t0)) s" >&2

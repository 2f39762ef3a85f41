# Sourced by setup_env.sh and cuda_compile_check.sh (with $venv set). Sets nvcc_bin (empty when
# there is no nvcc) and defines cuda_env_export, which makes torch's CUDAExtension build with it.
nvcc_bin=$(command -v nvcc || true)
if [ -z "$nvcc_bin" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc_bin=/usr/local/cuda/bin/nvcc; fi

cuda_env_export() {
  export PATH="$(dirname "$nvcc_bin"):$PATH"
  # /usr/local/bin/nvcc may be a wrapper script: torch would then take CUDA_HOME=/usr/local and
  # find no libcudart to link. Point it at the real toolkit.
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  # CUDA headers nvcc's toolkit may lack (cusparse.h ...) ship in torch's cu13 wheels
  local inc
  inc=$("$venv/bin/python" -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null || true)
  if [ -n "$inc" ] && [ -d "$inc" ]; then export CPATH="$inc${CPATH:+:$CPATH}"; fi
}

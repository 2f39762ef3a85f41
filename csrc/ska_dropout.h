// Dropout on P in op family B (ska_forward / ska_backward): what the CPU and CUDA ops share on the
// host. The spec is dropout_keep in mmcl_fast/ops/shared_key_attention.py:
//     (x0, x1, x2, x3) = Philox4x32-10(counter (j >> 2, i, b H + h, kDropoutTag), key (seed lo, hi))
//     keep_ij = (x_(j & 3) >> 8) >= thr,  thr = ceil(p 2^24),  Z_ij = keep_ij / (1 - p)
// thr is computed in double by every backend (Python, C++, CUDA host), so a given p drops the same
// keys everywhere.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

namespace mmcl_fast {

constexpr uint32_t kDropoutTag = 0x64726F70u;  // "drop": counter word c3, apart from family A's noise

// dropout_p in [0, 1); with p > 0 a seed: int64, one element, on q's device (the kernels read it
// there, so a CUDA step needs no host sync). Called before any output is allocated.
inline void check_ska_dropout(double dropout_p, const std::optional<at::Tensor>& seed,
                              const at::Tensor& q) {
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0,
              "mmcl_fast: ska: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK(seed.has_value(), "mmcl_fast: ska: dropout_seed is required when dropout_p > 0");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "mmcl_fast: ska: dropout_seed must be an int64 tensor with one element, got ",
              seed->scalar_type(), " ", seed->sizes());
  TORCH_CHECK(seed->device() == q.device(), "mmcl_fast: ska: dropout_seed must be on ", q.device(),
              ", got ", seed->device());
}

inline uint32_t ska_dropout_threshold(double dropout_p) {
  return static_cast<uint32_t>(std::min(std::ceil(dropout_p * 16777216.0), 16777216.0));
}

}  // namespace mmcl_fast

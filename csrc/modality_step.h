// Op family A, the element-wise maths shared by the CPU and CUDA kernels (DESIGN.md section 4.2).
//
// For a tensor p of a group whose modality has coefficient k (k = 1 when the group has none) and
// noise scale sigma (the unbiased std of the UNSCALED gradient, 0 when noise is off):
//     g' = k*g + sigma*eps + 2*lambda*w*(p - anchor)           (anchor part: first A elements only)
// then the optimizer's own update with g' in place of g, exactly as torch.optim does it:
//   AdamW: p *= 1 - lr*wd;  m += (1-b1)(g' - m);  v = b2 v + (1-b2) g'^2;  vmax = max(vmax, v)
//          p -= lr/(1 - b1^t) * m / (sqrt(v or vmax)/sqrt(1 - b2^t) + eps)
//   SGD:   d = g' + wd*p;  buf = first ? d : mom*buf + (1-damp)*d;  d = nesterov ? d + mom*buf : buf
//          p -= lr*d
// The anchor covers the first A elements of p (the old rows of an embedding table, or all of it);
// its weight has 1 (scalar), R (one per row) or A (one per element) entries, and element e uses
// weight index e / (A / numel(w)), which is the right index in all three cases.
// The CUDA kernels and the CPU SGD loop call the functions below; the CPU AdamW loop
// (csrc/cpu/modality_step.cpp, adamw_chunk) restates adamw_element with its constants hoisted
// into locals, which the compiler needs to vectorise it.
//
// The row-sparse step (modality_adamw_rows_) applies the same AdamW update to the listed rows of
// one parameter only; check_rows_args below is its host-side argument check, shared by the CPU
// and CUDA kernels so that both refuse the same inputs with the same words.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "philox.h"

namespace mmcl_fast {

// Hyper-parameters are kept in double so that float64 parameters get a float64 update; kernels
// convert them once to their compute type T.
struct AdamWScalars {
  double lr, beta1, beta2, eps, weight_decay;
  double step_size;              // lr / (1 - beta1^t)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

template <bool AMSGRAD, typename T>
MMCL_HD T adamw_element(T p, T g, T& m, T& v, T& vmax, const AdamWScalars& s) {
  p = p * (T(1) - T(s.lr) * T(s.weight_decay));
  m = m + (T(1) - T(s.beta1)) * (g - m);
  v = T(s.beta2) * v + (T(1) - T(s.beta2)) * g * g;
  T vv = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    vv = vmax;
  }
#if defined(__CUDACC__)
  const T denom = ::sqrt(vv) / T(s.bias_correction2_sqrt) + T(s.eps);
#else
  const T denom = std::sqrt(vv) / T(s.bias_correction2_sqrt) + T(s.eps);
#endif
  return p - T(s.step_size) * m / denom;
}

struct SGDScalars {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
};

template <bool MOMENTUM, typename T>
MMCL_HD T sgd_element(T p, T g, T& buf, bool first, const SGDScalars& s) {
  T d = g + T(s.weight_decay) * p;
  if (MOMENTUM) {
    const T b = first ? d : T(s.momentum) * buf + (T(1) - T(s.dampening)) * d;
    buf = b;
    d = s.nesterov ? d + T(s.momentum) * b : b;
  }
  return p - T(s.lr) * d;
}

// How the anchor weight of the row-sparse step is laid out: scalar and per-row weights are constant
// along a row, so the kernels fold them into lambda once per row.
enum RowsWeight : int { kNoWeight = 0, kScalarWeight = 1, kRowWeight = 2, kElementWeight = 3 };

struct RowsGeometry {
  int64_t num_rows;     // U, the listed rows
  int64_t table_rows;   // N
  int64_t row_size;     // R = numel / N
  int64_t anchor_rows;  // n_a; 0 when the anchor term is off
  int weight_kind;      // RowsWeight
};

// Every check the kernels rely on, before anything is written. Row ids themselves (range,
// distinctness) are data: the CPU kernel checks the range in a pass of its own, the CUDA kernel
// asserts it, and the Python side checks both when value checks are on.
inline RowsGeometry check_rows_args(const at::Tensor& param, const at::Tensor& rows,
                                    const at::Tensor& grad_rows, const at::Tensor& exp_avg,
                                    const at::Tensor& exp_avg_sq, double step,
                                    const std::optional<at::Tensor>& anchor,
                                    const std::optional<at::Tensor>& anchor_weight,
                                    double anchor_lambda) {
  const auto device = param.device();
  TORCH_CHECK(param.dim() >= 1, "mmcl_fast: param must have a row dimension, got a 0-d tensor");
  TORCH_CHECK(param.is_contiguous(), "mmcl_fast: param must be contiguous");
  RowsGeometry geo{rows.numel(), param.size(0), 0, 0, kNoWeight};
  geo.row_size = geo.table_rows > 0 ? param.numel() / geo.table_rows : 0;
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous() &&
                  rows.device() == device,
              "mmcl_fast: rows must be a contiguous 1-D int64 tensor on ", device);
  TORCH_CHECK(grad_rows.scalar_type() == param.scalar_type() && grad_rows.is_contiguous() &&
                  grad_rows.device() == device && grad_rows.dim() == param.dim() &&
                  grad_rows.size(0) == geo.num_rows &&
                  grad_rows.numel() == geo.num_rows * geo.row_size,
              "mmcl_fast: grad_rows must be a contiguous [U, row shape] tensor of param's dtype "
              "and device, U = rows.numel() = ", geo.num_rows);
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->sizes() == param.sizes() && t->scalar_type() == param.scalar_type() &&
                    t->is_contiguous() && t->device() == device,
                "mmcl_fast: ", t == &exp_avg ? "exp_avg" : "exp_avg_sq",
                " must be a contiguous tensor of param's shape, dtype and device");
  }
  TORCH_CHECK(step >= 1.0, "mmcl_fast: step must be a count >= 1 (the count after this step), got ",
              step);
  if (!anchor.has_value() || anchor_lambda == 0.0) return geo;
  const at::Tensor& a = *anchor;
  TORCH_CHECK(a.scalar_type() == param.scalar_type() && a.is_contiguous() && a.device() == device &&
                  a.dim() == param.dim() && a.size(0) <= geo.table_rows &&
                  a.numel() == a.size(0) * geo.row_size,
              "mmcl_fast: anchor must be a contiguous tensor of param's dtype and device holding "
              "its first rows");
  geo.anchor_rows = a.size(0);
  if (!anchor_weight.has_value()) return geo;
  const at::Tensor& w = *anchor_weight;
  TORCH_CHECK(w.scalar_type() == param.scalar_type() && w.is_contiguous() && w.device() == device,
              "mmcl_fast: anchor_weight must be a contiguous tensor of param's dtype and device");
  const int64_t nw = w.numel();
  // an ambiguous count (n_a = 1, or R = 1) means the same weights whichever kind is taken
  if (nw == a.numel() && nw > 0)
    geo.weight_kind = kElementWeight;
  else if (nw == geo.anchor_rows && nw > 0)
    geo.weight_kind = kRowWeight;
  else if (nw == 1)
    geo.weight_kind = kScalarWeight;
  else
    TORCH_CHECK(false, "mmcl_fast: anchor_weight must hold 1, n_a = ", geo.anchor_rows,
                " (per row) or n_a * R = ", a.numel(), " (per element) values, got ", nw);
  return geo;
}

}  // namespace mmcl_fast

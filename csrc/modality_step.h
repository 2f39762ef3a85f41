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
#pragma once
#include <cmath>

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

}  // namespace mmcl_fast

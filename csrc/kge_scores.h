// Knowledge-graph triple scores (kge_scores), the element-wise maths shared by the CPU and CUDA
// kernels: the per-element term of each score and its gradient. E is the element type: T on a
// GPU and in the CPU's scalar tails, vec_t<T> (kW<T> lanes of GCC vector extensions) in the CPU's
// vector loops; the same expressions serve both. The scores (x the head-side row, r the relation
// row, y the tail-side row; complex rows [re | im], j < D/2):
//     0 transe_l1  -sum |x + r - y|            1 transe_l2  -sqrt(sum (x + r - y)^2)
//     2 distmult   sum x r y                   3 complex    sum_j Re(x_j r_j conj(y_j))
//     4 rotate     -sum_j sqrt(|x_j (rr_j + i ri_j) - y_j|^2 + 1e-12),  rr, ri = cos, sin(r)
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define KGE_FN static __host__ __device__ __forceinline__
#else
#include <cmath>

#include "cpu/cpu_clones.h"
#include "cpu/simd.h"
#define KGE_FN static MMCL_INLINE
#endif

namespace mmcl_fast {

enum KgeScore { kL1 = 0, kL2 = 1, kDistMult = 2, kComplEx = 3, kRotatE = 4 };
constexpr bool is_complex(int s) { return s == kComplEx || s == kRotatE; }

#if defined(__CUDACC__)
KGE_FN float esqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);  // correctly rounded under --use_fast_math too
#else
  return sqrtf(x);
#endif
}
#else
KGE_FN float esqrt(float x) { return std::sqrt(x); }
KGE_FN double esqrt(double x) { return std::sqrt(x); }
KGE_FN vec_t<float> esqrt(vec_t<float> x) { return vsqrt<float>(x); }
KGE_FN vec_t<double> esqrt(vec_t<double> x) { return vsqrt<double>(x); }
#endif

// The per-element term of the real scores: |d|, d^2 (d = x + r - y) or x r y.
template <int S, typename E>
KGE_FN E real_term(E x, E r, E y) {
  if constexpr (S == kDistMult) {
    return x * r * y;
  } else {
    const E d = x + r - y;
    if constexpr (S == kL1) return d < E{} ? -d : d;
    else return d * d;
  }
}

// Its gradient times c (transe_l2: c = g / ||d||, which the caller computes): into dx, dr, dy.
template <int S, typename E>
KGE_FN void real_grad(E x, E r, E y, E c, E& dx, E& dr, E& dy) {
  if constexpr (S == kDistMult) {
    dx = c * r * y;
    dr = c * x * y;
    dy = c * x * r;
  } else {
    const E d = x + r - y;
    // transe_l1: sign(0) = 0, as abs' backward
    const E e = S == kL1 ? (d > E{} ? -c : (d < E{} ? c : E{})) : -(c * d);
    dx = e;
    dr = e;
    dy = -e;
  }
}

// The per-coordinate term of the complex scores: Re(x r conj y), or |x (rr + i ri) - y| for
// rotate (rr, ri = cos, sin of the phase), positive.
template <int S, typename T, typename E>
KGE_FN E complex_term(E xr, E xi, E rr, E ri, E yr, E yi) {
  if constexpr (S == kComplEx) {
    return (xr * rr - xi * ri) * yr + (xr * ri + xi * rr) * yi;
  } else {
    const E dr = xr * rr - xi * ri - yr, di = xr * ri + xi * rr - yi;
    return esqrt(dr * dr + di * di + static_cast<T>(1e-12));
  }
}

// The gradient of g times the term (rotate: of the score's -term, d(theta) into drr).
template <int S, typename T, typename E>
KGE_FN void complex_grad(E xr, E xi, E rr, E ri, E yr, E yi, E g, E& dxr, E& dxi, E& drr,
                              E& dri, E& dyr, E& dyi) {
  if constexpr (S == kComplEx) {
    dxr = g * (rr * yr + ri * yi);
    dxi = g * (rr * yi - ri * yr);
    drr = g * (xr * yr + xi * yi);
    dri = g * (xr * yi - xi * yr);
    dyr = g * (xr * rr - xi * ri);
    dyi = g * (xr * ri + xi * rr);
  } else {
    const E a = xr * rr - xi * ri, bb = xr * ri + xi * rr;
    const E dr = a - yr, di = bb - yi;
    const E m = esqrt(dr * dr + di * di + static_cast<T>(1e-12));
    const E u = -(g * dr) / m, v = -(g * di) / m;  // the gradient with respect to (dr, di)
    dxr = u * rr + v * ri;
    dxi = v * rr - u * ri;
    drr = v * a - u * bb;
    dri = E{};
    dyr = -u;
    dyi = -v;
  }
}

// The shapes, score code and num_head that both kernels check (dtypes, devices and contiguity are
// each backend's): W is the coordinates per row (D, or D/2 complex ones).
struct KgeShape {
  int64_t U, D, Dr, W, b, K;
};

inline KgeShape check_kge_shapes(const at::Tensor& entities, const at::Tensor& relations,
                                 const at::Tensor& heads, const at::Tensor& tails,
                                 const at::Tensor& negatives, int64_t num_head, int64_t score) {
  TORCH_CHECK(relations.scalar_type() == entities.scalar_type(),
              "mmcl_fast: relations must have the entities' dtype");
  TORCH_CHECK(entities.dim() == 2, "mmcl_fast: entities must be [U, D], got ", entities.sizes());
  TORCH_CHECK(score >= 0 && score <= 4, "mmcl_fast: score must be 0..4, got ", score);
  const int64_t U = entities.size(0), D = entities.size(1);
  const bool cplx = is_complex(static_cast<int>(score));
  TORCH_CHECK(!cplx || D % 2 == 0, "mmcl_fast: complex and rotate scores need an even D, got ", D);
  const int64_t Dr = score == kRotatE ? D / 2 : D;
  TORCH_CHECK(heads.dim() == 1 && heads.scalar_type() == at::kLong,
              "mmcl_fast: heads must be a 1-D int64 tensor");
  const int64_t b = heads.size(0);
  TORCH_CHECK(relations.dim() == 2 && relations.size(0) == b && relations.size(1) == Dr,
              "mmcl_fast: relations must be [b, ", Dr, "], got ", relations.sizes());
  TORCH_CHECK(tails.dim() == 1 && tails.size(0) == b && tails.scalar_type() == at::kLong,
              "mmcl_fast: tails must be [b] int64");
  TORCH_CHECK(negatives.dim() == 2 && negatives.size(0) == b &&
                  negatives.scalar_type() == at::kLong,
              "mmcl_fast: negatives must be [b, K] int64");
  const int64_t K = negatives.size(1);
  TORCH_CHECK(num_head >= 0 && num_head <= K, "mmcl_fast: num_head must be in [0, K = ", K,
              "], got ", num_head);
  return {U, D, Dr, cplx ? D / 2 : D, b, K};
}

// Calls f(std::integral_constant<int, S>{}) for the score code S (host side).
template <typename F>
inline void dispatch_score(int64_t score, F&& f) {
  switch (score) {
    case kL1:
      f(std::integral_constant<int, kL1>{});
      break;
    case kL2:
      f(std::integral_constant<int, kL2>{});
      break;
    case kDistMult:
      f(std::integral_constant<int, kDistMult>{});
      break;
    case kComplEx:
      f(std::integral_constant<int, kComplEx>{});
      break;
    default:
      f(std::integral_constant<int, kRotatE>{});
      break;
  }
}

}  // namespace mmcl_fast

// Op family C on CUDA, part 3: knowledge-graph triple scores with their negatives, fused. Same
// arguments, checks and results as csrc/cpu/kge_scores.cpp; the contract (the maths, shapes and
// dtypes) is mmcl_fast/ops/kge_scores.py, the element-wise maths ../kge_scores.h. dtypes: float32,
// float16, bfloat16 (T); all arithmetic in float32, scores float32.
//
// Design:
//  * Forward: one warp per score (positive i, j = 0 the positive, 1 + k negative k): b (K + 1)
//    warps, lanes striding over the D coordinates (D/2 complex ones), a warp all-reduce. The K + 1
//    warps of a positive read its h, r, t rows from L2; each negative row is read once.
//  * Backward: one thread per (positive i, coordinate c): it recomputes the K + 1 differences at
//    c, keeps the gradient of the positive's head, tail and relation at c in registers over the K
//    negatives, adds each negative row's gradient into a float32 [U, D] buffer with atomicAdd,
//    then the head's and the tail's, and stores grad_relations[i, c] (no conflict). The float32
//    buffer is the result for float32 entities (cast once for float16 / bfloat16). The atomics
//    make grad_entities not bit-reproducible (the order of the adds varies); grad_relations is.
//    transe_l2 needs each triple's norm first: the forward kernel scores them again (no [b, K, D]
//    is ever saved).
//  * Rotate's cos / sin of the phases come from ATen ([b, D/2] float32 each, accurate: the
//    extension is compiled with --use_fast_math, whose sincosf is not).
//  * Ids out of [0, U) fail a device assertion (the Python API checks them first in eager mode).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "dispatch.h"
#include "kge_scores.h"

namespace mmcl_fast {
namespace {

constexpr int kFwdThreads = 256;
constexpr int kFwdWarps = kFwdThreads / 32;  // scores in flight per block
constexpr int kBwdThreads = 256;

struct KgeArgs {
  int64_t U, D, Dr, W, b, K, nh;  // W: coordinates per row (D, or D/2 complex)
  const int64_t* heads;
  const int64_t* tails;
  const int64_t* negs;
  const float* cs;  // rotate: cos / sin of the phases [b, W]; null otherwise
  const float* sn;
};

// The relation's coordinate c of positive i: (rr, ri) = (re, im), rotate (cos, sin); real: rr.
template <int S, typename T>
__device__ __forceinline__ void relation_at(const KgeArgs& a, const T* R, int64_t i, int64_t c,
                                            float& rr, float& ri) {
  if constexpr (S == kRotatE) {
    rr = a.cs[i * a.W + c];
    ri = a.sn[i * a.W + c];
  } else if constexpr (S == kComplEx) {
    rr = static_cast<float>(R[i * a.Dr + c]);
    ri = static_cast<float>(R[i * a.Dr + a.W + c]);
  } else {
    rr = static_cast<float>(R[i * a.Dr + c]);
    ri = 0.0f;
  }
}

template <int S>
__device__ __forceinline__ float finish_score(float s) {
  if constexpr (S == kL1 || S == kRotatE) return -s;
  else if constexpr (S == kL2) return -__fsqrt_rn(s);
  else return s;
}

template <int S, typename T>
__global__ void __launch_bounds__(kFwdThreads) kge_forward_kernel(const T* __restrict__ E,
                                                                  const T* __restrict__ R,
                                                                  const KgeArgs a,
                                                                  float* __restrict__ pos,
                                                                  float* __restrict__ neg) {
  const int lane = threadIdx.x & 31;
  const int64_t n_scores = a.b * (a.K + 1);
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kFwdWarps + threadIdx.x / 32; w < n_scores;
       w += static_cast<int64_t>(gridDim.x) * kFwdWarps) {
    const int64_t i = w / (a.K + 1), j = w - i * (a.K + 1);
    int64_t xid = a.heads[i], yid = a.tails[i];
    if (j > 0) {
      const int64_t n = a.negs[i * a.K + j - 1];
      if (j - 1 < a.nh) xid = n;
      else yid = n;
    }
    CUDA_KERNEL_ASSERT(xid >= 0 && xid < a.U && yid >= 0 && yid < a.U);
    const T* x = E + xid * a.D;
    const T* y = E + yid * a.D;
    float s = 0.0f;
    for (int64_t c = lane; c < a.W; c += 32) {
      float rr, ri;
      relation_at<S>(a, R, i, c, rr, ri);
      if constexpr (is_complex(S))
        s += complex_term<S, float>(static_cast<float>(x[c]), static_cast<float>(x[a.W + c]), rr,
                                    ri, static_cast<float>(y[c]), static_cast<float>(y[a.W + c]));
      else
        s += real_term<S>(static_cast<float>(x[c]), rr, static_cast<float>(y[c]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
      if (j == 0) pos[i] = finish_score<S>(s);
      else neg[i * a.K + j - 1] = finish_score<S>(s);
    }
  }
}

// The coefficient of the gradient formulas: transe_l2 divides by the triple's norm (-score;
// 0 at a zero distance, as torch's norm backward), the others take g itself.
template <int S>
__device__ __forceinline__ float grad_coef(float g, const float* scores, int64_t idx) {
  if constexpr (S == kL2) {
    const float n = -scores[idx];
    return n > 0.0f ? __fdiv_rn(g, n) : 0.0f;
  } else {
    return g;
  }
}

// A row's coordinate c: (re, im) for complex scores, (value, unused) otherwise.
template <int S, typename T>
__device__ __forceinline__ void row_at(const T* row, int64_t W, int64_t c, float& re, float& im) {
  re = static_cast<float>(row[c]);
  im = is_complex(S) ? static_cast<float>(row[W + c]) : 0.0f;
}

// The gradient of g * score(x, r, y) at one coordinate: (dx, dr, dy) as (re, im) pairs.
template <int S>
__device__ __forceinline__ void coord_grad(const float (&x)[2], const float (&r)[2],
                                           const float (&y)[2], float g, float (&dx)[2],
                                           float (&dr)[2], float (&dy)[2]) {
  if constexpr (is_complex(S)) {
    complex_grad<S, float>(x[0], x[1], r[0], r[1], y[0], y[1], g, dx[0], dx[1], dr[0], dr[1],
                           dy[0], dy[1]);
  } else {
    real_grad<S>(x[0], r[0], y[0], g, dx[0], dr[0], dy[0]);
    dx[1] = dr[1] = dy[1] = 0.0f;
  }
}

template <int S>
__device__ __forceinline__ void add_coord(float* ge, int64_t id, const KgeArgs& a, int64_t c,
                                          const float (&v)[2]) {
  atomicAdd(ge + id * a.D + c, v[0]);
  if constexpr (is_complex(S)) atomicAdd(ge + id * a.D + a.W + c, v[1]);
}

template <int S, typename T>
__global__ void __launch_bounds__(kBwdThreads) kge_backward_kernel(
    const T* __restrict__ E, const T* __restrict__ R, const KgeArgs a,
    const float* __restrict__ gpos, const float* __restrict__ gneg,
    const float* __restrict__ spos, const float* __restrict__ sneg, float* __restrict__ ge,
    T* __restrict__ grel) {
  const int64_t total = a.b * a.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / a.W, c = e - i * a.W;
    const int64_t hid = a.heads[i], tid = a.tails[i];
    CUDA_KERNEL_ASSERT(hid >= 0 && hid < a.U && tid >= 0 && tid < a.U);
    float x[2], y[2], r[2], gh[2], gr[2], gt[2], dx[2], dr[2], dy[2], n[2];
    row_at<S>(E + hid * a.D, a.W, c, x[0], x[1]);
    row_at<S>(E + tid * a.D, a.W, c, y[0], y[1]);
    relation_at<S>(a, R, i, c, r[0], r[1]);
    coord_grad<S>(x, r, y, grad_coef<S>(gpos[i], spos, i), gh, gr, gt);
    for (int64_t k = 0; k < a.K; ++k) {
      const int64_t nid = a.negs[i * a.K + k];
      CUDA_KERNEL_ASSERT(nid >= 0 && nid < a.U);
      row_at<S>(E + nid * a.D, a.W, c, n[0], n[1]);
      const float g = grad_coef<S>(gneg[i * a.K + k], sneg, i * a.K + k);
      const bool head_side = k < a.nh;
      if (head_side) {
        coord_grad<S>(n, r, y, g, dx, dr, dy);
        add_coord<S>(ge, nid, a, c, dx);
      } else {
        coord_grad<S>(x, r, n, g, dx, dr, dy);
        add_coord<S>(ge, nid, a, c, dy);
      }
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        gr[q] += dr[q];
        if (head_side) gt[q] += dy[q];
        else gh[q] += dx[q];
      }
    }
    add_coord<S>(ge, hid, a, c, gh);
    add_coord<S>(ge, tid, a, c, gt);
    grel[i * a.Dr + c] = static_cast<T>(gr[0]);
    if constexpr (S == kComplEx) grel[i * a.Dr + a.W + c] = static_cast<T>(gr[1]);
  }
}

void check_cuda(const at::Tensor& t, const at::Device device, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "mmcl_fast: ", name, " must be on ", device,
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "mmcl_fast: ", name, " must be contiguous");
}

KgeArgs check_kge(const at::Tensor& entities, const at::Tensor& relations, const at::Tensor& heads,
                  const at::Tensor& tails, const at::Tensor& negatives, int64_t num_head,
                  int64_t score) {
  const at::Device dev = entities.device();
  check_cuda(entities, dev, "entities");
  check_cuda(relations, dev, "relations");
  check_cuda(heads, dev, "heads");
  check_cuda(tails, dev, "tails");
  check_cuda(negatives, dev, "negatives");
  const at::ScalarType dt = entities.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "mmcl_fast: entities must be float32, float16 or bfloat16 on CUDA, got ", dt);
  const KgeShape s = check_kge_shapes(entities, relations, heads, tails, negatives, num_head, score);
  return {s.U, s.D, s.Dr, s.W, s.b, s.K, num_head, heads.const_data_ptr<int64_t>(),
          tails.const_data_ptr<int64_t>(), negatives.const_data_ptr<int64_t>(), nullptr, nullptr};
}

// Rotate's cos / sin of the phases (float32, [b, D/2]), pointed at by a; empty otherwise.
std::tuple<at::Tensor, at::Tensor> rotations(const at::Tensor& relations, int64_t score, KgeArgs& a) {
  if (score != kRotatE) return {at::Tensor(), at::Tensor()};
  const at::Tensor theta = relations.to(at::kFloat);
  at::Tensor cs = at::cos(theta), sn = at::sin(theta);
  a.cs = cs.const_data_ptr<float>();
  a.sn = sn.const_data_ptr<float>();
  return {cs, sn};
}

int64_t blocks_for(int64_t items, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, 1 << 20));
}

template <typename T>
void launch_forward(int64_t score, const at::Tensor& entities, const at::Tensor& relations,
                    const KgeArgs& a, float* pos, float* neg, cudaStream_t stream) {
  const int64_t grid = blocks_for(a.b * (a.K + 1), kFwdWarps);
  dispatch_score(score, [&](auto s) {
    kge_forward_kernel<decltype(s)::value, T><<<grid, kFwdThreads, 0, stream>>>(
        entities.const_data_ptr<T>(), relations.const_data_ptr<T>(), a, pos, neg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> kge_scores_forward_cuda(
    const at::Tensor& entities, const at::Tensor& relations, const at::Tensor& heads,
    const at::Tensor& tails, const at::Tensor& negatives, int64_t num_head, int64_t score) {
  KgeArgs a = check_kge(entities, relations, heads, tails, negatives, num_head, score);
  const c10::cuda::CUDAGuard guard(entities.device());
  const auto fopt = entities.options().dtype(at::kFloat);
  at::Tensor pos = at::empty({a.b}, fopt);
  at::Tensor neg = at::empty({a.b, a.K}, fopt);
  if (a.b == 0) return {pos, neg};
  const auto rot = rotations(relations, score, a);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MMCL_DISPATCH_FHB(entities.scalar_type(), "kge_scores_forward_cuda", [&] {
    launch_forward<scalar_t>(score, entities, relations, a, pos.data_ptr<float>(),
                             neg.data_ptr<float>(), stream);
  });
  return {pos, neg};
}

std::tuple<at::Tensor, at::Tensor> kge_scores_backward_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& entities,
    const at::Tensor& relations, const at::Tensor& heads, const at::Tensor& tails,
    const at::Tensor& negatives, int64_t num_head, int64_t score) {
  KgeArgs a = check_kge(entities, relations, heads, tails, negatives, num_head, score);
  const at::Device dev = entities.device();
  check_cuda(grad_pos, dev, "grad_pos");
  check_cuda(grad_neg, dev, "grad_neg");
  TORCH_CHECK(grad_pos.dim() == 1 && grad_pos.size(0) == a.b && grad_pos.scalar_type() == at::kFloat,
              "mmcl_fast: grad_pos must be [b] float32");
  TORCH_CHECK(grad_neg.dim() == 2 && grad_neg.size(0) == a.b && grad_neg.size(1) == a.K &&
                  grad_neg.scalar_type() == at::kFloat,
              "mmcl_fast: grad_neg must be [b, K] float32");
  const c10::cuda::CUDAGuard guard(dev);
  const auto fopt = entities.options().dtype(at::kFloat);
  at::Tensor ge = at::zeros({a.U, a.D}, fopt);
  at::Tensor gr = at::empty({a.b, a.Dr}, relations.options());
  if (a.b > 0) {
    const auto rot = rotations(relations, score, a);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    at::Tensor spos, sneg;  // transe_l2: the scores again, for the norms
    MMCL_DISPATCH_FHB(entities.scalar_type(), "kge_scores_backward_cuda", [&] {
      using T = scalar_t;
      if (score == kL2) {
        spos = at::empty({a.b}, fopt);
        sneg = at::empty({a.b, a.K}, fopt);
        launch_forward<T>(score, entities, relations, a, spos.data_ptr<float>(),
                          sneg.data_ptr<float>(), stream);
      }
      const float* sp = spos.defined() ? spos.const_data_ptr<float>() : nullptr;
      const float* sn = sneg.defined() ? sneg.const_data_ptr<float>() : nullptr;
      const int64_t grid = blocks_for(a.b * a.W, kBwdThreads);
      dispatch_score(score, [&](auto s) {
        kge_backward_kernel<decltype(s)::value, T><<<grid, kBwdThreads, 0, stream>>>(
            entities.const_data_ptr<T>(), relations.const_data_ptr<T>(), a,
            grad_pos.const_data_ptr<float>(), grad_neg.const_data_ptr<float>(), sp, sn,
            ge.data_ptr<float>(), gr.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (entities.scalar_type() != at::kFloat) ge = ge.to(entities.scalar_type());
  return {ge, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CUDA, m) {
  m.impl("kge_scores_forward", &kge_scores_forward_cuda);
  m.impl("kge_scores_backward", &kge_scores_backward_cuda);
}

}  // namespace mmcl_fast

// Op family A on CUDA: the fused, multi-tensor, per-modality gradient-modulated AdamW and SGD
// steps. Same arguments, checks and results as csrc/cpu/modality_step.cpp.
//
// The maths (../modality_step.h has the element-wise update, ../philox.h the noise):
//     g' = k*g + sigma*eps + 2*lambda*w*(p - anchor)     (anchor term on the first A elements)
// then torch.optim's AdamW / SGD update with g' in place of g. k = coefficients[modality] (1 when
// modality < 0), sigma = the unbiased std of the UNSCALED gradient of the tensor (0 when noise is
// off or numel < 2), eps the Philox normal of the element (counter (e/4, tensor_id, step)).
//
// Design:
//  * Multi-tensor apply. All tensors of a call are cut into chunks of kChunk elements; one launch
//    covers up to kMaxChunks chunks of up to kMaxTensors tensors, whose pointers, sizes and
//    per-tensor scalars (bias corrections from steps[t], noise id, flags) travel by value in a
//    ChunkMeta kernel argument (< 4 KB). One block per chunk, a block-stride loop over groups of
//    4 elements inside it: a group is one Philox call, so kChunk is a multiple of 4 and the noise
//    of element e is the same whatever the chunking. A call with many tensors or elements takes
//    a few launches instead of one (or several) per tensor.
//  * k is read by the kernel from the coefficients tensor on the device: the coefficients are
//    computed on the GPU each step, and reading them on the host would cost a sync per step.
//  * With noise on, sigma is computed on the device too: a first multi-tensor launch writes the
//    (count, mean, M2) of every chunk (per-thread Welford in the op-math type, Chan's merge in
//    double across the block), a small kernel merges each tensor's chunks into sigma[t], and the
//    update kernel reads sigma[t]. No host synchronisation anywhere.
//  * Loads and stores are 4-wide vectors when the tensor's pointers allow (else scalar); the
//    arithmetic runs in the op-math type (float for half/bfloat16/float, double for double) and
//    the results are stored back in the parameter's dtype.
//  * The noise uses the CPU kernel's log polynomial (with an IEEE division) and sincospif, neither
//    of which --use_fast_math replaces by a low-accuracy intrinsic (logf would become __logf).
//  * The row-sparse step (modality_adamw_rows_, one parameter, only its listed rows) is one launch
//    of adamw_rows_kernel: a group of threads_per_row threads (a power of two <= 32, about R/4)
//    per listed row, 4 elements per thread per iteration, a grid-stride loop over the rows. Row ids
//    are asserted in range; their distinctness is the caller's contract (checked in Python).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../modality_step.h"

namespace mmcl_fast {
namespace {

constexpr int kThreads = 512;           // threads per block of the chunk kernels
constexpr int64_t kChunk = 65536;       // elements per block (a multiple of 4: whole Philox groups)
constexpr int kMaxTensors = 20;         // tensors per launch (ChunkMeta must stay under 4 KB)
constexpr int kMaxChunks = 320;         // chunks (blocks) per launch
constexpr int kMergeThreads = 256;      // threads per block of the sigma merge
constexpr int kMaxMergeTensors = 512;   // tensors per launch of the sigma merge
static_assert(kChunk % 4 == 0, "a chunk must hold whole Philox groups");
static_assert(kThreads % 32 == 0 && kThreads / 32 <= 32, "block reduction needs <= 32 warps");
static_assert(kMergeThreads % 32 == 0 && kMergeThreads / 32 <= 32, "block reduction needs <= 32 warps");
static_assert(kMaxTensors <= 256, "chunk_slot is a uint8_t");

enum : uint8_t {
  kFirstStep = 1,      // SGD: the momentum buffer is new (buf = d)
  kAligned = 2,        // p, g and the state tensors allow 4-wide vector access
  kAnchorAligned = 4,  // the anchor (and a per-element weight) allow 4-wide vector access
};

// What one launch needs: per-tensor data for up to kMaxTensors tensors, and for each block the
// slot of its tensor and the index of its chunk inside that tensor.
struct ChunkMeta {
  void* data[5][kMaxTensors];  // p, g, s0 (exp_avg | momentum buffer), s1 (exp_avg_sq), s2 (max)
  const void* anchor[kMaxTensors];    // null: no anchor term
  const void* anchor_w[kMaxTensors];  // null: weight 1
  int64_t numel[kMaxTensors];
  int64_t anchor_numel[kMaxTensors];
  int64_t anchor_w_stride[kMaxTensors];  // anchor elements per weight entry
  float step_size[kMaxTensors];          // AdamW: lr / (1 - beta1^t)
  float bc2_sqrt[kMaxTensors];           // AdamW: sqrt(1 - beta2^t)
  uint32_t noise_id[kMaxTensors];        // the tensor id of the Philox counter
  int32_t tensor_index[kMaxTensors];     // index of the tensor in the call (into sigma)
  int32_t chunk_index[kMaxChunks];       // chunk of the block inside its tensor
  int32_t partial_base;                  // index of this launch's first chunk in the call
  uint8_t chunk_slot[kMaxChunks];        // tensor slot of the block
  uint8_t flags[kMaxTensors];
};

// The scalars every block of a call shares.
struct StepArgs {
  const float* coef;   // &coefficients[modality] on the device; null: k = 1
  const float* sigma;  // [T] on the device, one per tensor of the call; null: noise off
  float lambda2;       // 2 * anchor_lambda
  uint32_t seed_lo, seed_hi, step;
  float lr, beta1, beta2, eps, weight_decay;  // AdamW
  SGDScalars sgd;                             // SGD
};

static_assert(sizeof(ChunkMeta) + sizeof(StepArgs) <= 4000, "kernel arguments must stay under 4 KB");

struct MergeMeta {
  int32_t tensor_base;                    // tensor of block 0
  int32_t first[kMaxMergeTensors + 1];    // block b merges partials [first[b], first[b+1])
};
static_assert(sizeof(MergeMeta) <= 4000, "kernel arguments must stay under 4 KB");

struct Moments {
  double n, mean, m2;
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Elements e0 .. e0+n-1 (n <= 4) of base into out (zeros past n), as one vector access when vec.
template <typename T, typename U>
__device__ __forceinline__ void load4(const T* base, int64_t e0, int n, bool vec, U (&out)[4]) {
  if (vec && n == 4) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(base + e0);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = static_cast<U>(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = i < n ? static_cast<U>(base[e0 + i]) : U(0);
  }
}

template <typename T, typename U>
__device__ __forceinline__ void store4(T* base, int64_t e0, int n, bool vec, const U (&in)[4]) {
  if (vec && n == 4) {
    Pack4<T> pk;
#pragma unroll
    for (int i = 0; i < 4; ++i) pk.v[i] = static_cast<T>(in[i]);
    *reinterpret_cast<Pack4<T>*>(base + e0) = pk;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i < n) base[e0 + i] = static_cast<T>(in[i]);
  }
}

// log(x) for x in (0, 1], the CPU kernel's branch-free form: exponent from the bits, mantissa
// folded into [sqrt(1/2), sqrt(2)), log(m) = 2 atanh((m-1)/(m+1)) by its odd series.
// __fdiv_rn keeps the division exact under --use_fast_math.
__device__ __forceinline__ float log_unit(float x) {
  const uint32_t bits = __float_as_uint(x);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  float m = __uint_as_float((bits & 0x7fffffu) | 0x3f800000u);
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float t = __fdiv_rn(m - 1.0f, m + 1.0f);
  const float t2 = t * t;
  const float series =
      t * (2.0f + t2 * (0.666666667f + t2 * (0.4f + t2 * (0.285714286f + t2 * 0.222222222f))));
  return static_cast<float>(e) * 0.693147181f + series;
}

// The four standard normals of Philox group `group` (elements 4*group .. 4*group+3).
__device__ __forceinline__ void normal4(uint64_t group, uint32_t tensor_id, const StepArgs& a,
                                        float (&z)[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                                  tensor_id, a.step, a.seed_lo, a.seed_hi);
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    const float ua = philox_uniform24(r.x[2 * pair]);
    const float ub = philox_uniform24(r.x[2 * pair + 1]);
    const float rad = __fsqrt_rn(-2.0f * log_unit(ua));
    float s, c;
    sincospif(2.0f * ub, &s, &c);  // sin, cos of 2 pi ub
    z[2 * pair] = rad * c;
    z[2 * pair + 1] = rad * s;
  }
}

// Per-tensor view of a block's chunk.
struct ChunkRange {
  int slot;
  int64_t begin, end;
};

__device__ __forceinline__ ChunkRange chunk_range(const ChunkMeta& meta) {
  ChunkRange r;
  r.slot = meta.chunk_slot[blockIdx.x];
  r.begin = static_cast<int64_t>(meta.chunk_index[blockIdx.x]) * kChunk;
  const int64_t n = meta.numel[r.slot];
  r.end = r.begin + kChunk < n ? r.begin + kChunk : n;
  return r;
}

// gm: the gradient of the group on entry, the modulated gradient g' on exit; p: the parameter
// before the update. Elements past n are left alone (their lanes are never stored).
template <bool NOISE, typename scalar_t, typename op_t>
__device__ __forceinline__ void modulate4(op_t (&gm)[4], const op_t (&p)[4], int64_t e0, int n,
                                          const ChunkMeta& meta, int slot, const StepArgs& a,
                                          op_t k, op_t sigma) {
  if (NOISE) {
    float z[4];
    normal4(static_cast<uint64_t>(e0) >> 2, meta.noise_id[slot], a, z);
#pragma unroll
    for (int i = 0; i < 4; ++i) gm[i] = k * gm[i] + sigma * static_cast<op_t>(z[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) gm[i] = k * gm[i];
  }
  const scalar_t* anchor = static_cast<const scalar_t*>(meta.anchor[slot]);
  const int64_t anchor_numel = meta.anchor_numel[slot];
  if (anchor == nullptr || e0 >= anchor_numel) return;
  const int na = anchor_numel - e0 < n ? static_cast<int>(anchor_numel - e0) : n;
  const bool avec = (meta.flags[slot] & kAnchorAligned) != 0;
  op_t av[4];
  load4(anchor, e0, na, avec, av);
  op_t w[4] = {op_t(1), op_t(1), op_t(1), op_t(1)};
  const scalar_t* anchor_w = static_cast<const scalar_t*>(meta.anchor_w[slot]);
  if (anchor_w != nullptr) {
    const int64_t stride = meta.anchor_w_stride[slot];
    if (stride == 1) {
      load4(anchor_w, e0, na, avec, w);
    } else {
      // weight index e / stride, with one division per group
      int64_t q = e0 / stride;
      int64_t r = e0 - q * stride;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (i < na) w[i] = static_cast<op_t>(anchor_w[q]);
        if (++r == stride) {
          r = 0;
          ++q;
        }
      }
    }
  }
  const op_t l2 = static_cast<op_t>(a.lambda2);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (i < na) gm[i] += l2 * w[i] * (p[i] - av[i]);
}

// Chan et al.'s merge of (nb, mb, m2b) into (n, mean, m2).
__device__ __forceinline__ void chan_merge(double& n, double& mean, double& m2, double nb,
                                           double mb, double m2b) {
  if (nb == 0.0) return;
  const double nn = n + nb;
  const double delta = mb - mean;
  mean += delta * (nb / nn);
  m2 += m2b + delta * delta * (n * nb / nn);
  n = nn;
}

// Merges the moments of all threads of the block; the result is valid in thread 0.
template <int THREADS>
__device__ __forceinline__ void block_merge(double& n, double& mean, double& m2) {
  constexpr int kWarps = THREADS / 32;
  __shared__ Moments warp_part[kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double on = __shfl_down_sync(0xffffffffu, n, off);
    const double om = __shfl_down_sync(0xffffffffu, mean, off);
    const double o2 = __shfl_down_sync(0xffffffffu, m2, off);
    chan_merge(n, mean, m2, on, om, o2);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = Moments{n, mean, m2};
  __syncthreads();
  if (warp == 0) {
    const Moments q = lane < kWarps ? warp_part[lane] : Moments{0.0, 0.0, 0.0};
    n = q.n;
    mean = q.mean;
    m2 = q.m2;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const double on = __shfl_down_sync(0xffffffffu, n, off);
      const double om = __shfl_down_sync(0xffffffffu, mean, off);
      const double o2 = __shfl_down_sync(0xffffffffu, m2, off);
      chan_merge(n, mean, m2, on, om, o2);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// (count, mean, M2) of each chunk's gradient into partials[partial_base + block].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_moments_kernel(const ChunkMeta meta, Moments* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const ChunkRange c = chunk_range(meta);
  const scalar_t* g = static_cast<const scalar_t*>(meta.data[1][c.slot]);
  const bool vec = (meta.flags[c.slot] & kAligned) != 0;
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t e0 = c.begin + 4 * static_cast<int64_t>(threadIdx.x); e0 < c.end;
       e0 += 4 * kThreads) {
    const int cnt = c.end - e0 < 4 ? static_cast<int>(c.end - e0) : 4;
    acc_t x[4];
    load4(g, e0, cnt, vec, x);
    if (cnt == 4) {
      // the group's own mean and M2, merged in (Chan) with one division
      const acc_t mb = (x[0] + x[1] + x[2] + x[3]) * acc_t(0.25);
      acc_t m2b = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) m2b += (x[i] - mb) * (x[i] - mb);
      const acc_t nn = n + acc_t(4);
      const acc_t delta = mb - mean;
      const acc_t frac = acc_t(4) / nn;
      mean += delta * frac;
      m2 += m2b + delta * delta * n * frac;
      n = nn;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // Welford, over the 1 to 3 elements of the tensor's tail
        if (i < cnt) {
          n += acc_t(1);
          const acc_t d = x[i] - mean;
          mean += d / n;
          m2 += d * (x[i] - mean);
        }
      }
    }
  }
  double dn = static_cast<double>(n), dmean = static_cast<double>(mean), dm2 = static_cast<double>(m2);
  block_merge<kThreads>(dn, dmean, dm2);
  if (threadIdx.x == 0) partials[meta.partial_base + blockIdx.x] = Moments{dn, dmean, dm2};
}

// sigma[t] = unbiased std of tensor t's gradient from its chunks' partials; one block per tensor.
__global__ void __launch_bounds__(kMergeThreads)
    sigma_kernel(const MergeMeta meta, const Moments* __restrict__ partials,
                 float* __restrict__ sigma) {
  const int lo = meta.first[blockIdx.x];
  const int hi = meta.first[blockIdx.x + 1];
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += kMergeThreads) {
    const Moments q = partials[i];
    chan_merge(n, mean, m2, q.n, q.mean, q.m2);
  }
  block_merge<kMergeThreads>(n, mean, m2);
  if (threadIdx.x == 0)
    sigma[meta.tensor_base + static_cast<int>(blockIdx.x)] =
        n > 1.0 ? static_cast<float>(sqrt(m2 / (n - 1.0))) : 0.0f;
}

template <typename scalar_t, bool NOISE, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const ChunkMeta meta, const StepArgs a) {
  using op_t = at::opmath_type<scalar_t>;
  const ChunkRange c = chunk_range(meta);
  const int slot = c.slot;
  scalar_t* p = static_cast<scalar_t*>(meta.data[0][slot]);
  const scalar_t* g = static_cast<const scalar_t*>(meta.data[1][slot]);
  scalar_t* m = static_cast<scalar_t*>(meta.data[2][slot]);
  scalar_t* v = static_cast<scalar_t*>(meta.data[3][slot]);
  scalar_t* vmax = static_cast<scalar_t*>(meta.data[4][slot]);
  const bool vec = (meta.flags[slot] & kAligned) != 0;
  const op_t k = a.coef != nullptr ? static_cast<op_t>(__ldg(a.coef)) : op_t(1);
  const op_t sigma = NOISE ? static_cast<op_t>(__ldg(a.sigma + meta.tensor_index[slot])) : op_t(0);
  const AdamWScalars s{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, meta.step_size[slot],
                       meta.bc2_sqrt[slot]};
  for (int64_t e0 = c.begin + 4 * static_cast<int64_t>(threadIdx.x); e0 < c.end;
       e0 += 4 * kThreads) {
    const int n = c.end - e0 < 4 ? static_cast<int>(c.end - e0) : 4;
    op_t pv[4], gm[4], mv[4], vv[4], xv[4] = {op_t(0), op_t(0), op_t(0), op_t(0)};
    load4(p, e0, n, vec, pv);
    load4(g, e0, n, vec, gm);
    load4(m, e0, n, vec, mv);
    load4(v, e0, n, vec, vv);
    if (AMSGRAD) load4(vmax, e0, n, vec, xv);
    modulate4<NOISE, scalar_t>(gm, pv, e0, n, meta, slot, a, k, sigma);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      pv[i] = adamw_element<AMSGRAD, op_t>(pv[i], gm[i], mv[i], vv[i], xv[i], s);
    store4(p, e0, n, vec, pv);
    store4(m, e0, n, vec, mv);
    store4(v, e0, n, vec, vv);
    if (AMSGRAD) store4(vmax, e0, n, vec, xv);
  }
}

template <typename scalar_t, bool NOISE, bool MOMENTUM>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const ChunkMeta meta, const StepArgs a) {
  using op_t = at::opmath_type<scalar_t>;
  const ChunkRange c = chunk_range(meta);
  const int slot = c.slot;
  scalar_t* p = static_cast<scalar_t*>(meta.data[0][slot]);
  const scalar_t* g = static_cast<const scalar_t*>(meta.data[1][slot]);
  scalar_t* buf = static_cast<scalar_t*>(meta.data[2][slot]);
  const bool vec = (meta.flags[slot] & kAligned) != 0;
  const bool first = (meta.flags[slot] & kFirstStep) != 0;
  const op_t k = a.coef != nullptr ? static_cast<op_t>(__ldg(a.coef)) : op_t(1);
  const op_t sigma = NOISE ? static_cast<op_t>(__ldg(a.sigma + meta.tensor_index[slot])) : op_t(0);
  const SGDScalars s = a.sgd;
  for (int64_t e0 = c.begin + 4 * static_cast<int64_t>(threadIdx.x); e0 < c.end;
       e0 += 4 * kThreads) {
    const int n = c.end - e0 < 4 ? static_cast<int>(c.end - e0) : 4;
    op_t pv[4], gm[4], bv[4] = {op_t(0), op_t(0), op_t(0), op_t(0)};
    load4(p, e0, n, vec, pv);
    load4(g, e0, n, vec, gm);
    if (MOMENTUM) load4(buf, e0, n, vec, bv);
    modulate4<NOISE, scalar_t>(gm, pv, e0, n, meta, slot, a, k, sigma);
#pragma unroll
    for (int i = 0; i < 4; ++i) pv[i] = sgd_element<MOMENTUM, op_t>(pv[i], gm[i], bv[i], first, s);
    store4(p, e0, n, vec, pv);
    if (MOMENTUM) store4(buf, e0, n, vec, bv);
  }
}

constexpr int kRowThreads = 256;  // threads per block of the row-sparse kernel

// The per-call scalars of the row-sparse kernel.
struct RowsArgs {
  const float* coef;  // &coefficients[modality] on the device; null: k = 1
  RowsGeometry geo;
  int threads_per_row;
  bool vec;         // p, g, m, v allow 4-wide access along every row (R % 4 == 0, aligned)
  bool anchor_vec;  // likewise the anchor and a per-element weight
  float lambda2;    // 2 * anchor_lambda
  float lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    adamw_rows_kernel(scalar_t* __restrict__ p, const int64_t* __restrict__ rows,
                      const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
                      scalar_t* __restrict__ v, const scalar_t* __restrict__ anchor,
                      const scalar_t* __restrict__ anchor_w, const RowsArgs a) {
  using op_t = at::opmath_type<scalar_t>;
  const int tpr = a.threads_per_row;
  const int lane = static_cast<int>(threadIdx.x) & (tpr - 1);
  const int64_t rows_per_block = kRowThreads / tpr;
  const int64_t R = a.geo.row_size;
  const op_t k = a.coef != nullptr ? static_cast<op_t>(__ldg(a.coef)) : op_t(1);
  const AdamWScalars s{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.step_size, a.bc2_sqrt};
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr;
       i < a.geo.num_rows; i += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t r = rows[i];
    CUDA_KERNEL_ASSERT(r >= 0 && r < a.geo.table_rows);
    const int64_t off = r * R;
    const bool anchored = anchor != nullptr && r < a.geo.anchor_rows;
    // a weight constant along the row scales lambda once
    op_t lw = static_cast<op_t>(a.lambda2);
    if (anchored && a.geo.weight_kind == kScalarWeight) lw *= static_cast<op_t>(anchor_w[0]);
    if (anchored && a.geo.weight_kind == kRowWeight) lw *= static_cast<op_t>(anchor_w[r]);
    for (int64_t c = 4 * static_cast<int64_t>(lane); c < R; c += 4 * static_cast<int64_t>(tpr)) {
      const int n = R - c < 4 ? static_cast<int>(R - c) : 4;
      op_t pv[4], gv[4], mv[4], vv[4], unused[4] = {op_t(0), op_t(0), op_t(0), op_t(0)};
      load4(p + off, c, n, a.vec, pv);
      load4(g + i * R, c, n, a.vec, gv);
      load4(m + off, c, n, a.vec, mv);
      load4(v + off, c, n, a.vec, vv);
#pragma unroll
      for (int e = 0; e < 4; ++e) gv[e] = k * gv[e];
      if (anchored) {
        op_t av[4], wv[4] = {op_t(1), op_t(1), op_t(1), op_t(1)};
        load4(anchor + off, c, n, a.anchor_vec, av);
        if (a.geo.weight_kind == kElementWeight) load4(anchor_w + off, c, n, a.anchor_vec, wv);
#pragma unroll
        for (int e = 0; e < 4; ++e) gv[e] += lw * wv[e] * (pv[e] - av[e]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e)
        pv[e] = adamw_element<false, op_t>(pv[e], gv[e], mv[e], vv[e], unused[e], s);
      store4(p + off, c, n, a.vec, pv);
      store4(m + off, c, n, a.vec, mv);
      store4(v + off, c, n, a.vec, vv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// One tensor of the call, as the launches see it.
struct HostTensor {
  void* data[5];
  const void* anchor;
  const void* anchor_w;
  int64_t numel, anchor_numel, anchor_w_stride;
  float step_size, bc2_sqrt;
  uint32_t noise_id;
  uint8_t flags;
};

struct Launch {
  ChunkMeta meta;
  int chunks;
  int tensors;
};

void reset_launch(Launch& l, int32_t partial_base) {
  std::memset(&l.meta, 0, sizeof(l.meta));
  l.meta.partial_base = partial_base;
  l.chunks = 0;
  l.tensors = 0;
}

// Packs the chunks of all tensors into launches; first_partial[t] .. first_partial[t+1] are the
// call-wide indices of tensor t's chunks (and of their moments in the partials buffer).
std::vector<Launch> pack_launches(const std::vector<HostTensor>& ts,
                                  std::vector<int32_t>& first_partial) {
  std::vector<Launch> launches;
  first_partial.assign(ts.size() + 1, 0);
  Launch cur;
  int64_t total = 0;
  reset_launch(cur, 0);
  auto flush = [&] {
    if (cur.chunks > 0) launches.push_back(cur);
    reset_launch(cur, static_cast<int32_t>(total));
  };
  for (size_t t = 0; t < ts.size(); ++t) {
    const HostTensor& h = ts[t];
    const int64_t nchunks = (h.numel + kChunk - 1) / kChunk;
    TORCH_CHECK(total + nchunks < std::numeric_limits<int32_t>::max(),
                "mmcl_fast: too many elements in one call");
    int slot = -1;  // slot of tensor t in cur, -1 while it has none
    for (int64_t c = 0; c < nchunks; ++c) {
      if (slot < 0) {
        if (cur.tensors == kMaxTensors) flush();
        slot = cur.tensors++;
        ChunkMeta& m = cur.meta;
        for (int d = 0; d < 5; ++d) m.data[d][slot] = h.data[d];
        m.anchor[slot] = h.anchor;
        m.anchor_w[slot] = h.anchor_w;
        m.numel[slot] = h.numel;
        m.anchor_numel[slot] = h.anchor_numel;
        m.anchor_w_stride[slot] = h.anchor_w_stride;
        m.step_size[slot] = h.step_size;
        m.bc2_sqrt[slot] = h.bc2_sqrt;
        m.noise_id[slot] = h.noise_id;
        m.tensor_index[slot] = static_cast<int32_t>(t);
        m.flags[slot] = h.flags;
      }
      cur.meta.chunk_slot[cur.chunks] = static_cast<uint8_t>(slot);
      cur.meta.chunk_index[cur.chunks] = static_cast<int32_t>(c);
      ++cur.chunks;
      ++total;
      if (cur.chunks == kMaxChunks) {
        flush();
        slot = -1;
      }
    }
    first_partial[t + 1] = static_cast<int32_t>(total);
  }
  flush();
  return launches;
}

bool aligned_for4(const void* ptr, int64_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(4 * elem_size) == 0;
}

// The vector-access flags, once all pointers are set.
void set_alignment(std::vector<HostTensor>& ts, int64_t elem_size) {
  for (HostTensor& h : ts) {
    bool ok = true;
    for (int d = 0; d < 5; ++d)
      if (h.data[d] != nullptr) ok = ok && aligned_for4(h.data[d], elem_size);
    if (ok) h.flags |= kAligned;
    bool aok = h.anchor != nullptr && aligned_for4(h.anchor, elem_size);
    if (h.anchor_w != nullptr && h.anchor_w_stride == 1)
      aok = aok && aligned_for4(h.anchor_w, elem_size);
    if (aok) h.flags |= kAnchorAligned;
  }
}

void check_params(const at::TensorList params) {
  const at::Device device = params[0].device();
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].is_cuda(), "mmcl_fast: params[", t, "] must be a CUDA tensor");
    TORCH_CHECK(params[t].device() == device, "mmcl_fast: params[", t, "] is on ",
                params[t].device(), ", params[0] on ", device);
    TORCH_CHECK(params[t].is_contiguous(), "mmcl_fast: params[", t, "] must be contiguous");
    TORCH_CHECK(params[t].scalar_type() == params[0].scalar_type(),
                "mmcl_fast: params must share one dtype");
  }
}

void check_list(const at::TensorList ref, const at::TensorList other, const char* name) {
  TORCH_CHECK(other.size() == ref.size(), "mmcl_fast: ", name, " has ", other.size(),
              " tensors, params has ", ref.size());
  const at::Device device = ref[0].device();
  for (size_t t = 0; t < ref.size(); ++t) {
    TORCH_CHECK(other[t].sizes() == ref[t].sizes(), "mmcl_fast: ", name, "[", t,
                "] has the wrong shape");
    TORCH_CHECK(other[t].scalar_type() == ref[t].scalar_type(), "mmcl_fast: ", name, "[", t,
                "] has the wrong dtype");
    TORCH_CHECK(other[t].is_contiguous(), "mmcl_fast: ", name, "[", t, "] must be contiguous");
    TORCH_CHECK(other[t].is_cuda() && other[t].device() == device, "mmcl_fast: ", name, "[", t,
                "] must be on ", device);
  }
}

// Pointer to k = coefficients[modality] on the device, or null for modality < 0 (k = 1). `keep`
// holds the contiguous tensor alive until the launches are queued.
const float* coefficient_ptr(const at::Tensor& coefficients, int64_t modality,
                             const at::Device device, at::Tensor& keep) {
  if (modality < 0) return nullptr;
  TORCH_CHECK(modality < coefficients.numel(), "mmcl_fast: modality index ", modality,
              " out of range for ", coefficients.numel(), " coefficients");
  TORCH_CHECK(coefficients.scalar_type() == at::kFloat, "mmcl_fast: coefficients must be float32");
  TORCH_CHECK(coefficients.is_cuda() && coefficients.device() == device,
              "mmcl_fast: coefficients must be on ", device, ", got ", coefficients.device());
  keep = coefficients.contiguous();
  return keep.const_data_ptr<float>() + modality;
}

void fill_anchor(HostTensor& h, const at::Tensor& p,
                 const c10::List<std::optional<at::Tensor>>& anchors,
                 const c10::List<std::optional<at::Tensor>>& weights, size_t t) {
  h.anchor = nullptr;
  h.anchor_w = nullptr;
  h.anchor_numel = 0;
  h.anchor_w_stride = 1;
  if (anchors.size() == 0) return;
  const std::optional<at::Tensor> a = anchors.get(t);
  if (!a.has_value()) return;
  TORCH_CHECK(a->scalar_type() == p.scalar_type() && a->is_contiguous() && a->is_cuda() &&
                  a->device() == p.device() && a->numel() <= p.numel(),
              "mmcl_fast: anchors[", t, "] must be a contiguous tensor of the parameter's dtype "
              "and device covering at most its elements");
  h.anchor = a->const_data_ptr();
  h.anchor_numel = a->numel();
  if (weights.size() == 0) return;
  const std::optional<at::Tensor> w = weights.get(t);
  if (!w.has_value()) return;
  TORCH_CHECK(w->scalar_type() == p.scalar_type() && w->is_contiguous() && w->is_cuda() &&
                  w->device() == p.device() && w->numel() > 0 && h.anchor_numel % w->numel() == 0,
              "mmcl_fast: anchor_weights[", t, "] must hold 1, one per anchor row, or one per "
              "anchor element values");
  h.anchor_w = w->const_data_ptr();
  h.anchor_w_stride = h.anchor_numel / w->numel();
}

// The per-tensor part common to both optimizers (the state pointers are set by the caller).
std::vector<HostTensor> make_tensors(const at::TensorList params, const at::TensorList grads,
                                     bool noise_on, at::IntArrayRef tensor_ids, bool any_anchor,
                                     const c10::List<std::optional<at::Tensor>>& anchors,
                                     const c10::List<std::optional<at::Tensor>>& weights) {
  TORCH_CHECK(!noise_on || tensor_ids.size() == params.size(),
              "mmcl_fast: tensor_ids must have one id per parameter");
  TORCH_CHECK(anchors.size() == 0 || anchors.size() == params.size(),
              "mmcl_fast: anchors must be empty or have one entry per parameter");
  TORCH_CHECK(weights.size() == 0 || weights.size() == params.size(),
              "mmcl_fast: anchor_weights must be empty or have one entry per parameter");
  std::vector<HostTensor> ts(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    HostTensor& h = ts[t];
    std::memset(&h, 0, sizeof(h));
    h.data[0] = params[t].data_ptr();
    h.data[1] = const_cast<void*>(grads[t].const_data_ptr());  // only ever read
    h.numel = params[t].numel();
    h.noise_id = noise_on ? static_cast<uint32_t>(tensor_ids[t]) : 0u;
    fill_anchor(h, params[t], anchors, weights, t);
    if (!any_anchor) {  // checked above, but lambda = 0 switches the term off
      h.anchor = nullptr;
      h.anchor_w = nullptr;
      h.anchor_numel = 0;
    }
  }
  return ts;
}

// Packs the launches and, with noise on, queues the sigma computation; returns the launches.
template <typename scalar_t>
std::vector<Launch> prepare(const std::vector<HostTensor>& ts, bool noise_on,
                            const at::Device device, at::Tensor& sigma,
                            cudaStream_t stream) {
  std::vector<int32_t> first_partial;
  std::vector<Launch> launches = pack_launches(ts, first_partial);
  if (!noise_on) return launches;
  const int64_t num_tensors = static_cast<int64_t>(ts.size());
  const int64_t total = first_partial.back();
  const at::TensorOptions opts = at::TensorOptions().device(device);
  sigma = at::empty({num_tensors}, opts.dtype(at::kFloat));
  at::Tensor partials = at::empty({std::max<int64_t>(total, 1) * 3}, opts.dtype(at::kDouble));
  Moments* part = reinterpret_cast<Moments*>(partials.data_ptr<double>());
  for (const Launch& l : launches) {
    grad_moments_kernel<scalar_t><<<l.chunks, kThreads, 0, stream>>>(l.meta, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (int64_t base = 0; base < num_tensors; base += kMaxMergeTensors) {
    const int count = static_cast<int>(std::min<int64_t>(kMaxMergeTensors, num_tensors - base));
    MergeMeta mm;
    std::memset(&mm, 0, sizeof(mm));
    mm.tensor_base = static_cast<int32_t>(base);
    for (int i = 0; i <= count; ++i) mm.first[i] = first_partial[base + i];
    sigma_kernel<<<count, kMergeThreads, 0, stream>>>(mm, part, sigma.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // `partials` is freed here; the caching allocator only hands its memory to work queued on this
  // stream after the kernels above, so no sync is needed.
  return launches;
}

StepArgs make_args(const float* coef, int64_t seed, int64_t noise_step, double anchor_lambda) {
  StepArgs a;
  std::memset(&a, 0, sizeof(a));
  a.coef = coef;
  a.sigma = nullptr;
  a.lambda2 = static_cast<float>(2.0 * anchor_lambda);
  const uint64_t s = static_cast<uint64_t>(seed);
  a.seed_lo = static_cast<uint32_t>(s);
  a.seed_hi = static_cast<uint32_t>(s >> 32);
  a.step = static_cast<uint32_t>(noise_step);
  return a;
}

void modality_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::ArrayRef<double> steps, const at::Tensor& coefficients,
                         int64_t modality, double lr, double beta1, double beta2, double eps,
                         double weight_decay, bool noise, int64_t seed, int64_t noise_step,
                         at::IntArrayRef tensor_ids,
                         const c10::List<std::optional<at::Tensor>>& anchors,
                         const c10::List<std::optional<at::Tensor>>& anchor_weights,
                         double anchor_lambda) {
  if (params.empty()) return;
  check_params(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  check_list(params, grads, "grads");
  check_list(params, exp_avgs, "exp_avgs");
  check_list(params, exp_avg_sqs, "exp_avg_sqs");
  const bool amsgrad = !max_exp_avg_sqs.empty();
  if (amsgrad) check_list(params, max_exp_avg_sqs, "max_exp_avg_sqs");
  TORCH_CHECK(steps.size() == params.size(), "mmcl_fast: steps must have one entry per parameter");
  for (const double st : steps)
    TORCH_CHECK(st >= 1.0, "mmcl_fast: steps must be counts >= 1 (the count after this step), got ", st);
  const bool noise_on = noise && modality >= 0;
  const bool any_anchor = anchors.size() > 0 && anchor_lambda != 0.0;
  at::Tensor coef_keep;
  const float* coef = coefficient_ptr(coefficients, modality, params[0].device(), coef_keep);
  std::vector<HostTensor> ts =
      make_tensors(params, grads, noise_on, tensor_ids, any_anchor, anchors, anchor_weights);
  for (size_t t = 0; t < params.size(); ++t) {
    HostTensor& h = ts[t];
    h.data[2] = exp_avgs[t].data_ptr();
    h.data[3] = exp_avg_sqs[t].data_ptr();
    h.data[4] = amsgrad ? max_exp_avg_sqs[t].data_ptr() : nullptr;
    const double bc1 = 1.0 - std::pow(beta1, steps[t]);
    const double bc2 = 1.0 - std::pow(beta2, steps[t]);
    h.step_size = static_cast<float>(lr / bc1);
    h.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  }
  set_alignment(ts, params[0].element_size());
  StepArgs a = make_args(coef, seed, noise_step, anchor_lambda);
  a.lr = static_cast<float>(lr);
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.eps = static_cast<float>(eps);
  a.weight_decay = static_cast<float>(weight_decay);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "modality_adamw_cuda", [&] {
    at::Tensor sigma;
    const std::vector<Launch> launches =
        prepare<scalar_t>(ts, noise_on, params[0].device(), sigma, stream);
    if (noise_on) a.sigma = sigma.const_data_ptr<float>();
    for (const Launch& l : launches) {
      if (noise_on && amsgrad)
        adamw_kernel<scalar_t, true, true><<<l.chunks, kThreads, 0, stream>>>(l.meta, a);
      else if (noise_on)
        adamw_kernel<scalar_t, true, false><<<l.chunks, kThreads, 0, stream>>>(l.meta, a);
      else if (amsgrad)
        adamw_kernel<scalar_t, false, true><<<l.chunks, kThreads, 0, stream>>>(l.meta, a);
      else
        adamw_kernel<scalar_t, false, false><<<l.chunks, kThreads, 0, stream>>>(l.meta, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void modality_sgd_cuda(at::TensorList params, at::TensorList grads,
                       at::TensorList momentum_buffers, at::IntArrayRef first_step,
                       const at::Tensor& coefficients, int64_t modality, double lr, double momentum,
                       double dampening, double weight_decay, bool nesterov, bool noise,
                       int64_t seed, int64_t noise_step, at::IntArrayRef tensor_ids,
                       const c10::List<std::optional<at::Tensor>>& anchors,
                       const c10::List<std::optional<at::Tensor>>& anchor_weights,
                       double anchor_lambda) {
  if (params.empty()) return;
  check_params(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  check_list(params, grads, "grads");
  const bool use_momentum = !momentum_buffers.empty();
  if (use_momentum) {
    check_list(params, momentum_buffers, "momentum_buffers");
    TORCH_CHECK(first_step.size() == params.size(),
                "mmcl_fast: first_step must have one entry per parameter");
  }
  const bool noise_on = noise && modality >= 0;
  const bool any_anchor = anchors.size() > 0 && anchor_lambda != 0.0;
  at::Tensor coef_keep;
  const float* coef = coefficient_ptr(coefficients, modality, params[0].device(), coef_keep);
  std::vector<HostTensor> ts =
      make_tensors(params, grads, noise_on, tensor_ids, any_anchor, anchors, anchor_weights);
  for (size_t t = 0; t < params.size(); ++t) {
    HostTensor& h = ts[t];
    h.data[2] = use_momentum ? momentum_buffers[t].data_ptr() : nullptr;
    if (use_momentum && first_step[t] != 0) h.flags |= kFirstStep;
  }
  set_alignment(ts, params[0].element_size());
  StepArgs a = make_args(coef, seed, noise_step, anchor_lambda);
  a.sgd = SGDScalars{static_cast<float>(lr), static_cast<float>(momentum),
                     static_cast<float>(dampening), static_cast<float>(weight_decay), nesterov};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "modality_sgd_cuda", [&] {
    at::Tensor sigma;
    const std::vector<Launch> launches =
        prepare<scalar_t>(ts, noise_on, params[0].device(), sigma, stream);
    if (noise_on) a.sigma = sigma.const_data_ptr<float>();
    for (const Launch& l : launches) {
      if (noise_on && use_momentum)
        sgd_kernel<scalar_t, true, true><<<l.chunks, kThreads, 0, stream>>>(l.meta, a);
      else if (noise_on)
        sgd_kernel<scalar_t, true, false><<<l.chunks, kThreads, 0, stream>>>(l.meta, a);
      else if (use_momentum)
        sgd_kernel<scalar_t, false, true><<<l.chunks, kThreads, 0, stream>>>(l.meta, a);
      else
        sgd_kernel<scalar_t, false, false><<<l.chunks, kThreads, 0, stream>>>(l.meta, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void modality_adamw_rows_cuda(const at::Tensor& param, const at::Tensor& rows,
                              const at::Tensor& grad_rows, const at::Tensor& exp_avg,
                              const at::Tensor& exp_avg_sq, double step,
                              const at::Tensor& coefficients, int64_t modality, double lr,
                              double beta1, double beta2, double eps, double weight_decay,
                              const std::optional<at::Tensor>& anchor,
                              const std::optional<at::Tensor>& anchor_weight,
                              double anchor_lambda) {
  TORCH_CHECK(param.is_cuda(), "mmcl_fast: param must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(param.device());
  const RowsGeometry geo = check_rows_args(param, rows, grad_rows, exp_avg, exp_avg_sq, step,
                                           anchor, anchor_weight, anchor_lambda);
  at::Tensor coef_keep;
  const float* coef = coefficient_ptr(coefficients, modality, param.device(), coef_keep);
  if (geo.num_rows == 0 || geo.row_size == 0) return;
  RowsArgs a;
  std::memset(&a, 0, sizeof(a));
  a.coef = coef;
  a.geo = geo;
  int tpr = 1;
  while (tpr < 32 && 4 * tpr < geo.row_size) tpr *= 2;
  a.threads_per_row = tpr;
  const int64_t esize = param.element_size();
  a.vec = geo.row_size % 4 == 0 && aligned_for4(param.const_data_ptr(), esize) &&
          aligned_for4(grad_rows.const_data_ptr(), esize) &&
          aligned_for4(exp_avg.const_data_ptr(), esize) &&
          aligned_for4(exp_avg_sq.const_data_ptr(), esize);
  const void* anchor_ptr = geo.anchor_rows > 0 ? anchor->const_data_ptr() : nullptr;
  const void* weight_ptr = geo.weight_kind != kNoWeight ? anchor_weight->const_data_ptr() : nullptr;
  a.anchor_vec = anchor_ptr != nullptr && geo.row_size % 4 == 0 && aligned_for4(anchor_ptr, esize) &&
                 (geo.weight_kind != kElementWeight || aligned_for4(weight_ptr, esize));
  a.lambda2 = static_cast<float>(2.0 * anchor_lambda);
  a.lr = static_cast<float>(lr);
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.eps = static_cast<float>(eps);
  a.weight_decay = static_cast<float>(weight_decay);
  a.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
  a.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  const int64_t rows_per_block = kRowThreads / tpr;
  const int64_t blocks = std::min<int64_t>((geo.num_rows + rows_per_block - 1) / rows_per_block, 65535);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(),
                                  "modality_adamw_rows_cuda", [&] {
    adamw_rows_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
        param.data_ptr<scalar_t>(), rows.const_data_ptr<int64_t>(),
        grad_rows.const_data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(),
        exp_avg_sq.data_ptr<scalar_t>(), static_cast<const scalar_t*>(anchor_ptr),
        static_cast<const scalar_t*>(weight_ptr), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CUDA, m) {
  m.impl("modality_adamw_", &modality_adamw_cuda);
  m.impl("modality_sgd_", &modality_sgd_cuda);
  m.impl("modality_adamw_rows_", &modality_adamw_rows_cuda);
}

}  // namespace mmcl_fast

// Op family C on CUDA, part 1: the modulated multimodal embedding (gather -> modulate -> fuse and
// its scatter backward), the multi-tensor weight interpolation and the anchor penalty. Same
// arguments, checks and results as csrc/cpu/modulated_embedding.cpp; the contract (the maths,
// shapes and dtypes) is mmcl_fast/ops/modulated_embedding.py. dtypes: float32, float16, bfloat16
// (T); all arithmetic in float32 ("acc"), acc outputs float32.
//
// The maths:
//   modulated_embedding_forward(tables [M,N,D], index [B], gamma, beta [M,D], logits?, mask?):
//     keep_bm  = mask[index_b, m] (true without a mask)
//     gates_bm = softmax over the kept m of logit_bm (logits[b,m], logits[m] or 0), 0 if not kept
//     out_b    = sum_m gates_bm * (gamma_m * tables[m, index_b] + beta_m)        -> out [B,D] T
//   modulated_embedding_backward(g = grad_out [B,D], ..., a = gates [B,M] acc, sparse):
//     grad_tables (m, index_b) += a_bm * gamma_m * g_b   (dense [M,N,D] T by atomics into zeros, or
//                                                         the COO values [M,B,D] T when sparse)
//     grad_gamma_m = sum_b a_bm * g_b * x_bm;  grad_beta_m = sum_b a_bm * g_b     ([M,D] T)
//     d_bm = g_b . (gamma_m * x_bm + beta_m);  grad_logits_bm = a_bm * (d_bm - sum_m' a_bm' d_bm')
//   interpolate_weights_forward(prev[K], new[K], sigma [K], i, eps):
//     n_k = ||new_k||_F, nn_k = max(n_k, eps), out_k = (1 - 1/i) prev_k + (1/i) sigma_k new_k / nn_k
//   interpolate_weights_backward(g[K], new[K], sigma, norms, i, eps):
//     dot_k = <g_k, new_k>, nn_k = max(norms_k, eps), grad_sigma_k = (1/i) dot_k / nn_k
//     grad_new_k = sigma_k / (i nn_k) * (g_k - [norms_k > eps] dot_k / nn_k^2 * new_k)
//   anchor_penalty_forward(p[K], a[K], w[K]?):  sums_k = sum w_k (p_k - a_k)^2
//   anchor_penalty_backward(grad [K], p, a, w):  grad_p_k = 2 grad_k w_k (p_k - a_k)
//     w_k: absent -> 1; numel 1 -> a scalar; numel p.size(0), 1-D, p.dim() > 1 -> one per row
//     (broadcast over the trailing dims); otherwise one per element (p's shape).
//
// Design:
//  * Embedding: one warp per sample row b (8 warps per 256-thread block, a grid-stride loop over
//    rows). Lanes cover the D columns in 16-byte vectors (4 floats / 8 halves) when every row
//    start is 16-byte aligned (D % VEC == 0 and aligned base pointers), else one element at a time.
//    The gates of a row are computed once per row into shared memory (each lane runs the tiny
//    softmax over M redundantly, lane m writes gate m). A modality with gate 0 (masked) is skipped:
//    its table row is never read (so a masked row holding inf/NaN does not poison the output).
//  * Backward: same row mapping. The dense table gradient is scattered with atomics (vector
//    atomics: half2/bfloat162 pairs, float4 on sm_90) into a zeroed [M,N,D] buffer; only gathered
//    rows are touched. grad_gamma/grad_beta are summed per block in float32 shared memory (shared
//    atomics), then flushed once per block with float32 global atomics into a zeroed float32
//    buffer (cast to T at the end for half/bfloat16). When 2*M*D floats do not fit in shared
//    memory the rows add straight into the global float32 buffers. d_bm is a warp all-reduce
//    (xor butterfly: every lane holds bitwise the same sum).
//  * Interpolation / anchor penalty: multi-tensor. A table of per-tensor entries (pointers, sizes,
//    weight mode, first chunk) is copied once per call to the device (pinned staging buffer,
//    asynchronous copy on the current stream). Every tensor is cut into chunks of kChunk
//    elements; one launch covers all chunks of all tensors (block -> tensor by a binary search of
//    the entries' first chunks). Reductions are deterministic: each chunk writes a float32
//    partial, then one block per tensor adds its chunks' partials in a fixed order. Then the
//    element-wise pass reads the per-tensor scalars (norms, dots, sigma, grad) on the device: no
//    host synchronisation anywhere.
//  * --use_fast_math is on for the whole extension: divisions that feed outputs are __fdiv_rn,
//    square roots __fsqrt_rn, and the softmax uses exp_nonpos (a Cody-Waite reduction, then
//    exp2f = ex2.approx on [-1/2, 1/2]) so that the gates stay within a few ulp of expf.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "dispatch.h"

namespace mmcl_fast {
namespace {


constexpr int kRowThreads = 256;              // threads per block of the embedding kernels
constexpr int kRowWarps = kRowThreads / 32;   // rows (samples) in flight per block
constexpr int kMaxM = 1024;                   // modalities (bounded by the gates' shared memory)
constexpr int kBwdThreads = 128;              // threads per block of the embedding backward
constexpr int kBwdWarps = kBwdThreads / 32;   // its rows in flight (and shared-memory slices)

constexpr int kMTThreads = 256;               // threads per block of the multi-tensor kernels
constexpr int64_t kChunk = 8192;              // elements per block (a multiple of 4 * kMTThreads)
static_assert(kChunk % (4 * kMTThreads) == 0, "a chunk is whole thread groups");
static_assert(kRowThreads % 32 == 0 && kMTThreads % 32 == 0 && kMTThreads / 32 <= 32,
              "block reductions need whole warps, at most 32");

void check_dtype(const at::Tensor& t, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "mmcl_fast: ", name,
              " must be float32, float16 or bfloat16 on CUDA, got ", s);
}

void check_cuda(const at::Tensor& t, const at::Device device, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "mmcl_fast: ", name, " must be on ", device,
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "mmcl_fast: ", name, " must be contiguous");
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N consecutive elements at p (p aligned to sizeof(T) * N) into float.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// p[i] += v[i] for i < N, atomically per element (or per pair / quadruple where the hardware
// has a vector atomic). p is aligned to sizeof(T) * N.
template <int N>
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector4 = N % 4 == 0;  // sm_90: 16-byte float4 atomics on global memory
#else
  constexpr bool kVector4 = false;
#endif
  if constexpr (kVector4) {
#pragma unroll
    for (int i = 0; i < N; i += 4)
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) atomicAdd(p + i, v[i]);
  }
}

template <int N>
__device__ __forceinline__ void atomic_add_vec(c10::Half* p, const float (&v)[N]) {
  if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2)
      atomicAdd(reinterpret_cast<__half2*>(p + i), __floats2half2_rn(v[i], v[i + 1]));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) gpuAtomicAddNoReturn(p + i, static_cast<c10::Half>(v[i]));
  }
}

template <int N>
__device__ __forceinline__ void atomic_add_vec(c10::BFloat16* p, const float (&v)[N]) {
  if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2)
      atomicAdd(reinterpret_cast<__nv_bfloat162*>(p + i), __floats2bfloat162_rn(v[i], v[i + 1]));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) gpuAtomicAddNoReturn(p + i, static_cast<c10::BFloat16>(v[i]));
  }
}

// p[i] += v[i], i < N, on shared memory owned by the calling thread (p aligned to 4 * N bytes).
template <int N>
__device__ __forceinline__ void add_smem(float* p, const float (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      float4 o = *reinterpret_cast<float4*>(p + i);
      o.x += v[i];
      o.y += v[i + 1];
      o.z += v[i + 2];
      o.w += v[i + 3];
      *reinterpret_cast<float4*>(p + i) = o;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] += v[i];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // xor butterfly: bitwise the same value in every lane
}

// Sum over the block (kMTThreads threads, fixed order); valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_part[kMTThreads / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  float r = 0.0f;
  if (warp == 0) {
    r = lane < kMTThreads / 32 ? warp_part[lane] : 0.0f;
    r = warp_sum(r);
  }
  return r;
}

// exp(x) for x <= 0 within a few ulp of expf, immune to --use_fast_math: x = n ln2 + r with
// |r| <= ln2/2 (Cody-Waite, two-part ln2 with fma), exp(r) = ex2(r log2e), times 2^n.
__device__ __forceinline__ float exp_nonpos(float x) {
  if (!(x >= -87.0f)) return 0.0f;  // below ~1.6e-38 (and -inf): 0 (denormals are flushed anyway)
  const float n = rintf(x * 1.44269504f);  // in [-126, 0]
  float r = __fmaf_rn(n, -0.693145751953125f, x);
  r = __fmaf_rn(n, -1.428606765330187e-06f, r);
  const float er = exp2f(r * 1.44269504f);
  return er * __int_as_float((static_cast<int>(n) + 127) << 23);
}

// ---------------------------------------------------------------------------------------------
// Modulated embedding kernels
// ---------------------------------------------------------------------------------------------

struct EmbArgs {
  int64_t B, N, D;
  int M;
  int64_t logits_row_stride;  // M for [B, M] logits, 0 for [M] logits (unused without logits)
};

// Computes the M gates of row b into sg[0..M) (shared, this warp's slice) and, when gates_out is
// not null, into gates_out[b, :]. Ends with __syncwarp(): sg is then visible to the whole warp.
template <typename scalar_t>
__device__ __forceinline__ void row_gates(const scalar_t* __restrict__ logits,
                                          const bool* __restrict__ mask, int64_t b, int64_t id,
                                          const EmbArgs& a, float* sg, float* gates_out,
                                          int lane) {
  const scalar_t* lrow = logits != nullptr ? logits + b * a.logits_row_stride : nullptr;
  const bool* mrow = mask != nullptr ? mask + id * a.M : nullptr;
  // every lane: the max and the sum over the kept modalities (the same values in all lanes)
  float mx = -INFINITY;
  for (int m = 0; m < a.M; ++m) {
    if (mrow != nullptr && !mrow[m]) continue;
    const float l = lrow != nullptr ? static_cast<float>(lrow[m]) : 0.0f;
    mx = fmaxf(mx, l);
  }
  float sum = 0.0f;
  for (int m = 0; m < a.M; ++m) {
    if (mrow != nullptr && !mrow[m]) continue;
    const float l = lrow != nullptr ? static_cast<float>(lrow[m]) : 0.0f;
    sum += exp_nonpos(l - mx);
  }
  // lane m (and m + 32, ...) writes gate m. No kept modality (Python rules it out): all gates 0.
  for (int m = lane; m < a.M; m += 32) {
    const bool keep = mrow == nullptr || mrow[m];
    float g = 0.0f;
    if (keep && sum > 0.0f) {
      const float l = lrow != nullptr ? static_cast<float>(lrow[m]) : 0.0f;
      g = __fdiv_rn(exp_nonpos(l - mx), sum);
    }
    sg[m] = g;
    if (gates_out != nullptr) gates_out[b * a.M + m] = g;
  }
  __syncwarp();
}

// One warp per row b: gates, then out[b, :] = sum_m gate_m * (gamma_m * x_bm + beta_m).
// Shared memory: kRowWarps * M floats (the gates of each warp's current row).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    emb_forward_kernel(const scalar_t* __restrict__ tables, const int64_t* __restrict__ index,
                       const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
                       const scalar_t* __restrict__ logits, const bool* __restrict__ mask,
                       scalar_t* __restrict__ out, float* __restrict__ gates, const EmbArgs a) {
  extern __shared__ __align__(16) float fwd_smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float* sg = fwd_smem + warp * a.M;
  const int64_t nvec = a.D / VEC;  // VEC divides D (checked by the host)
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; b < a.B;
       b += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t id = index[b];
    CUDA_KERNEL_ASSERT(id >= 0 && id < a.N);
    row_gates(logits, mask, b, id, a, sg, gates, lane);
    for (int64_t v = lane; v < nvec; v += 32) {
      const int64_t col = v * VEC;
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
      for (int m = 0; m < a.M; ++m) {
        const float g = sg[m];
        if (g == 0.0f) continue;  // masked: contributes nothing, its row is not read
        float x[VEC], gm[VEC], bt[VEC];
        load_vec<scalar_t, VEC>(tables + (static_cast<int64_t>(m) * a.N + id) * a.D + col, x);
        load_vec<scalar_t, VEC>(gamma + static_cast<int64_t>(m) * a.D + col, gm);
        load_vec<scalar_t, VEC>(beta + static_cast<int64_t>(m) * a.D + col, bt);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = __fmaf_rn(g, __fmaf_rn(gm[i], x[i], bt[i]), acc[i]);
      }
      store_vec<scalar_t, VEC>(out + b * a.D + col, acc);
    }
    __syncwarp();  // every lane is done with sg before the next row overwrites it
  }
}

// One warp per row b (kBwdWarps warps per block, a grid-stride loop over rows).
// grad_gamma / grad_beta partials: with slices, every warp adds its rows' terms into its own
// [2, M, D] float32 slice of shared memory (a lane owns its columns: plain read-modify-write, no
// atomics), the block then adds its warps' slices in a fixed order and writes them to
// part[blockIdx.x] ([gridDim.x, 2, M, D]); without slices (2*M*D too big for shared memory) the
// rows add with float32 atomics straight into part[0] (zeroed by the host).
// Shared memory: [slices: kBwdWarps * 2 * M * D floats] then kBwdWarps * M floats (d_bm).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBwdThreads)
    emb_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ tables,
                        const int64_t* __restrict__ index, const scalar_t* __restrict__ gamma,
                        const scalar_t* __restrict__ beta, const float* __restrict__ gates,
                        scalar_t* __restrict__ grad_tables, bool sparse, float* __restrict__ part,
                        float* __restrict__ grad_logits, bool use_slices, const EmbArgs a) {
  extern __shared__ __align__(16) float bwd_smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t MD = static_cast<int64_t>(a.M) * a.D;
  float* slices = bwd_smem;  // [kBwdWarps][2][M][D] when use_slices
  float* sd = bwd_smem + (use_slices ? kBwdWarps * 2 * MD : 0) + warp * a.M;
  float* wslice = slices + warp * 2 * MD;  // this warp's [2][M][D]
  if (use_slices) {
    for (int64_t i = threadIdx.x; i < kBwdWarps * 2 * MD; i += kBwdThreads) slices[i] = 0.0f;
    __syncthreads();
  }
  const int64_t nvec = a.D / VEC;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kBwdWarps + warp; b < a.B;
       b += static_cast<int64_t>(gridDim.x) * kBwdWarps) {
    const int64_t id = index[b];
    CUDA_KERNEL_ASSERT(id >= 0 && id < a.N);
    const scalar_t* grow = grad_out + b * a.D;
    float s = 0.0f;  // sum_m a_bm d_bm (the same in every lane)
    for (int m = 0; m < a.M; ++m) {
      const float am = gates[b * a.M + m];
      // destination of the table gradient of (b, m): the row (m, id) of the dense gradient, or
      // the row (m, b) of the sparse values
      scalar_t* trow = sparse ? grad_tables + (static_cast<int64_t>(m) * a.B + b) * a.D
                              : grad_tables + (static_cast<int64_t>(m) * a.N + id) * a.D;
      if (am == 0.0f) {  // masked modality: every contribution is 0 (its row is not read)
        if (sparse) {
          const float z[VEC] = {};
          for (int64_t v = lane; v < nvec; v += 32) store_vec<scalar_t, VEC>(trow + v * VEC, z);
        }
        if (lane == 0) sd[m] = 0.0f;
        continue;
      }
      const int64_t moff = static_cast<int64_t>(m) * a.D;  // row m of an [M, D] array
      const scalar_t* xrow = tables + (static_cast<int64_t>(m) * a.N + id) * a.D;
      float partial = 0.0f;
      for (int64_t v = lane; v < nvec; v += 32) {
        const int64_t col = v * VEC;
        float g[VEC], x[VEC], gm[VEC], bt[VEC], gt[VEC], tg[VEC], tb[VEC];
        load_vec<scalar_t, VEC>(grow + col, g);
        load_vec<scalar_t, VEC>(xrow + col, x);
        load_vec<scalar_t, VEC>(gamma + moff + col, gm);
        load_vec<scalar_t, VEC>(beta + moff + col, bt);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float y = __fmaf_rn(gm[i], x[i], bt[i]);  // y_bm
          partial = __fmaf_rn(g[i], y, partial);          // g_b . y_bm (this lane's share)
          const float ag = am * g[i];
          gt[i] = ag * gm[i];  // table gradient
          tg[i] = ag * x[i];   // grad_gamma term
          tb[i] = ag;          // grad_beta term
        }
        if (sparse)
          store_vec<scalar_t, VEC>(trow + col, gt);
        else
          atomic_add_vec<VEC>(trow + col, gt);
        if (use_slices) {
          // only this lane touches these VEC floats of the warp's slice
          add_smem<VEC>(wslice + moff + col, tg);
          add_smem<VEC>(wslice + MD + moff + col, tb);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            atomicAdd(part + moff + col + i, tg[i]);
            atomicAdd(part + MD + moff + col + i, tb[i]);
          }
        }
      }
      const float d = warp_sum(partial);  // d_bm
      s = __fmaf_rn(am, d, s);
      if (lane == 0) sd[m] = d;
    }
    __syncwarp();  // sd complete
    for (int m = lane; m < a.M; m += 32) {
      const float am = gates[b * a.M + m];
      grad_logits[b * a.M + m] = am == 0.0f ? 0.0f : am * (sd[m] - s);
    }
    __syncwarp();  // sd read before the next row overwrites it
  }
  if (use_slices) {
    __syncthreads();
    float* out = part + static_cast<int64_t>(blockIdx.x) * 2 * MD;
    for (int64_t i = threadIdx.x; i < 2 * MD; i += kBwdThreads) {
      float acc = 0.0f;
#pragma unroll
      for (int w = 0; w < kBwdWarps; ++w) acc += slices[w * 2 * MD + i];
      out[i] = acc;
    }
  }
}

// grad_gamma[j] = sum_p part[p, 0, j], grad_beta[j] = sum_p part[p, 1, j], cast to T. A block
// of 32 x 32 threads owns 32 consecutive j (threadIdx.x); its 32 warps (threadIdx.y) split the
// partials p = y, y + 32, ...; the warps' sums are then added in a fixed order (deterministic).
constexpr int kParamWarps = 32;
template <typename scalar_t>
__global__ void __launch_bounds__(32 * kParamWarps)
    emb_param_grad_kernel(const float* __restrict__ part, int64_t nparts, int64_t MD,
                          scalar_t* __restrict__ grad_gamma, scalar_t* __restrict__ grad_beta) {
  __shared__ float red[kParamWarps][33];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (j < 2 * MD) {
#pragma unroll 8
    for (int64_t p = threadIdx.y; p < nparts; p += kParamWarps) acc += part[p * 2 * MD + j];
  }
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || j >= 2 * MD) return;
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kParamWarps; ++w) sum += red[w][threadIdx.x];
  if (j < MD)
    grad_gamma[j] = static_cast<scalar_t>(sum);
  else
    grad_beta[j - MD] = static_cast<scalar_t>(sum);
}

struct EmbCommon {
  int64_t M, N, D, B;
  at::Device device;
};

EmbCommon check_emb(const at::Tensor& tables, const at::Tensor& index, const at::Tensor& gamma,
                    const at::Tensor& beta) {
  TORCH_CHECK(tables.dim() == 3, "mmcl_fast: tables must be [M, N, D], got ", tables.sizes());
  TORCH_CHECK(tables.is_cuda(), "mmcl_fast: tables must be a CUDA tensor");
  const at::Device device = tables.device();
  check_cuda(tables, device, "tables");
  check_dtype(tables, "tables");
  const int64_t M = tables.size(0), N = tables.size(1), D = tables.size(2);
  TORCH_CHECK(M <= kMaxM, "mmcl_fast: at most ", kMaxM, " modalities on CUDA, got ", M);
  check_cuda(index, device, "index");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "mmcl_fast: index must be a 1-D int64 tensor");
  auto check_md = [&](const at::Tensor& t, const char* name) {
    check_cuda(t, device, name);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == D, "mmcl_fast: ", name,
                " must be [M, D] = [", M, ", ", D, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == tables.scalar_type(), "mmcl_fast: ", name,
                " must have the tables' dtype");
  };
  check_md(gamma, "gamma");
  check_md(beta, "beta");
  return EmbCommon{M, N, D, index.size(0), device};
}

std::tuple<at::Tensor, at::Tensor> modulated_embedding_forward_cuda(
    const at::Tensor& tables, const at::Tensor& index, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& gate_logits,
    const std::optional<at::Tensor>& modality_mask) {
  const EmbCommon c = check_emb(tables, index, gamma, beta);
  const c10::cuda::CUDAGuard guard(c.device);
  EmbArgs a{c.B, c.N, c.D, static_cast<int>(c.M), 0};
  const void* logits_ptr = nullptr;
  if (gate_logits.has_value()) {
    const at::Tensor& l = *gate_logits;
    check_cuda(l, c.device, "gate_logits");
    TORCH_CHECK(l.scalar_type() == tables.scalar_type(),
                "mmcl_fast: gate_logits must have the tables' dtype");
    TORCH_CHECK((l.dim() == 2 && l.size(0) == c.B && l.size(1) == c.M) ||
                    (l.dim() == 1 && l.size(0) == c.M),
                "mmcl_fast: gate_logits must be [B, M] or [M], got ", l.sizes());
    a.logits_row_stride = l.dim() == 2 ? c.M : 0;
    logits_ptr = l.const_data_ptr();
  }
  const bool* mask_ptr = nullptr;
  if (modality_mask.has_value()) {
    const at::Tensor& mk = *modality_mask;
    check_cuda(mk, c.device, "modality_mask");
    TORCH_CHECK(mk.scalar_type() == at::kBool && mk.dim() == 2 && mk.size(0) == c.N &&
                    mk.size(1) == c.M,
                "mmcl_fast: modality_mask must be a bool [N, M] tensor");
    mask_ptr = mk.const_data_ptr<bool>();
  }
  at::Tensor out = at::empty({c.B, c.D}, tables.options());
  at::Tensor gates = at::empty({c.B, c.M}, tables.options().dtype(at::kFloat));
  if (c.B == 0) return {out, gates};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = std::min<int64_t>((c.B + kRowWarps - 1) / kRowWarps, 65535);
  const size_t smem = sizeof(float) * kRowWarps * c.M;
  MMCL_DISPATCH_FHB(tables.scalar_type(), "modulated_embedding_forward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = c.D % kVec == 0 && aligned16(tables.const_data_ptr()) &&
                     aligned16(gamma.const_data_ptr()) && aligned16(beta.const_data_ptr()) &&
                     aligned16(out.data_ptr());
    const auto* tp = tables.const_data_ptr<scalar_t>();
    const auto* gp = gamma.const_data_ptr<scalar_t>();
    const auto* bp = beta.const_data_ptr<scalar_t>();
    const auto* lp = static_cast<const scalar_t*>(logits_ptr);
    if (vec)
      emb_forward_kernel<scalar_t, kVec><<<grid, kRowThreads, smem, stream>>>(
          tp, index.const_data_ptr<int64_t>(), gp, bp, lp, mask_ptr, out.data_ptr<scalar_t>(),
          gates.data_ptr<float>(), a);
    else
      emb_forward_kernel<scalar_t, 1><<<grid, kRowThreads, smem, stream>>>(
          tp, index.const_data_ptr<int64_t>(), gp, bp, lp, mask_ptr, out.data_ptr<scalar_t>(),
          gates.data_ptr<float>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_embedding_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& tables, const at::Tensor& index,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& gates, bool sparse) {
  const EmbCommon c = check_emb(tables, index, gamma, beta);
  const c10::cuda::CUDAGuard guard(c.device);
  check_cuda(grad_out, c.device, "grad_out");
  TORCH_CHECK(grad_out.scalar_type() == tables.scalar_type() && grad_out.dim() == 2 &&
                  grad_out.size(0) == c.B && grad_out.size(1) == c.D,
              "mmcl_fast: grad_out must be [B, D] of the tables' dtype, got ", grad_out.sizes());
  check_cuda(gates, c.device, "gates");
  TORCH_CHECK(gates.scalar_type() == at::kFloat && gates.dim() == 2 && gates.size(0) == c.B &&
                  gates.size(1) == c.M,
              "mmcl_fast: gates must be float32 [B, M], got ", gates.sizes());
  const at::TensorOptions fopts = tables.options().dtype(at::kFloat);
  at::Tensor grad_tables = sparse ? at::empty({c.M, c.B, c.D}, tables.options())
                                  : at::zeros({c.M, c.N, c.D}, tables.options());
  at::Tensor grad_logits = at::empty({c.B, c.M}, fopts);
  at::Tensor grad_gamma = at::empty({c.M, c.D}, tables.options());
  at::Tensor grad_beta = at::empty({c.M, c.D}, tables.options());
  const int64_t MD = c.M * c.D;
  if (c.B == 0 || c.M == 0) {  // no rows (or no modalities): every sum is empty
    grad_gamma.zero_();
    grad_beta.zero_();
    return {grad_tables, grad_gamma, grad_beta, grad_logits};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // float32 partial sums of grad_gamma / grad_beta: [nparts, 2, M, D]
  at::Tensor part;
  int64_t nparts = 1;
  {  // B > 0, M > 0 (D may be 0: the kernel then writes grad_logits = 0)
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    const int64_t slice_bytes =
        static_cast<int64_t>(sizeof(float)) * (kBwdWarps * 2 * MD + kBwdWarps * c.M);
    const int64_t smem_limit = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
    const bool use_slices = slice_bytes <= std::min<int64_t>(smem_limit, 96 * 1024);
    const size_t smem = use_slices ? static_cast<size_t>(slice_bytes)
                                   : sizeof(float) * kBwdWarps * c.M;
    const int64_t rows_blocks = (c.B + kBwdWarps - 1) / kBwdWarps;
    // With slices every block writes one [2, M, D] partial (summed by emb_param_grad_kernel):
    // enough blocks for about one row per warp at the benchmark sizes (the rows are latency
    // bound gathers), capped so that the partials stay a few MB.
    const int64_t grid = std::min<int64_t>(
        rows_blocks, use_slices ? 8 * static_cast<int64_t>(prop->multiProcessorCount) : 65535);
    if (use_slices) {
      nparts = grid;
      part = at::empty({grid, 2, c.M, c.D}, fopts);
    } else {
      part = at::zeros({1, 2, c.M, c.D}, fopts);
    }
    EmbArgs a{c.B, c.N, c.D, static_cast<int>(c.M), 0};
    MMCL_DISPATCH_FHB(tables.scalar_type(), "modulated_embedding_backward_cuda", [&] {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = c.D % kVec == 0 && aligned16(tables.const_data_ptr()) &&
                       aligned16(gamma.const_data_ptr()) && aligned16(beta.const_data_ptr()) &&
                       aligned16(grad_out.const_data_ptr()) && aligned16(grad_tables.data_ptr());
      const auto* go = grad_out.const_data_ptr<scalar_t>();
      const auto* tp = tables.const_data_ptr<scalar_t>();
      const auto* ip = index.const_data_ptr<int64_t>();
      const auto* gp = gamma.const_data_ptr<scalar_t>();
      const auto* bp = beta.const_data_ptr<scalar_t>();
      const float* ap = gates.const_data_ptr<float>();
      auto* gt = grad_tables.data_ptr<scalar_t>();
      auto launch = [&](auto kernel) {
        if (smem > 48 * 1024)
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
        kernel<<<grid, kBwdThreads, smem, stream>>>(go, tp, ip, gp, bp, ap, gt, sparse,
                                                   part.data_ptr<float>(),
                                                   grad_logits.data_ptr<float>(), use_slices, a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec)
        launch(emb_backward_kernel<scalar_t, kVec>);
      else
        launch(emb_backward_kernel<scalar_t, 1>);
    });
  }
  if (MD == 0) return {grad_tables, grad_gamma, grad_beta, grad_logits};
  TORCH_CHECK((2 * MD + 31) / 32 < (int64_t{1} << 31), "mmcl_fast: gamma is too large");
  const int64_t grid = (2 * MD + 31) / 32;
  MMCL_DISPATCH_FHB(tables.scalar_type(), "modulated_embedding_backward_params", [&] {
    emb_param_grad_kernel<scalar_t><<<grid, dim3(32, kParamWarps), 0, stream>>>(
        part.const_data_ptr<float>(), nparts, MD, grad_gamma.data_ptr<scalar_t>(),
        grad_beta.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_tables, grad_gamma, grad_beta, grad_logits};
}

// ---------------------------------------------------------------------------------------------
// Multi-tensor kernels (interpolation, anchor penalty)
// ---------------------------------------------------------------------------------------------

enum WeightMode : int32_t { kWNone = 0, kWScalar = 1, kWRow = 2, kWElem = 3 };

// One tensor of a multi-tensor call, as the device sees it.
//   interpolate forward : x = new,    y = prev,    out = out_k
//   interpolate backward: x = grad,   y = new,     out = grad_new_k
//   anchor              : x = param,  y = anchor,  w = weight, out = grad_p_k (backward)
struct MTEntry {
  const void* x;
  const void* y;
  const void* w;
  void* out;
  int64_t numel;
  int64_t first_chunk;  // global index of the tensor's first chunk (= block of the chunk launch)
  int64_t w_row;        // kWRow: elements per weight entry (p.numel() / p.size(0))
  int32_t w_mode;
  int32_t vec;          // 1: every pointer of the entry allows 4-wide vector access
};

// The entry whose chunks hold global chunk `blk`: the largest k with first_chunk[k] <= blk
// (tensors without chunks share their first_chunk with the next one and are never chosen).
__device__ __forceinline__ int find_entry(const MTEntry* __restrict__ table, int K, int64_t blk) {
  int lo = 0, hi = K - 1;  // invariant: table[lo].first_chunk <= blk (table[0].first_chunk == 0)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid].first_chunk <= blk)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ void mt_load4(const T* base, int64_t e0, int n, bool vec,
                                         float (&out)[4]) {
  if (vec && n == 4) {
    load_vec<T, 4>(base + e0, out);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = i < n ? static_cast<float>(base[e0 + i]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void mt_store4(T* base, int64_t e0, int n, bool vec,
                                          const float (&in)[4]) {
  if (vec && n == 4) {
    store_vec<T, 4>(base + e0, in);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i < n) base[e0 + i] = static_cast<T>(in[i]);
  }
}

// The weights of elements e0 .. e0+n-1 (lanes past n: 1).
template <typename T>
__device__ __forceinline__ void mt_weights4(const MTEntry& en, int64_t e0, int n, float (&w)[4]) {
  const T* wp = static_cast<const T*>(en.w);
  switch (en.w_mode) {
    case kWScalar: {
      const float s = static_cast<float>(wp[0]);
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = s;
      break;
    }
    case kWRow: {  // weight index e / w_row, one division per group
      int64_t q = e0 / en.w_row;
      int64_t r = e0 - q * en.w_row;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        w[i] = i < n ? static_cast<float>(wp[q]) : 1.0f;
        if (++r == en.w_row) {
          r = 0;
          ++q;
        }
      }
      break;
    }
    case kWElem:
      mt_load4(wp, e0, n, en.vec != 0, w);
      break;
    default:
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = 1.0f;
  }
}

enum ReduceKind : int { kSumSq = 0, kDot = 1, kAnchor = 2 };

// Pass 1: partial[blk] = the chunk's sum of x^2 (kSumSq), x*y (kDot) or w (x-y)^2 (kAnchor).
template <typename scalar_t, int KIND>
__global__ void __launch_bounds__(kMTThreads)
    mt_partial_kernel(const MTEntry* __restrict__ table, int K, float* __restrict__ partial) {
  const int64_t blk = blockIdx.x;
  const MTEntry en = table[find_entry(table, K, blk)];
  const int64_t begin = (blk - en.first_chunk) * kChunk;
  const int64_t end = begin + kChunk < en.numel ? begin + kChunk : en.numel;
  const scalar_t* x = static_cast<const scalar_t*>(en.x);
  const scalar_t* y = static_cast<const scalar_t*>(en.y);
  const bool vec = en.vec != 0;
  float acc = 0.0f;
  for (int64_t e0 = begin + 4 * static_cast<int64_t>(threadIdx.x); e0 < end;
       e0 += 4 * kMTThreads) {
    const int n = end - e0 < 4 ? static_cast<int>(end - e0) : 4;
    float xv[4];
    mt_load4(x, e0, n, vec, xv);  // lanes past n are 0: they add nothing
    if (KIND == kSumSq) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc = __fmaf_rn(xv[i], xv[i], acc);
    } else if (KIND == kDot) {
      float yv[4];
      mt_load4(y, e0, n, vec, yv);
#pragma unroll
      for (int i = 0; i < 4; ++i) acc = __fmaf_rn(xv[i], yv[i], acc);
    } else {
      float yv[4], w[4];
      mt_load4(y, e0, n, vec, yv);
      mt_weights4<scalar_t>(en, e0, n, w);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float d = xv[i] - yv[i];
        acc = __fmaf_rn(w[i] * d, d, acc);
      }
    }
  }
  const float s = block_sum(acc);
  if (threadIdx.x == 0) partial[blk] = s;
}

enum FinishKind : int { kFinishNorm = 0, kFinishDot = 1, kFinishSum = 2 };

// Pass 2: one block per tensor k sums its chunks' partials (fixed order), then
//   kFinishNorm: out0[k] = sqrt(sum)                                 (interpolate forward norms)
//   kFinishDot : out0[k] = sum (the dot), out1[k] = inv_i * sum / max(norms[k], eps)  (grad_sigma)
//   kFinishSum : out0[k] = sum                                       (anchor sums)
__global__ void __launch_bounds__(kMTThreads)
    mt_finish_kernel(const MTEntry* __restrict__ table, int K, int64_t total_chunks,
                     const float* __restrict__ partial, int kind, float* __restrict__ out0,
                     float* __restrict__ out1, const float* __restrict__ norms, float inv_i,
                     float eps) {
  const int k = blockIdx.x;
  const int64_t lo = table[k].first_chunk;
  const int64_t hi = k + 1 < K ? table[k + 1].first_chunk : total_chunks;
  float acc = 0.0f;
  for (int64_t c = lo + threadIdx.x; c < hi; c += kMTThreads) acc += partial[c];
  const float s = block_sum(acc);
  if (threadIdx.x != 0) return;
  if (kind == kFinishNorm) {
    out0[k] = __fsqrt_rn(s);
  } else if (kind == kFinishDot) {
    out0[k] = s;
    out1[k] = __fdiv_rn(inv_i * s, fmaxf(norms[k], eps));
  } else {
    out0[k] = s;
  }
}

// Pass 3 of interpolate forward: out = (1 - 1/i) prev + ((1/i) sigma_k / max(norm_k, eps)) new.
template <typename scalar_t>
__global__ void __launch_bounds__(kMTThreads)
    interp_out_kernel(const MTEntry* __restrict__ table, int K, const float* __restrict__ sigma,
                      const float* __restrict__ norms, float c_prev, float inv_i, float eps) {
  const int64_t blk = blockIdx.x;
  const int k = find_entry(table, K, blk);
  const MTEntry en = table[k];
  const int64_t begin = (blk - en.first_chunk) * kChunk;
  const int64_t end = begin + kChunk < en.numel ? begin + kChunk : en.numel;
  const float scale = __fdiv_rn(inv_i * sigma[k], fmaxf(norms[k], eps));
  const scalar_t* nw = static_cast<const scalar_t*>(en.x);
  const scalar_t* pv = static_cast<const scalar_t*>(en.y);
  scalar_t* out = static_cast<scalar_t*>(en.out);
  const bool vec = en.vec != 0;
  for (int64_t e0 = begin + 4 * static_cast<int64_t>(threadIdx.x); e0 < end;
       e0 += 4 * kMTThreads) {
    const int n = end - e0 < 4 ? static_cast<int>(end - e0) : 4;
    float a[4], b[4], o[4];
    mt_load4(pv, e0, n, vec, a);
    mt_load4(nw, e0, n, vec, b);
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = __fmaf_rn(c_prev, a[i], scale * b[i]);
    mt_store4(out, e0, n, vec, o);
  }
}

// Pass 3 of interpolate backward: grad_new = coef (g - proj new), coef = sigma_k / (i nn_k),
// proj = [norms_k > eps] dot_k / nn_k^2.
template <typename scalar_t>
__global__ void __launch_bounds__(kMTThreads)
    interp_grad_kernel(const MTEntry* __restrict__ table, int K, const float* __restrict__ sigma,
                       const float* __restrict__ norms, const float* __restrict__ dots,
                       float inv_i, float eps) {
  const int64_t blk = blockIdx.x;
  const int k = find_entry(table, K, blk);
  const MTEntry en = table[k];
  const int64_t begin = (blk - en.first_chunk) * kChunk;
  const int64_t end = begin + kChunk < en.numel ? begin + kChunk : en.numel;
  const float nk = norms[k];
  const float nn = fmaxf(nk, eps);
  const float coef = __fdiv_rn(sigma[k] * inv_i, nn);
  const float proj = nk > eps ? __fdiv_rn(dots[k], nn * nn) : 0.0f;
  const scalar_t* g = static_cast<const scalar_t*>(en.x);
  const scalar_t* nw = static_cast<const scalar_t*>(en.y);
  scalar_t* out = static_cast<scalar_t*>(en.out);
  const bool vec = en.vec != 0;
  for (int64_t e0 = begin + 4 * static_cast<int64_t>(threadIdx.x); e0 < end;
       e0 += 4 * kMTThreads) {
    const int n = end - e0 < 4 ? static_cast<int>(end - e0) : 4;
    float a[4], b[4], o[4];
    mt_load4(g, e0, n, vec, a);
    mt_load4(nw, e0, n, vec, b);
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = coef * __fmaf_rn(-proj, b[i], a[i]);
    mt_store4(out, e0, n, vec, o);
  }
}

// Anchor backward: grad_p = 2 grad_k w (p - a).
template <typename scalar_t>
__global__ void __launch_bounds__(kMTThreads)
    anchor_grad_kernel(const MTEntry* __restrict__ table, int K, const float* __restrict__ grad) {
  const int64_t blk = blockIdx.x;
  const int k = find_entry(table, K, blk);
  const MTEntry en = table[k];
  const int64_t begin = (blk - en.first_chunk) * kChunk;
  const int64_t end = begin + kChunk < en.numel ? begin + kChunk : en.numel;
  const float g2 = 2.0f * grad[k];
  const scalar_t* p = static_cast<const scalar_t*>(en.x);
  const scalar_t* an = static_cast<const scalar_t*>(en.y);
  scalar_t* out = static_cast<scalar_t*>(en.out);
  const bool vec = en.vec != 0;
  for (int64_t e0 = begin + 4 * static_cast<int64_t>(threadIdx.x); e0 < end;
       e0 += 4 * kMTThreads) {
    const int n = end - e0 < 4 ? static_cast<int>(end - e0) : 4;
    float a[4], b[4], w[4], o[4];
    mt_load4(p, e0, n, vec, a);
    mt_load4(an, e0, n, vec, b);
    mt_weights4<scalar_t>(en, e0, n, w);
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = g2 * w[i] * (a[i] - b[i]);
    mt_store4(out, e0, n, vec, o);
  }
}

// ---------------------------------------------------------------------------------------------
// Multi-tensor host side
// ---------------------------------------------------------------------------------------------

bool aligned_for4(const void* p, int64_t elem_size) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(4 * elem_size) == 0;
}

// The entries on the device, plus the number of chunks. The first_chunk fields are set here.
struct DeviceTable {
  at::Tensor buffer;  // holds the device copy alive until the launches are queued
  const MTEntry* ptr = nullptr;
  int64_t total_chunks = 0;
};

DeviceTable upload_table(std::vector<MTEntry>& entries, const at::Device device,
                         int64_t elem_size) {
  DeviceTable dt;
  int64_t chunks = 0;
  for (MTEntry& e : entries) {
    e.first_chunk = chunks;
    chunks += (e.numel + kChunk - 1) / kChunk;
    const bool w_vec = e.w_mode != kWElem || aligned_for4(e.w, elem_size);
    e.vec = aligned_for4(e.x, elem_size) && aligned_for4(e.y, elem_size) &&
                    aligned_for4(e.out, elem_size) && w_vec
                ? 1
                : 0;
  }
  TORCH_CHECK(chunks < (int64_t{1} << 31), "mmcl_fast: too many elements in one call");
  dt.total_chunks = chunks;
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(MTEntry));
  // Pinned staging + asynchronous copy on the current stream: the copy records its stream on the
  // pinned block, so the caching host allocator does not reuse it before the copy has run.
  at::Tensor host =
      at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), static_cast<size_t>(bytes));
  dt.buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dt.buffer.copy_(host, /*non_blocking=*/true);
  dt.ptr = reinterpret_cast<const MTEntry*>(dt.buffer.const_data_ptr());
  return dt;
}

// Checks a list against the reference list (same length, shapes, dtype, device, contiguous).
void check_list_like(const at::TensorList ref, const at::TensorList other, const char* name) {
  TORCH_CHECK(other.size() == ref.size(), "mmcl_fast: ", name, " has ", other.size(),
              " tensors, expected ", ref.size());
  for (size_t k = 0; k < ref.size(); ++k) {
    TORCH_CHECK(other[k].sizes() == ref[k].sizes(), "mmcl_fast: ", name, "[", k,
                "] has the wrong shape");
    TORCH_CHECK(other[k].scalar_type() == ref[k].scalar_type(), "mmcl_fast: ", name, "[", k,
                "] has the wrong dtype");
    check_cuda(other[k], ref[0].device(), name);
  }
}

void check_list_base(const at::TensorList ts, const char* name) {
  const at::Device device = ts[0].device();
  TORCH_CHECK(ts[0].is_cuda(), "mmcl_fast: ", name, " must be CUDA tensors");
  check_dtype(ts[0], name);
  for (size_t k = 0; k < ts.size(); ++k) {
    check_cuda(ts[k], device, name);
    TORCH_CHECK(ts[k].scalar_type() == ts[0].scalar_type(), "mmcl_fast: ", name,
                " must share one dtype");
  }
}

void check_acc_vector(const at::Tensor& t, int64_t K, const at::Device device, const char* name) {
  check_cuda(t, device, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == K, "mmcl_fast: ", name,
              " must be a float32 [K] tensor with K = ", K, ", got ", t.sizes());
}

template <typename F>
void launch_chunks(int64_t total_chunks, F&& f) {
  if (total_chunks > 0) {
    f(static_cast<unsigned int>(total_chunks));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor> interpolate_weights_forward_cuda(
    at::TensorList prev, at::TensorList new_, const at::Tensor& sigma, double i, double eps) {
  const int64_t K = static_cast<int64_t>(new_.size());
  TORCH_CHECK(i >= 1.0, "mmcl_fast: the snapshot number i must be >= 1, got ", i);
  if (K == 0) return {std::vector<at::Tensor>{}, at::empty({0}, sigma.options().dtype(at::kFloat))};
  check_list_base(new_, "new");
  const at::Device device = new_[0].device();
  check_list_like(new_, prev, "prev");
  check_acc_vector(sigma, K, device, "sigma");
  TORCH_CHECK(K < (int64_t{1} << 31), "mmcl_fast: too many tensors");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> outs;
  outs.reserve(K);
  std::vector<MTEntry> entries(K);
  for (int64_t k = 0; k < K; ++k) {
    outs.push_back(at::empty_like(new_[k]));
    MTEntry& e = entries[k];
    std::memset(&e, 0, sizeof(e));
    e.x = new_[k].const_data_ptr();
    e.y = prev[k].const_data_ptr();
    e.out = outs.back().data_ptr();
    e.numel = new_[k].numel();
  }
  DeviceTable dt = upload_table(entries, device, new_[0].element_size());
  at::Tensor norms = at::empty({K}, sigma.options());
  at::Tensor partial = at::empty({std::max<int64_t>(dt.total_chunks, 1)}, sigma.options());
  const float inv_i = static_cast<float>(1.0 / i);
  const float c_prev = static_cast<float>(1.0 - 1.0 / i);
  const float feps = static_cast<float>(eps);
  const int k32 = static_cast<int>(K);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MMCL_DISPATCH_FHB(new_[0].scalar_type(), "interpolate_weights_forward_cuda", [&] {
    launch_chunks(dt.total_chunks, [&](unsigned int g) {
      mt_partial_kernel<scalar_t, kSumSq><<<g, kMTThreads, 0, stream>>>(dt.ptr, k32,
                                                                       partial.data_ptr<float>());
    });
    mt_finish_kernel<<<k32, kMTThreads, 0, stream>>>(dt.ptr, k32, dt.total_chunks,
                                                     partial.const_data_ptr<float>(), kFinishNorm,
                                                     norms.data_ptr<float>(), nullptr, nullptr,
                                                     inv_i, feps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_chunks(dt.total_chunks, [&](unsigned int g) {
      interp_out_kernel<scalar_t><<<g, kMTThreads, 0, stream>>>(
          dt.ptr, k32, sigma.const_data_ptr<float>(), norms.const_data_ptr<float>(), c_prev,
          inv_i, feps);
    });
  });
  return {outs, norms};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> interpolate_weights_backward_cuda(
    at::TensorList grad_out, at::TensorList new_, const at::Tensor& sigma, const at::Tensor& norms,
    double i, double eps) {
  const int64_t K = static_cast<int64_t>(new_.size());
  TORCH_CHECK(i >= 1.0, "mmcl_fast: the snapshot number i must be >= 1, got ", i);
  if (K == 0) return {std::vector<at::Tensor>{}, at::empty({0}, sigma.options().dtype(at::kFloat))};
  check_list_base(new_, "new");
  const at::Device device = new_[0].device();
  check_list_like(new_, grad_out, "grad_out");
  check_acc_vector(sigma, K, device, "sigma");
  check_acc_vector(norms, K, device, "norms");
  TORCH_CHECK(K < (int64_t{1} << 31), "mmcl_fast: too many tensors");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> grads;
  grads.reserve(K);
  std::vector<MTEntry> entries(K);
  for (int64_t k = 0; k < K; ++k) {
    grads.push_back(at::empty_like(new_[k]));
    MTEntry& e = entries[k];
    std::memset(&e, 0, sizeof(e));
    e.x = grad_out[k].const_data_ptr();
    e.y = new_[k].const_data_ptr();
    e.out = grads.back().data_ptr();
    e.numel = new_[k].numel();
  }
  DeviceTable dt = upload_table(entries, device, new_[0].element_size());
  at::Tensor dots = at::empty({K}, sigma.options());
  at::Tensor grad_sigma = at::empty({K}, sigma.options());
  at::Tensor partial = at::empty({std::max<int64_t>(dt.total_chunks, 1)}, sigma.options());
  const float inv_i = static_cast<float>(1.0 / i);
  const float feps = static_cast<float>(eps);
  const int k32 = static_cast<int>(K);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MMCL_DISPATCH_FHB(new_[0].scalar_type(), "interpolate_weights_backward_cuda", [&] {
    launch_chunks(dt.total_chunks, [&](unsigned int g) {
      mt_partial_kernel<scalar_t, kDot><<<g, kMTThreads, 0, stream>>>(dt.ptr, k32,
                                                                     partial.data_ptr<float>());
    });
    mt_finish_kernel<<<k32, kMTThreads, 0, stream>>>(
        dt.ptr, k32, dt.total_chunks, partial.const_data_ptr<float>(), kFinishDot,
        dots.data_ptr<float>(), grad_sigma.data_ptr<float>(), norms.const_data_ptr<float>(), inv_i,
        feps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_chunks(dt.total_chunks, [&](unsigned int g) {
      interp_grad_kernel<scalar_t><<<g, kMTThreads, 0, stream>>>(
          dt.ptr, k32, sigma.const_data_ptr<float>(), norms.const_data_ptr<float>(),
          dots.const_data_ptr<float>(), inv_i, feps);
    });
  });
  return {grads, grad_sigma};
}

// The anchor entries (x = param, y = anchor, w = weight with its mode); out set by the caller.
std::vector<MTEntry> anchor_entries(at::TensorList params, at::TensorList anchors,
                                    const c10::List<std::optional<at::Tensor>>& weights) {
  const int64_t K = static_cast<int64_t>(params.size());
  TORCH_CHECK(weights.size() == params.size(), "mmcl_fast: weights must have one entry per "
              "parameter (None for none)");
  const at::Device device = params[0].device();
  std::vector<MTEntry> entries(K);
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& p = params[k];
    MTEntry& e = entries[k];
    std::memset(&e, 0, sizeof(e));
    e.x = p.const_data_ptr();
    e.y = anchors[k].const_data_ptr();
    e.numel = p.numel();
    e.w_mode = kWNone;
    const std::optional<at::Tensor> w = weights.get(k);
    if (!w.has_value() || p.numel() == 0) continue;
    check_cuda(*w, device, "weights");
    TORCH_CHECK(w->scalar_type() == p.scalar_type(), "mmcl_fast: weights[", k,
                "] must have the parameter's dtype");
    e.w = w->const_data_ptr();
    if (w->numel() == 1) {
      e.w_mode = kWScalar;
    } else if (w->dim() == 1 && p.dim() > 1 && w->numel() == p.size(0)) {
      e.w_mode = kWRow;
      e.w_row = p.numel() / p.size(0);
    } else {
      TORCH_CHECK(w->numel() == p.numel(), "mmcl_fast: weights[", k, "] must hold 1, one per row "
                  "(p.size(0)) or one per element values, got ", w->sizes(), " for ", p.sizes());
      e.w_mode = kWElem;
    }
  }
  return entries;
}

at::Tensor anchor_penalty_forward_cuda(at::TensorList params, at::TensorList anchors,
                                       const c10::List<std::optional<at::Tensor>>& weights) {
  const int64_t K = static_cast<int64_t>(params.size());
  if (K == 0)
    return at::empty({0}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
  check_list_base(params, "params");
  const at::Device device = params[0].device();
  check_list_like(params, anchors, "anchors");
  TORCH_CHECK(K < (int64_t{1} << 31), "mmcl_fast: too many tensors");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<MTEntry> entries = anchor_entries(params, anchors, weights);
  DeviceTable dt = upload_table(entries, device, params[0].element_size());
  const at::TensorOptions fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor sums = at::empty({K}, fopts);
  at::Tensor partial = at::empty({std::max<int64_t>(dt.total_chunks, 1)}, fopts);
  const int k32 = static_cast<int>(K);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MMCL_DISPATCH_FHB(params[0].scalar_type(), "anchor_penalty_forward_cuda", [&] {
    launch_chunks(dt.total_chunks, [&](unsigned int g) {
      mt_partial_kernel<scalar_t, kAnchor><<<g, kMTThreads, 0, stream>>>(
          dt.ptr, k32, partial.data_ptr<float>());
    });
  });
  mt_finish_kernel<<<k32, kMTThreads, 0, stream>>>(dt.ptr, k32, dt.total_chunks,
                                                   partial.const_data_ptr<float>(), kFinishSum,
                                                   sums.data_ptr<float>(), nullptr, nullptr, 1.0f,
                                                   0.0f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sums;
}

std::vector<at::Tensor> anchor_penalty_backward_cuda(
    const at::Tensor& grad, at::TensorList params, at::TensorList anchors,
    const c10::List<std::optional<at::Tensor>>& weights) {
  const int64_t K = static_cast<int64_t>(params.size());
  if (K == 0) return {};
  check_list_base(params, "params");
  const at::Device device = params[0].device();
  check_list_like(params, anchors, "anchors");
  check_acc_vector(grad, K, device, "grad");
  TORCH_CHECK(K < (int64_t{1} << 31), "mmcl_fast: too many tensors");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<MTEntry> entries = anchor_entries(params, anchors, weights);
  std::vector<at::Tensor> grads;
  grads.reserve(K);
  for (int64_t k = 0; k < K; ++k) {
    grads.push_back(at::empty_like(params[k]));
    entries[k].out = grads.back().data_ptr();
  }
  DeviceTable dt = upload_table(entries, device, params[0].element_size());
  const int k32 = static_cast<int>(K);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MMCL_DISPATCH_FHB(params[0].scalar_type(), "anchor_penalty_backward_cuda", [&] {
    launch_chunks(dt.total_chunks, [&](unsigned int g) {
      anchor_grad_kernel<scalar_t><<<g, kMTThreads, 0, stream>>>(dt.ptr, k32,
                                                                 grad.const_data_ptr<float>());
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CUDA, m) {
  m.impl("modulated_embedding_forward", &modulated_embedding_forward_cuda);
  m.impl("modulated_embedding_backward", &modulated_embedding_backward_cuda);
  m.impl("interpolate_weights_forward", &interpolate_weights_forward_cuda);
  m.impl("interpolate_weights_backward", &interpolate_weights_backward_cuda);
  m.impl("anchor_penalty_forward", &anchor_penalty_forward_cuda);
  m.impl("anchor_penalty_backward", &anchor_penalty_backward_cuda);
}

}  // namespace mmcl_fast

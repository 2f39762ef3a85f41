// Op family C on CUDA, part 2: filtered link-prediction ranking without the score matrix. Same
// arguments, checks and results as csrc/cpu/filtered_rank.cpp; the contract is
// mmcl_fast/ops/filtered_rank.py. dtypes: float32, float16, bfloat16 (scores in float32).
//
// The maths: for query b (q = queries[b]), candidate c < C (e = entities[c]), target t_b:
//     0 transe_l1 : s = -sum_d |q_d - e_d|          1 transe_l2 : s = -sum_d (q_d - e_d)^2
//     2 distmult, 3 complex, 5 dot : s = sum_d q_d e_d
//     4 rotate    : s = -sum_{k<D/2} sqrt((q_k - e_k)^2 + (q_{k+D/2} - e_{k+D/2})^2)
//     t = s(b, t_b)
//     greater_b = #{c < C : c != t_b, c not in filter row b, s(b, c) >  t}
//     equal_b   = #{c < C : c != t_b, c not in filter row b, s(b, c) == t}
// (NaN: a NaN score compares false with everything, so a NaN candidate counts in neither and a
// NaN target counts nothing.)
//
// Ties must be exact: every score (the target's, each candidate's in the tiles, each filtered
// entry's) is the same sequential float32 accumulation over the features in the same order,
// acc_0 = 0, acc_{t+1} = step(acc_t, q, e), with explicitly rounded intrinsics (__fadd_rn,
// __fmaf_rn, __fsqrt_rn) so that neither --use_fast_math nor FMA contraction can make two code
// paths round differently. For rotate the features are the pairs (k, k + D/2), k = 0 .. D/2-1.
//
// Design (memory O(B + tile * D), never [B, N]):
//  1. rank_prep_kernel, one warp per query: lane 0 computes the target's score t_b (stored for
//     the tiles); the lanes then walk the filter row (CSR, sorted ascending) and count, for every
//     entry c < C, c != t_b, not equal to its predecessor (duplicates once), s(b, c) > t and == t;
//     these counts are SUBTRACTED from greater/equal (unsigned 64-bit wrap-around: the tiles add
//     them back, so the final value is exact).
//  2. rank_tile_kernel: a block owns kTQ = 64 queries and loops over candidate tiles of kTC = 64
//     (a grid-stride loop along blockIdx.y). Per tile, the features are streamed in chunks of kKD
//     = 32 through shared memory (queries and candidates converted to float32, feature-major);
//     each of the 256 threads accumulates a 4 x 4 block of (query, candidate) scores in
//     registers, then compares them with its queries' t and counts c < C, c != t_b in registers.
//     At the end of the block the counts are reduced over the 16 threads sharing a query
//     (shuffles) and added with one 64-bit atomic per query and counter.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "dispatch.h"

namespace mmcl_fast {
namespace {


// The kernels' score kinds: distmult, complex and dot are one dot product.
enum ScoreKind : int { kL1 = 0, kL2 = 1, kDot = 2, kRotate = 4 };

constexpr int kTQ = 64;   // queries per block
constexpr int kTC = 64;   // candidates per tile
constexpr int kKD = 32;   // features per shared-memory chunk (even: rotate pairs never straddle)
constexpr int kRQ = 4;    // queries per thread
constexpr int kRC = 4;    // candidates per thread
constexpr int kTX = kTC / kRC;             // 16 threads along the candidates
constexpr int kTileThreads = (kTQ / kRQ) * kTX;  // 256
constexpr int kPad = 4;   // row padding of the shared tiles (keeps float4 alignment)
constexpr int kPrepThreads = 256;
static_assert(kKD % 2 == 0, "rotate pairs must not straddle a chunk");
static_assert(kRQ == 4 && kRC == 4, "the inner loop reads float4 rows");
static_assert(kTX == 16, "the count reduction shuffles over 16 lanes (half a warp)");
static_assert((kTQ * kKD) % kTileThreads == 0 && (kTC * kKD) % kTileThreads == 0,
              "staging loops are whole rounds");

// ---------------------------------------------------------------------------------------------
// The score: one accumulation step, and the final sign (higher is better)
// ---------------------------------------------------------------------------------------------

template <int KIND>
__device__ __forceinline__ float score_step(float acc, float q, float e) {
  if (KIND == kL1) return __fadd_rn(acc, fabsf(__fsub_rn(q, e)));
  if (KIND == kL2) {
    const float d = __fsub_rn(q, e);
    return __fmaf_rn(d, d, acc);
  }
  return __fmaf_rn(q, e, acc);  // kDot
}

// rotate: one (re, im) pair
__device__ __forceinline__ float rotate_step(float acc, float qr, float qi, float er, float ei) {
  const float dr = __fsub_rn(qr, er);
  const float di = __fsub_rn(qi, ei);
  return __fadd_rn(acc, __fsqrt_rn(__fmaf_rn(dr, dr, __fmul_rn(di, di))));
}

template <int KIND>
__device__ __forceinline__ float score_finish(float acc) {
  return KIND == kDot ? acc : -acc;  // distances: higher score = smaller distance (exact)
}

// The global feature (column) of feature position t: rotate interleaves the halves so that the
// pair (k, k + D/2) sits at positions (2k, 2k + 1); the others keep the natural order.
template <int KIND>
__device__ __forceinline__ int64_t feature_dim(int64_t t, int64_t D) {
  if (KIND == kRotate) return (t & 1) ? (t >> 1) + (D >> 1) : (t >> 1);
  return t;
}

// The score of one (query, entity) pair, sequentially over the features: the reference order
// every other path reproduces.
template <int KIND, typename scalar_t>
__device__ float score_seq(const scalar_t* __restrict__ q, const scalar_t* __restrict__ e,
                           int64_t D) {
  float acc = 0.0f;
  if (KIND == kRotate) {
    const int64_t h = D >> 1;
#pragma unroll 8
    for (int64_t k = 0; k < h; ++k)
      acc = rotate_step(acc, static_cast<float>(q[k]), static_cast<float>(q[k + h]),
                        static_cast<float>(e[k]), static_cast<float>(e[k + h]));
  } else {
    // unrolled: the loads of 8 features are issued together; the sum stays one sequential chain
#pragma unroll 8
    for (int64_t d = 0; d < D; ++d)
      acc = score_step<KIND>(acc, static_cast<float>(q[d]), static_cast<float>(e[d]));
  }
  return score_finish<KIND>(acc);
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// One warp per query b: t_b into tscore[b], and minus the filtered counts into greater / equal.
template <typename scalar_t, int KIND>
__global__ void __launch_bounds__(kPrepThreads)
    rank_prep_kernel(const scalar_t* __restrict__ queries, const scalar_t* __restrict__ entities,
                     const int64_t* __restrict__ target, const int64_t* __restrict__ indptr,
                     const int64_t* __restrict__ indices, int64_t B, int64_t C, int64_t D,
                     int64_t nnz, float* __restrict__ tscore,
                     unsigned long long* __restrict__ greater,
                     unsigned long long* __restrict__ equal) {
  constexpr int kWarps = kPrepThreads / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < B;
       b += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t tg = target[b];
    CUDA_KERNEL_ASSERT(tg >= 0 && tg < C);
    const scalar_t* q = queries + b * D;
    float t = 0.0f;
    if (lane == 0) {
      t = score_seq<KIND>(q, entities + tg * D, D);
      tscore[b] = t;
    }
    t = __shfl_sync(0xffffffffu, t, 0);
    const int64_t lo = indptr[b];
    const int64_t hi = indptr[b + 1];
    CUDA_KERNEL_ASSERT(lo >= 0 && lo <= hi && hi <= nnz);
    unsigned long long ng = 0, ne = 0;
    for (int64_t j = lo + lane; j < hi; j += 32) {
      const int64_t c = indices[j];
      CUDA_KERNEL_ASSERT(c >= 0);
      if (c >= C || c == tg) continue;              // not a candidate / the target itself
      if (j > lo && indices[j - 1] == c) continue;  // a duplicate: its first entry counts it
      const float s = score_seq<KIND>(q, entities + c * D, D);
      ng += s > t ? 1ull : 0ull;
      ne += s == t ? 1ull : 0ull;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      ng += __shfl_xor_sync(0xffffffffu, ng, off);
      ne += __shfl_xor_sync(0xffffffffu, ne, off);
    }
    // subtract (two's complement add): the tiles count these candidates once more
    if (lane == 0 && ng != 0) atomicAdd(greater + b, ~ng + 1ull);
    if (lane == 0 && ne != 0) atomicAdd(equal + b, ~ne + 1ull);
  }
}

// Streams candidate tiles against the block's kTQ queries; counts over c < C, c != t_b.
// Thread (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16) owns queries q0 + 4 ty + i and the
// candidates c0 + 4 tx + j (i, j < 4) of each tile.
template <typename scalar_t, int KIND>
__global__ void __launch_bounds__(kTileThreads, 2)
    rank_tile_kernel(const scalar_t* __restrict__ queries, const scalar_t* __restrict__ entities,
                     const int64_t* __restrict__ target, const float* __restrict__ tscore,
                     int64_t B, int64_t C, int64_t D, unsigned long long* __restrict__ greater,
                     unsigned long long* __restrict__ equal) {
  // feature-major tiles: qs[k][r] = feature d0 + k of query q0 + r (0 outside the ranges)
  __shared__ __align__(16) float qs[kKD][kTQ + kPad];
  __shared__ __align__(16) float es[kKD][kTC + kPad];
  __shared__ float s_t[kTQ];        // the block's queries' target scores
  __shared__ int64_t s_target[kTQ];  // and target ids (-1 past B: never equal to a candidate)
  const int tid = threadIdx.x;
  const int tx = tid % kTX;
  const int ty = tid / kTX;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTQ;
  for (int r = tid; r < kTQ; r += kTileThreads) {
    const int64_t b = q0 + r;
    s_t[r] = b < B ? tscore[b] : 0.0f;
    s_target[r] = b < B ? target[b] : -1;
  }
  __syncthreads();
  unsigned int cg[kRQ] = {0u, 0u, 0u, 0u};  // per thread: at most C candidates each
  unsigned int ce[kRQ] = {0u, 0u, 0u, 0u};

  const int64_t n_ctiles = (C + kTC - 1) / kTC;
  for (int64_t ct = blockIdx.y; ct < n_ctiles; ct += gridDim.y) {
    const int64_t c0 = ct * kTC;
    float acc[kRQ][kRC];
#pragma unroll
    for (int i = 0; i < kRQ; ++i)
#pragma unroll
      for (int j = 0; j < kRC; ++j) acc[i][j] = 0.0f;

    for (int64_t d0 = 0; d0 < D; d0 += kKD) {
      __syncthreads();  // the previous chunk's reads are done
#pragma unroll
      for (int it = 0; it < kTQ * kKD / kTileThreads; ++it) {
        const int idx = tid + it * kTileThreads;
        const int r = idx / kKD;
        const int k = idx % kKD;  // consecutive threads: consecutive features (coalesced)
        const int64_t t = d0 + k;
        const int64_t b = q0 + r;
        qs[k][r] = (b < B && t < D)
                       ? static_cast<float>(queries[b * D + feature_dim<KIND>(t, D)])
                       : 0.0f;
      }
#pragma unroll
      for (int it = 0; it < kTC * kKD / kTileThreads; ++it) {
        const int idx = tid + it * kTileThreads;
        const int r = idx / kKD;
        const int k = idx % kKD;
        const int64_t t = d0 + k;
        const int64_t c = c0 + r;
        es[k][r] = (c < C && t < D)
                       ? static_cast<float>(entities[c * D + feature_dim<KIND>(t, D)])
                       : 0.0f;
      }
      __syncthreads();
      // features d0 .. d0 + kmax - 1, in order (kmax is even for rotate: D is even)
      const int kmax = D - d0 < kKD ? static_cast<int>(D - d0) : kKD;
      auto step = [&](int k) {
        const float4 qa = *reinterpret_cast<const float4*>(&qs[k][ty * kRQ]);
        const float4 ea = *reinterpret_cast<const float4*>(&es[k][tx * kRC]);
        const float qv[kRQ] = {qa.x, qa.y, qa.z, qa.w};
        const float ev[kRC] = {ea.x, ea.y, ea.z, ea.w};
        if (KIND == kRotate) {  // positions k (re) and k + 1 (im) of the pair
          const float4 qb = *reinterpret_cast<const float4*>(&qs[k + 1][ty * kRQ]);
          const float4 eb = *reinterpret_cast<const float4*>(&es[k + 1][tx * kRC]);
          const float qw[kRQ] = {qb.x, qb.y, qb.z, qb.w};
          const float ew[kRC] = {eb.x, eb.y, eb.z, eb.w};
#pragma unroll
          for (int i = 0; i < kRQ; ++i)
#pragma unroll
            for (int j = 0; j < kRC; ++j)
              acc[i][j] = rotate_step(acc[i][j], qv[i], qw[i], ev[j], ew[j]);
        } else {
#pragma unroll
          for (int i = 0; i < kRQ; ++i)
#pragma unroll
            for (int j = 0; j < kRC; ++j) acc[i][j] = score_step<KIND>(acc[i][j], qv[i], ev[j]);
        }
      };
      constexpr int kStep = KIND == kRotate ? 2 : 1;
      if (kmax == kKD) {
#pragma unroll 8
        for (int k = 0; k < kKD; k += kStep) step(k);
      } else {
        for (int k = 0; k < kmax; k += kStep) step(k);
      }
    }

#pragma unroll
    for (int i = 0; i < kRQ; ++i) {
      const int r = ty * kRQ + i;
      const float t = s_t[r];
      const int64_t tg = s_target[r];
      const bool valid = q0 + r < B;
#pragma unroll
      for (int j = 0; j < kRC; ++j) {
        const int64_t c = c0 + tx * kRC + j;
        if (valid && c < C && c != tg) {
          const float s = score_finish<KIND>(acc[i][j]);
          cg[i] += s > t ? 1u : 0u;
          ce[i] += s == t ? 1u : 0u;
        }
      }
    }
  }

  // Sum over the 16 threads (tx) sharing a query: lanes 0-15 or 16-31 of the warp.
#pragma unroll
  for (int i = 0; i < kRQ; ++i) {
    unsigned long long g = cg[i], e = ce[i];
#pragma unroll
    for (int off = kTX / 2; off > 0; off >>= 1) {
      g += __shfl_xor_sync(0xffffffffu, g, off);
      e += __shfl_xor_sync(0xffffffffu, e, off);
    }
    const int64_t b = q0 + ty * kRQ + i;
    if (tx == 0 && b < B) {
      if (g != 0) atomicAdd(greater + b, g);
      if (e != 0) atomicAdd(equal + b, e);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

void check_dev(const at::Tensor& t, const at::Device device, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "mmcl_fast: ", name, " must be on ", device,
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "mmcl_fast: ", name, " must be contiguous");
}

template <typename scalar_t, int KIND>
void launch_rank(const at::Tensor& queries, const at::Tensor& entities, const at::Tensor& target,
                 const at::Tensor& indptr, const at::Tensor& indices, int64_t C, at::Tensor& tscore,
                 at::Tensor& greater, at::Tensor& equal) {
  const int64_t B = queries.size(0);
  const int64_t D = queries.size(1);
  const int64_t nnz = indices.numel();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* qp = queries.const_data_ptr<scalar_t>();
  const scalar_t* ep = entities.const_data_ptr<scalar_t>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  auto* gp = reinterpret_cast<unsigned long long*>(greater.data_ptr<int64_t>());
  auto* eqp = reinterpret_cast<unsigned long long*>(equal.data_ptr<int64_t>());
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "64-bit counters");

  const int64_t prep_grid = std::min<int64_t>((B + kPrepThreads / 32 - 1) / (kPrepThreads / 32), 65535);
  rank_prep_kernel<scalar_t, KIND><<<prep_grid, kPrepThreads, 0, stream>>>(
      qp, ep, tp, indptr.const_data_ptr<int64_t>(), indices.const_data_ptr<int64_t>(), B, C, D,
      nnz, tscore.data_ptr<float>(), gp, eqp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t qtiles = (B + kTQ - 1) / kTQ;
  const int64_t ctiles = (C + kTC - 1) / kTC;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // about 4 blocks per SM in all; each block loops over ctiles / grid.y candidate tiles
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>({ctiles, (4 * sms + qtiles - 1) / qtiles, 65535}));
  TORCH_CHECK(qtiles < (int64_t{1} << 31), "mmcl_fast: too many queries");
  const dim3 grid(static_cast<unsigned int>(qtiles), static_cast<unsigned int>(splits));
  rank_tile_kernel<scalar_t, KIND><<<grid, kTileThreads, 0, stream>>>(
      qp, ep, tp, tscore.const_data_ptr<float>(), B, C, D, gp, eqp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> filtered_rank_counts_cuda(
    const at::Tensor& queries, const at::Tensor& entities, const at::Tensor& target,
    const at::Tensor& filter_indptr, const at::Tensor& filter_indices, int64_t score,
    int64_t num_candidates) {
  TORCH_CHECK(queries.is_cuda(), "mmcl_fast: queries must be a CUDA tensor");
  const at::Device device = queries.device();
  check_dev(queries, device, "queries");
  check_dev(entities, device, "entities");
  check_dev(target, device, "target");
  check_dev(filter_indptr, device, "filter_indptr");
  check_dev(filter_indices, device, "filter_indices");
  const at::ScalarType st = queries.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "mmcl_fast: queries must be float32, float16 or bfloat16 on CUDA, got ", st);
  TORCH_CHECK(entities.scalar_type() == st, "mmcl_fast: entities must have the queries' dtype");
  TORCH_CHECK(queries.dim() == 2 && entities.dim() == 2 && entities.size(1) == queries.size(1),
              "mmcl_fast: queries [B, D] and entities [N, D] expected, got ", queries.sizes(),
              " and ", entities.sizes());
  const int64_t B = queries.size(0);
  const int64_t D = queries.size(1);
  const int64_t N = entities.size(0);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == B,
              "mmcl_fast: target must be int64 [B]");
  TORCH_CHECK(filter_indptr.scalar_type() == at::kLong && filter_indptr.dim() == 1 &&
                  filter_indptr.size(0) == B + 1,
              "mmcl_fast: filter_indptr must be int64 [B + 1]");
  TORCH_CHECK(filter_indices.scalar_type() == at::kLong && filter_indices.dim() == 1,
              "mmcl_fast: filter_indices must be int64 [nnz]");
  TORCH_CHECK(score >= 0 && score <= 5, "mmcl_fast: unknown score id ", score);
  TORCH_CHECK((score != 3 && score != 4) || D % 2 == 0,
              "mmcl_fast: complex and rotate scores need an even D, got ", D);
  const c10::cuda::CUDAGuard guard(device);
  const at::TensorOptions lopts = target.options();
  at::Tensor greater = at::zeros({B}, lopts);
  at::Tensor equal = at::zeros({B}, lopts);
  if (B == 0) return {greater, equal};
  TORCH_CHECK(num_candidates >= 1 && num_candidates <= N,
              "mmcl_fast: num_candidates must be in [1, N] = [1, ", N, "], got ", num_candidates);
  TORCH_CHECK(num_candidates < (int64_t{1} << 32), "mmcl_fast: too many candidates");
  at::Tensor tscore = at::empty({B}, queries.options().dtype(at::kFloat));
  MMCL_DISPATCH_FHB(st, "filtered_rank_counts_cuda", [&] {
    switch (score) {
      case 0:
        launch_rank<scalar_t, kL1>(queries, entities, target, filter_indptr, filter_indices,
                                   num_candidates, tscore, greater, equal);
        break;
      case 1:
        launch_rank<scalar_t, kL2>(queries, entities, target, filter_indptr, filter_indices,
                                   num_candidates, tscore, greater, equal);
        break;
      case 4:
        launch_rank<scalar_t, kRotate>(queries, entities, target, filter_indptr, filter_indices,
                                       num_candidates, tscore, greater, equal);
        break;
      default:  // 2 distmult, 3 complex, 5 dot
        launch_rank<scalar_t, kDot>(queries, entities, target, filter_indptr, filter_indices,
                                    num_candidates, tscore, greater, equal);
    }
  });
  return {greater, equal};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CUDA, m) {
  m.impl("filtered_rank_counts", &filtered_rank_counts_cuda);
}

}  // namespace mmcl_fast

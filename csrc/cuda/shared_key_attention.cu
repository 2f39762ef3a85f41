// Op family B on CUDA: shared-key attention, flash-style, with the column sums of P.
// Same arguments, checks and results as the CPU kernel (maths: DESIGN.md 5.2), for float32, float16
// and bfloat16 (fp32 accumulation, lse and colsum float32); float64 is rejected with an error.
//
// The maths, per (b, h):
//     S_ij = scale * q_i . k_j + bias_ij          (-inf where key j is padded)
//     lse_i = log sum_j exp(S_ij)    P_ij = exp(S_ij - lse_i)    out_i = sum_j P_ij v_j
//     colsum_j = sum over valid queries i (query_padding_mask false) of P_ij
// A row whose scores are all -inf is empty: out_i = 0, lse_i = +inf (so exp(S - lse) = 0 later).
// Dropout on P (dropout_p > 0): out_i = sum_j P_ij Z_ij v_j with Z_ij = keep_ij / (1 - p), where
//     (x0, x1, x2, x3) = Philox4x32-10(counter (j >> 2, i, b H + h, 0x64726F70), key (seed lo, hi))
//     keep_ij = (x_(j & 3) >> 8) >= ceil(p 2^24)
// (dropout_keep in mmcl_fast/ops/shared_key_attention.py). A counter-based mask needs no state
// between the passes: the backward redraws the forward's mask from (p, seed) alone, and since the
// counter names (i, j) and not a tile, the CPU, Triton and CUDA kernels draw the same mask.
// lse and colsum stay those of the undropped P: the dropout is on what multiplies v, not on the
// softmax (the colsum feeds the pooled-map losses, which must not be noisy).
// Backward, with G_j = grad_colsum[b, h, j], gw_i = grad_width[b, h, i], gu_j = grad_height[b, h, j]
// (each 0 when None), valid_i = qv_i = !query_padding_mask[b, i], kv_j = !key_padding_mask[b, j],
// Z = 1 without dropout, out the (dropped) output the forward returned:
//     dP_ij = Z_ij grad_out_i . v_j + G_j valid_i   Delta_i = grad_out_i . out_i + valid_i sum_j P_ij G_j
//     dS_ij = P_ij (dP_ij - Delta_i) + qv_i kv_j (gw_i + gu_j)
//     dbias_ij = dS_ij (summed over b when Bb == 1)
//     dq_i = scale sum_j dS_ij k_j    dk_j = scale sum_i dS_ij q_i (summed over b when Bk == 1)
//     dv_j = sum_i P_ij Z_ij grad_out_i
// Delta keeps its form: sum_j P_ij Z_ij (grad_out_i . v_j) = grad_out_i . out_i with the dropped
// out, and the colsum term is of the undropped P, so G enters dP without Z.
// The gw, gu terms are the gradient through the pooled score maps w_i = qv_i sum_j kv_j S_ij and
// u_j = kv_j sum_i qv_i S_ij (below): w and u are linear in S, so it does not pass through the
// softmax and is not times P (it is there where P = 0, on an empty row too). Both masks are
// applied here, so gw and gu may come masked or not.
//
// The pooled score maps (ska_score_maps), per (b, h), by their closed forms (no S):
//     ksum = sum_j kv_j k_j      qsum = sum_i qv_i q_i
//     w_i = qv_i (scale q_i . ksum + sum_j kv_j bias_ij)      u_j = kv_j (scale qsum . k_j + sum_i qv_i bias_ij)
// and, for each side (x = w against t = teacher_width, x = u against t = teacher_height) whose
// teacher is given, with n(y) = y / max(||y||, 1e-12) when normalizing, else n(y) = y:
//     r = ReLU(n(t) - n(x))     d_x = ||r||     dist = d_w + d_u (0 for a side with no teacher)
//     g_n = -r / d_x (0 when d_x = 0)
//     grad_x = normalize ? (||x|| > 1e-12 ? (g_n - n(x) (n(x) . g_n)) / ||x|| : g_n / 1e-12) : g_n
// times qv (for w) or kv (for u): the gradient of dist[b, h] itself, not of the mean the loss
// takes (the caller scales it). Padded positions hold 0 in width, height and grad_*.
//
// Design (fp32 scalar FMAs from shared memory, no tensor cores; no [B, H, Lq, Lk] scratch):
//  * Every kernel but the Delta dot runs 128 threads = 4 warps. A warp is 4 "row groups" of 8
//    lanes (ty = 4 * warp + lane / 8 in 0..15, tx = lane % 8). Score tiles [R, C] are split as
//    rows ty*TM .. ty*TM+TM-1, columns tx + 8 j; head-dim tiles [R, DP] as rows ty*TM + i,
//    columns 32 c + 4 tx + e (float4 accesses). Tiles are staged in shared memory as fp32 with a
//    row stride DP + 4 (float4-aligned, and the 8 lanes of a quarter warp that read 8 different
//    rows at one column land on 8 different 16-byte bank groups). Row reductions are shuffles
//    across the 8 lanes of a row group (xor 1, 2, 4), column reductions across the 4 row groups
//    of a warp (xor 8, 16).
//  * The head dim is padded to a bucket DP in {32, 64, 96, 128, 192, 256} (a template argument:
//    register arrays need compile-time sizes); padded columns are zero in shared memory, the dot
//    products stop at D rounded up to 4, nothing past D is stored. Tile sizes come from DP so
//    that shared memory stays under 99 KB (the opt-in limit of every card from sm_80 on; above
//    48 KB it is requested with cudaFuncAttributeMaxDynamicSharedMemorySize).
//  * Forward (ska_fwd_kernel, one CTA per (b, h, BM queries)): loop over key tiles of BN keys
//    (k, v, the key flags in shared memory), online softmax (running max m, per-lane partial sum
//    l, accumulator rescaled by exp(m_old - m_new)); P of the tile goes through shared memory,
//    per warp (each warp owns its query rows, so __syncwarp is enough there). Then, only when
//    colsum is asked for, a second sweep over the key tiles with the final lse: P recomputed,
//    summed over the CTA's valid rows (shuffles, then shared atomics across the 4 warps), one
//    global fp32 atomicAdd per key per CTA into colsum (zeroed first).
//  * Dropout (dropout_tile): one Philox call gives the words of 4 neighbouring keys, but in the
//    score layout those keys sit in 4 different lanes (columns tx + 8 j). So Z is applied in a
//    pass of its own over the P tile in shared memory, lane per (row, group of 4 keys), float4 at
//    a time: a quarter of the Philox calls of a per-element draw, and nothing added to the
//    register-heavy score loop. The forward scales its P tile in place after the row sums have
//    taken the undropped P; the backward writes Z into the dS tile first, and the score loop
//    reads it back for P Z (into the P tile, for dv) and Z dO.v (into dS). A warp owns its tile
//    rows in both kernels, so __syncwarp orders the pass. The seed is read on the device (no
//    host sync) and only when dropout is on. thr = 0 means no dropout: a uniform branch skips the
//    pass, and the backward's score loop is instantiated for both cases, so that the p = 0 code
//    keeps its shape (with a runtime test per element, the SASS instruction mix of the p = 0 path
//    changed; compared once with nvcc 13.0 for sm_90 outside the repo, not timed on a GPU).
//  * Backward: Delta_i = grad_out_i . out_i (ska_delta_kernel, a warp per row); when grad_colsum
//    is given, the forward kernel in "rowpg" mode sweeps the keys with the saved lse and adds
//    valid_i sum_j P_ij G_j to Delta_i (the whole of Delta is needed before any dS is formed).
//    Then ska_bwd_kernel, one CTA per (b, h, BN keys): k, v, G of its keys stay in shared memory,
//    dk and dv accumulate in registers (lane owns keys ty*TK + i, columns 32 c + 4 tx + e), and
//    it loops over query tiles of BM rows: S and dP recomputed, P Z and dS written to shared
//    memory, then dv += (P Z)^T dO, dk += dS^T q, and dq += scale dS k added with fp32 atomics into a
//    [B, H, Lq, D] fp32 buffer. dbias = dS is stored directly when Bb == B (each (m, n) belongs to
//    exactly one CTA), added atomically into a fp32 [1, H, Lq, Lk] buffer when the bias is
//    broadcast; dk of a key bank (Bk == 1 < B) likewise goes atomically into a fp32 [1, H, Lk, D]
//    buffer. fp32 buffers are cast to the output dtype at the end (a no-op for float32).
//    The gw, gu terms (gw of the tile's rows and gu of the CTA's keys in shared memory, next to
//    lse, delta and G) are added to the dS tile by the lanes that wrote it, before dbias is
//    stored and dq, dk read it; without them that short pass is skipped.
//  * Score maps (ska_maps_kernel): one CTA of 256 threads per (b, h). The work per (b, h) is
//    O((Lq + Lk) D + Lq Lk), too little to split, and a single owner per output is what makes the
//    op deterministic without atomics. The head dim goes in chunks of 128 columns: that chunk of
//    ksum and qsum (column sums: a warp per row, 4 columns per lane so the reads coalesce, the 8
//    warps' partials added in shared memory in warp order), then each q and k row's dot with it (a
//    warp per row, shuffle sum) added into width and height in global memory, which serve as the
//    accumulators (an element is only touched by one thread between two __syncthreads). The bias
//    is read twice: row sums (a warp per row) and column sums (as for ksum, 128 columns at a time).
//    The loss per side: two block reductions (||x||^2 and ||t||^2; then ||r||^2 and n(x) . r,
//    which gives n(x) . g_n) and an elementwise pass for the gradient. Any L and D: every loop
//    strides over them.
//  * exp and log are __expf / __logf (what --use_fast_math makes of them anyway); __expf(-inf)
//    is +0, which is what makes masked keys and empty rows (lse = +inf) give P = 0, no NaN.
//    Inputs must be finite apart from -inf entries of the bias.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../philox.h"
#include "../ska_dropout.h"
#include "dispatch.h"

namespace mmcl_fast {
namespace {

constexpr int kThreads = 128;  // 4 warps of 4 row groups of 8 lanes: the layout above relies on it
constexpr int kDeltaThreads = 256;  // ska_delta_kernel: a warp per row
constexpr float kInf = __builtin_huge_valf();

constexpr int kMapThreads = 256;  // ska_maps_kernel: 8 warps
constexpr int kMapWarps = kMapThreads / 32;
constexpr int kMapChunk = 128;    // columns per chunk in the maps kernel: 4 per lane
constexpr float kNormEps = 1e-12f;  // the clamp of the norms (_NORM_EPS of the Python layer)
static_assert(kMapChunk == 4 * 32 && kMapThreads >= kMapChunk,
              "map_colsum: 4 columns per lane, a thread per column to add the warps' partials");

enum FwdMode : int {
  kForward = 0,        // out, lse
  kForwardColsum = 1,  // out, lse, then colsum
  kRowPG = 2,          // backward preprocessing: delta_i += valid_i * sum_j P_ij G_j
};

// Tile sizes from the head-dim bucket DP (see the header: shared memory under 99 KB).
template <int DP>
struct FwdTiles {
  static constexpr int BM = DP <= 128 ? 64 : 32;
  static constexpr int BN = DP <= 64 ? 64 : (DP <= 192 ? 32 : 16);
  static constexpr int kFloats =
      BM * (DP + 4) + 2 * BN * (DP + 4) + BM * (BN + 4) + 2 * BN;  // Q, K, V, P, flags, col
  static constexpr int kBytes = kFloats * 4;
};

template <int DP>
struct BwdTiles {
  static constexpr int BM = DP <= 192 ? 32 : 16;
  static constexpr int BN = DP <= 64 ? 64 : (DP <= 128 ? 32 : 16);
  static constexpr int kFloats = 2 * BN * (DP + 4) + 2 * BM * (DP + 4) + 2 * BM * (BN + 4) +
                                 4 * BM + 3 * BN;  // K, V, Q, dO, P, dS, lse/delta/valid/gw, G/flags/gu
  static constexpr int kBytes = kFloats * 4;
};

#define MMCL_SKA_CHECK_TILES(DP)                                                               \
  static_assert(FwdTiles<DP>::kBytes <= 99 * 1024 && BwdTiles<DP>::kBytes <= 99 * 1024,       \
                "shared memory over the sm_86 opt-in limit");                                 \
  static_assert(FwdTiles<DP>::BM % 16 == 0 && FwdTiles<DP>::BN % 16 == 0 &&                   \
                    BwdTiles<DP>::BM % 16 == 0 && BwdTiles<DP>::BN % 16 == 0 && DP % 32 == 0, \
                "tiles must fit the 16 x 8 thread layout");
MMCL_SKA_CHECK_TILES(32)
MMCL_SKA_CHECK_TILES(64)
MMCL_SKA_CHECK_TILES(96)
MMCL_SKA_CHECK_TILES(128)
MMCL_SKA_CHECK_TILES(192)
MMCL_SKA_CHECK_TILES(256)
#undef MMCL_SKA_CHECK_TILES

template <typename T>
struct FwdParams {
  const T* q;
  const T* k;
  const T* v;
  const T* bias;        // null: no bias
  const bool* kpm;      // [B, Lk], null: no key padding
  const bool* qpm;      // [B, Lq], null: every query valid
  T* out;               // [B, H, Lq, D]   (forward modes)
  float* lse;           // [B, H, Lq]      (written by the forward modes, read by kRowPG)
  float* colsum;        // [B, H, Lk]      (kForwardColsum; zeroed)
  const float* gcol;    // [B, H, Lk]      (kRowPG: grad_colsum)
  float* delta;         // [B, H, Lq]      (kRowPG: holds grad_out . out, gets the G term added)
  const int64_t* seed;  // dropout seed (device, one element), read only when drop_thr != 0
  int64_t k_bstride;    // elements between k[b] and k[b+1]: 0 for a key bank
  int64_t bias_bstride; // 0 for a bias broadcast over the batch
  int H, Lq, Lk, D;
  float scale;
  int mode;
  uint32_t drop_thr;    // ceil(p 2^24): 0 = no dropout (always 0 in kRowPG mode)
  float drop_scale;     // 1 / (1 - p)
};

template <typename T>
struct BwdParams {
  const T* dout;
  const T* q;
  const T* k;
  const T* v;
  const T* bias;
  const bool* kpm;
  const bool* qpm;
  const float* lse;
  const float* delta;
  const float* gcol;    // null: no grad_colsum
  const float* gw;      // [B, H, Lq], null: no grad_width
  const float* gu;      // [B, H, Lk], null: no grad_height
  bool has_maps;        // gw or gu given
  float* dq;            // fp32 [B, H, Lq, D], zeroed, atomics
  T* dk;                // direct store (dk_atomic false)
  float* dk32;          // fp32 [1, H, Lk, D], zeroed, atomics (dk_atomic true)
  T* dv;
  T* dbias;             // direct store of dS (dbias_mode 1)
  float* dbias32;       // fp32 [1, H, Lq, Lk], zeroed, atomics (dbias_mode 2)
  const int64_t* seed;  // as in FwdParams
  int64_t k_bstride;
  int64_t bias_bstride;
  int H, Lq, Lk, D;
  float scale;
  bool dk_atomic;
  int dbias_mode;  // 0 none, 1 store, 2 atomic
  uint32_t drop_thr;
  float drop_scale;
};

template <typename T>
struct MapParams {
  const T* q;
  const T* k;
  const T* bias;      // null: no bias
  const bool* kpm;    // [B, Lk], null: no key padding
  const bool* qpm;    // [B, Lq], null: every query valid
  const float* tw;    // [B, H, Lq], null: no teacher width
  const float* th;    // [B, H, Lk], null: no teacher height
  float* width;       // [B, H, Lq]
  float* height;      // [B, H, Lk]
  float* dist;        // [B, H]
  float* gw;          // [B, H, Lq] (with tw)
  float* gu;          // [B, H, Lk] (with th)
  int64_t k_bstride;
  int64_t bias_bstride;
  int H, Lq, Lk, D;
  float scale;
  bool normalize;
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

struct Lanes {
  int tid, lane, tx, ty, tyw;
};

__device__ __forceinline__ Lanes lanes() {
  Lanes l;
  l.tid = threadIdx.x;
  l.lane = l.tid & 31;
  l.tx = l.lane & 7;
  l.tyw = l.lane >> 3;
  l.ty = (l.tid >> 5) * 4 + l.tyw;
  return l;
}

// Rows [0, ROWS) x columns [0, DP) of dst (row stride DP + 4) from `src` (rows of D contiguous
// elements, row 0 first): rows >= valid_rows and columns >= D are zero (the dot products and the
// P.V sums run over them, so they must be finite). A warp covers 32 consecutive columns of one
// row (DP is a multiple of 32): coalesced global reads, conflict-free shared stores.
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, const T* __restrict__ src,
                                          int valid_rows, int D) {
  constexpr int KS = DP + 4;
  for (int e = threadIdx.x; e < ROWS * DP; e += kThreads) {
    const int r = e / DP;
    const int d = e - r * DP;
    float x = 0.f;
    if (r < valid_rows && d < D) x = static_cast<float>(src[static_cast<int64_t>(r) * D + d]);
    dst[r * KS + d] = x;
  }
}

// flags[c] = 1 for a key n0 + c that exists and is not padded, else 0; c < BN.
template <int BN>
__device__ __forceinline__ void load_key_flags(float* __restrict__ flags,
                                               const bool* __restrict__ kpm_b, int n0, int Lk) {
  for (int c = threadIdx.x; c < BN; c += kThreads) {
    const int n = n0 + c;
    flags[c] = (n < Lk && (kpm_b == nullptr || !kpm_b[n])) ? 1.f : 0.f;
  }
}

// s[i][j] = A[ty*TM + i] . B[tx + 8 j] over the first D4 (D rounded up to 4) columns; A and B
// have row stride KS. Per float4 step: TM + TN shared loads (the A ones broadcast within a row
// group) for 4 TM TN FMAs.
template <int KS, int TM, int TN>
__device__ __forceinline__ void dot_tile(const float* __restrict__ A, const float* __restrict__ B,
                                         int D4, int ty, int tx, float (&s)[TM][TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) s[i][j] = 0.f;
#pragma unroll 2
  for (int d = 0; d < D4; d += 4) {
    float4 a[TM], b[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = *reinterpret_cast<const float4*>(A + (ty * TM + i) * KS + d);
#pragma unroll
    for (int j = 0; j < TN; ++j) b[j] = *reinterpret_cast<const float4*>(B + (tx + 8 * j) * KS + d);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j)
        s[i][j] += a[i].x * b[j].x + a[i].y * b[j].y + a[i].z * b[j].z + a[i].w * b[j].w;
  }
}

// The scores of a tile: s = scale q.k + bias, -inf for excluded keys (flags 0, which covers keys
// past Lk) and for rows past the end (r >= rows_left; their bias is never read). bias_rows points
// at bias[b', h, m0, 0] (null: no bias).
template <typename T, int KS, int TM, int TN>
__device__ __forceinline__ void score_tile(const float* __restrict__ Qs,
                                           const float* __restrict__ Ks,
                                           const float* __restrict__ flags,
                                           const T* __restrict__ bias_rows, int Lk, int n0,
                                           int rows_left, int D4, float scale, const Lanes& L,
                                           float (&s)[TM][TN]) {
  dot_tile<KS, TM, TN>(Qs, Ks, D4, L.ty, L.tx, s);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int r = L.ty * TM + i;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int c = L.tx + 8 * j;
      float x = -kInf;
      if (r < rows_left && flags[c] != 0.f) {
        x = s[i][j] * scale;
        if (bias_rows != nullptr)
          x += static_cast<float>(bias_rows[static_cast<int64_t>(r) * Lk + n0 + c]);
      }
      s[i][j] = x;
    }
  }
}

__device__ __forceinline__ float row_max8(float x) {  // over the 8 lanes of a row group
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
}

__device__ __forceinline__ float row_sum8(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x + __shfl_xor_sync(0xffffffffu, x, 4);
}

__device__ __forceinline__ float col_sum4(float x) {  // over the 4 row groups of a warp
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

// Dropout over the calling warp's rows of a [BM][BN + 4] tile in shared memory (tile row r is
// query m0 + r, column c key n0 + c; the warp owns rows 4 TM warp .. 4 TM warp + 4 TM - 1, as in
// the score layout): SCALE multiplies the tile by Z, else the tile gets Z. A lane per (row,
// group of 4 keys): one Philox call, word e for key 4 g + e (n0 is a multiple of 4, so that is
// word (n0 + 4 g + e) & 3). Rows from rows_left on and groups from n_end / 4 on are left as
// they are (P = 0 there, or the caller does not read them). Not unrolled: the Philox rounds are
// enough code. The caller syncs the warp before and after.
template <int TM, int BN, bool SCALE>
__device__ __forceinline__ void dropout_tile(float* __restrict__ tile, const int64_t* seed, int m0,
                                             int rows_left, int n0, int n_end, int64_t bh,
                                             uint32_t thr, float rscale) {
  constexpr int PS = BN + 4, G = BN / 4, ROWS = 4 * TM;
  static_assert((G & (G - 1)) == 0, "groups per row: a power of two");
  // a plain load: with __ldg here the SASS of the rest of the kernels (the tile loads and score
  // products) changed, in the p = 0 path too (seen once with nvcc 13.0 for sm_90; not timed)
  const uint64_t sd = static_cast<uint64_t>(*seed);
  const uint32_t k0 = static_cast<uint32_t>(sd), k1 = static_cast<uint32_t>(sd >> 32);
  const int r0 = (threadIdx.x >> 5) * ROWS;
  const int g_end = n_end >> 2;
#pragma unroll 1
  for (int e = threadIdx.x & 31; e < ROWS * G; e += 32) {
    const int r = r0 + e / G, g = e % G;
    if (r >= rows_left || g >= g_end) continue;
    const Philox4 x = philox4x32_10(static_cast<uint32_t>((n0 >> 2) + g),
                                    static_cast<uint32_t>(m0 + r), static_cast<uint32_t>(bh),
                                    kDropoutTag, k0, k1);
    float4 z;
    z.x = (x.x[0] >> 8) >= thr ? rscale : 0.f;
    z.y = (x.x[1] >> 8) >= thr ? rscale : 0.f;
    z.z = (x.x[2] >> 8) >= thr ? rscale : 0.f;
    z.w = (x.x[3] >> 8) >= thr ? rscale : 0.f;
    float4* t = reinterpret_cast<float4*>(tile + r * PS + 4 * g);
    if (SCALE) {
      const float4 v = *t;
      z.x *= v.x;
      z.y *= v.y;
      z.z *= v.z;
      z.w *= v.w;
    }
    *t = z;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// One CTA per (b = blockIdx.z, h = blockIdx.y, queries m0 .. m0+BM-1). Modes: see FwdMode.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) ska_fwd_kernel(const FwdParams<T> p) {
  constexpr int BM = FwdTiles<DP>::BM, BN = FwdTiles<DP>::BN;
  constexpr int KS = DP + 4, PS = BN + 4;
  constexpr int TM = BM / 16, TN = BN / 8, NC = DP / 32;
  extern __shared__ float4 smem4[];
  float* Qs = reinterpret_cast<float*>(smem4);  // [BM][KS]
  float* Ks = Qs + BM * KS;                     // [BN][KS]
  float* Vs = Ks + BN * KS;                     // [BN][KS]
  float* Ps = Vs + BN * KS;                     // [BM][PS]
  float* flags = Ps + BM * PS;                  // [BN]
  float* col = flags + BN;                      // [BN]: colsum partials | G of the tile

  const Lanes L = lanes();
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const int H = p.H, Lq = p.Lq, Lk = p.Lk, D = p.D, D4 = (D + 3) & ~3;
  const int rows_left = Lq - m0;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  const T* kb = p.k + b * p.k_bstride + static_cast<int64_t>(h) * Lk * D;
  const T* vb = p.v + bh * Lk * D;
  const T* bias_rows = p.bias == nullptr
                           ? nullptr
                           : p.bias + b * p.bias_bstride + (static_cast<int64_t>(h) * Lq + m0) * Lk;
  const bool* kpm_b = p.kpm == nullptr ? nullptr : p.kpm + static_cast<int64_t>(b) * Lk;

  load_tile<T, BM, DP>(Qs, p.q + (bh * Lq + m0) * D, rows_left, D);  // synced at the loop tops

  float lse_r[TM];
  if (p.mode != kRowPG) {
    float m[TM], l[TM], acc[TM][NC][4];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      m[i] = -kInf;
      l[i] = 0.f;  // this lane's columns only; summed over the row group at the end
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][c][e] = 0.f;
    }
    for (int n0 = 0; n0 < Lk; n0 += BN) {
      __syncthreads();  // everyone is done with the previous K, V tiles (and Qs is written)
      load_tile<T, BN, DP>(Ks, kb + static_cast<int64_t>(n0) * D, Lk - n0, D);
      load_tile<T, BN, DP>(Vs, vb + static_cast<int64_t>(n0) * D, Lk - n0, D);
      load_key_flags<BN>(flags, kpm_b, n0, Lk);
      __syncthreads();
      float s[TM][TN];
      score_tile<T, KS, TM, TN>(Qs, Ks, flags, bias_rows, Lk, n0, rows_left, D4, p.scale, L, s);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        float mt = s[i][0];
#pragma unroll
        for (int j = 1; j < TN; ++j) mt = fmaxf(mt, s[i][j]);
        const float m_new = fmaxf(m[i], row_max8(mt));  // the same in all 8 lanes of the row
        // All scores so far -inf: subtract 0 instead, so that exp gives 0, not NaN.
        const float m_ref = m_new == -kInf ? 0.f : m_new;
        const float alpha = __expf(m[i] - m_ref);  // 0 when m[i] = -inf
        m[i] = m_new;
        float ls = 0.f;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const float pr = __expf(s[i][j] - m_ref);
          ls += pr;
          Ps[(L.ty * TM + i) * PS + L.tx + 8 * j] = pr;
        }
        l[i] = l[i] * alpha + ls;
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][c][e] *= alpha;
      }
      __syncwarp();  // P rows of this warp were written by this warp's lanes only
      const int n_end = min(BN, (Lk - n0 + 3) & ~3);
      if (p.drop_thr != 0) {  // l has the undropped P; V gets P Z
        dropout_tile<TM, BN, true>(Ps, p.seed, m0, rows_left, n0, n_end, bh, p.drop_thr,
                                   p.drop_scale);
        __syncwarp();
      }
      // acc += P V over the keys of the tile; past Lk, P = 0 and V = 0.
      for (int n = 0; n < n_end; n += 4) {
        float4 pv[TM];
#pragma unroll
        for (int i = 0; i < TM; ++i)
          pv[i] = *reinterpret_cast<const float4*>(Ps + (L.ty * TM + i) * PS + n);
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
#pragma unroll
          for (int c = 0; c < NC; ++c) {
            const float4 vv =
                *reinterpret_cast<const float4*>(Vs + (n + e4) * KS + 32 * c + 4 * L.tx);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
              const float pe = e4 == 0 ? pv[i].x : e4 == 1 ? pv[i].y : e4 == 2 ? pv[i].z : pv[i].w;
              acc[i][c][0] += pe * vv.x;
              acc[i][c][1] += pe * vv.y;
              acc[i][c][2] += pe * vv.z;
              acc[i][c][3] += pe * vv.w;
            }
          }
        }
      }
    }
    // out = acc / l, lse = m + log l; empty rows (m = -inf): out = 0, lse = +inf.
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const float lt = row_sum8(l[i]);
      const bool empty = m[i] == -kInf;
      lse_r[i] = empty ? kInf : m[i] + __logf(lt);
      const float inv = empty ? 0.f : 1.f / lt;
      const int r = L.ty * TM + i;
      if (r < rows_left) {
        const int64_t row = bh * Lq + m0 + r;
        if (L.tx == 0) p.lse[row] = lse_r[i];
        T* orow = p.out + row * D;
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int d = 32 * c + 4 * L.tx + e;
            if (d < D) orow[d] = static_cast<T>(acc[i][c][e] * inv);
          }
      }
    }
    if (p.mode == kForward) return;  // uniform over the CTA
  } else {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int r = L.ty * TM + i;
      lse_r[i] = r < rows_left ? p.lse[bh * Lq + m0 + r] : kInf;
    }
  }

  // Second sweep, lse known: P = exp(S - lse) over the valid rows (0 elsewhere).
  const bool colsum_mode = p.mode == kForwardColsum;
  float valid[TM], rowacc[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int r = L.ty * TM + i;
    valid[i] = (r < rows_left &&
                (p.qpm == nullptr || !p.qpm[static_cast<int64_t>(b) * Lq + m0 + r])) ? 1.f : 0.f;
    rowacc[i] = 0.f;
  }
  for (int n0 = 0; n0 < Lk; n0 += BN) {
    __syncthreads();  // previous users of Ks, flags, col (incl. the colsum flush) are done
    load_tile<T, BN, DP>(Ks, kb + static_cast<int64_t>(n0) * D, Lk - n0, D);
    load_key_flags<BN>(flags, kpm_b, n0, Lk);
    for (int c = L.tid; c < BN; c += kThreads) {
      const int n = n0 + c;
      col[c] = (colsum_mode || n >= Lk) ? 0.f : p.gcol[bh * Lk + n];
    }
    __syncthreads();
    float s[TM][TN];
    score_tile<T, KS, TM, TN>(Qs, Ks, flags, bias_rows, Lk, n0, rows_left, D4, p.scale, L, s);
    if (colsum_mode) {
      float cs[TN];
#pragma unroll
      for (int j = 0; j < TN; ++j) cs[j] = 0.f;
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) cs[j] += valid[i] * __expf(s[i][j] - lse_r[i]);
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const float t = col_sum4(cs[j]);
        if (L.tyw == 0) atomicAdd(col + L.tx + 8 * j, t);  // the 4 warps, in shared memory
      }
      __syncthreads();
      for (int c = L.tid; c < BN; c += kThreads) {
        const float t = col[c];
        if (n0 + c < Lk && t != 0.f) atomicAdd(p.colsum + bh * Lk + n0 + c, t);
      }
    } else {
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) rowacc[i] += __expf(s[i][j] - lse_r[i]) * col[L.tx + 8 * j];
    }
  }
  if (!colsum_mode) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const float t = row_sum8(rowacc[i]);
      const int r = L.ty * TM + i;
      // one CTA owns the row, and the lane tx == 0 of its row group is the only writer
      if (L.tx == 0 && valid[i] != 0.f) p.delta[bh * Lq + m0 + r] += t;
    }
  }
}

// delta[row] = dout[row] . out[row], a warp per row of D elements.
template <typename T>
__global__ void __launch_bounds__(kDeltaThreads)
    ska_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                     float* __restrict__ delta, int64_t rows, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kDeltaThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together
  const T* a = dout + row * D;
  const T* o = out + row * D;
  float t = 0.f;
  for (int d = lane; d < D; d += 32) t += static_cast<float>(a[d]) * static_cast<float>(o[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
  if (lane == 0) delta[row] = t;
}

// One CTA per (b = blockIdx.z, h = blockIdx.y, keys n0 .. n0+BN-1), looping over query tiles.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) ska_bwd_kernel(const BwdParams<T> p) {
  constexpr int BM = BwdTiles<DP>::BM, BN = BwdTiles<DP>::BN;
  constexpr int KS = DP + 4, PS = BN + 4;
  constexpr int TM = BM / 16, TN = BN / 8, TK = BN / 16, NC = DP / 32;
  extern __shared__ float4 smem4[];
  float* Ks = reinterpret_cast<float*>(smem4);  // [BN][KS]
  float* Vs = Ks + BN * KS;                     // [BN][KS]
  float* Qs = Vs + BN * KS;                     // [BM][KS]
  float* Os = Qs + BM * KS;                     // [BM][KS]  grad_out
  float* Ps = Os + BM * KS;                     // [BM][PS]
  float* Ss = Ps + BM * PS;                     // [BM][PS]  dS
  float* lse_s = Ss + BM * PS;                  // [BM]
  float* delta_s = lse_s + BM;                  // [BM]
  float* valid_s = delta_s + BM;                // [BM]
  float* gw_s = valid_s + BM;                   // [BM]  grad_width
  float* G_s = gw_s + BM;                       // [BN]
  float* flags = G_s + BN;                      // [BN]
  float* gu_s = flags + BN;                     // [BN]  grad_height

  const Lanes L = lanes();
  const int b = blockIdx.z, h = blockIdx.y, n0 = blockIdx.x * BN;
  const int H = p.H, Lq = p.Lq, Lk = p.Lk, D = p.D, D4 = (D + 3) & ~3;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  const int64_t k_off = b * p.k_bstride + static_cast<int64_t>(h) * Lk * D;  // k[b', h, 0, 0]
  const int64_t bias_off = b * p.bias_bstride + static_cast<int64_t>(h) * Lq * Lk;

  load_tile<T, BN, DP>(Ks, p.k + k_off + static_cast<int64_t>(n0) * D, Lk - n0, D);
  load_tile<T, BN, DP>(Vs, p.v + (bh * Lk + n0) * D, Lk - n0, D);
  load_key_flags<BN>(flags, p.kpm == nullptr ? nullptr : p.kpm + static_cast<int64_t>(b) * Lk,
                     n0, Lk);
  for (int c = L.tid; c < BN; c += kThreads) {
    G_s[c] = (p.gcol != nullptr && n0 + c < Lk) ? p.gcol[bh * Lk + n0 + c] : 0.f;
    gu_s[c] = (p.gu != nullptr && n0 + c < Lk) ? p.gu[bh * Lk + n0 + c] : 0.f;
  }

  float dk[TK][NC][4], dv[TK][NC][4];
#pragma unroll
  for (int i = 0; i < TK; ++i)
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[i][c][e] = dv[i][c][e] = 0.f;

  for (int m0 = 0; m0 < Lq; m0 += BM) {
    const int rows_left = Lq - m0;
    __syncthreads();  // the previous tile's readers of Qs, Os, Ps, Ss are done (and K, V are in)
    load_tile<T, BM, DP>(Qs, p.q + (bh * Lq + m0) * D, rows_left, D);
    load_tile<T, BM, DP>(Os, p.dout + (bh * Lq + m0) * D, rows_left, D);
    for (int r = L.tid; r < BM; r += kThreads) {
      const bool in = r < rows_left;
      const int64_t row = bh * Lq + m0 + r;
      lse_s[r] = in ? p.lse[row] : kInf;  // P = 0 on rows past Lq
      delta_s[r] = in ? p.delta[row] : 0.f;
      valid_s[r] = (in && (p.qpm == nullptr || !p.qpm[static_cast<int64_t>(b) * Lq + m0 + r]))
                       ? 1.f : 0.f;
      gw_s[r] = (in && p.gw != nullptr) ? p.gw[row] : 0.f;
    }
    __syncthreads();
    // Z of the tile into Ss (the score loop reads it back, then overwrites it with dS), drawn
    // before s and dp take their registers.
    const bool drop = p.drop_thr != 0;
    if (drop) {
      dropout_tile<TM, BN, false>(Ss, p.seed, m0, rows_left, n0, min(BN, (Lk - n0 + 3) & ~3), bh,
                                  p.drop_thr, p.drop_scale);
      __syncwarp();
    }

    // S and dP of the tile, then P and dS into shared memory (and dbias out).
    const auto store_dbias = [&](int r, int c, float ds) {
      if (p.dbias_mode != 0 && r < rows_left && n0 + c < Lk) {
        const int64_t idx = bias_off + static_cast<int64_t>(m0 + r) * Lk + n0 + c;
        if (p.dbias_mode == 1)
          p.dbias[idx] = static_cast<T>(ds);  // this CTA is the only writer of (m, n)
        else if (ds != 0.f)
          atomicAdd(p.dbias32 + idx, ds);  // bias_bstride = 0: summed over b
      }
    };
    {
      float s[TM][TN], dp[TM][TN];
      dot_tile<KS, TM, TN>(Qs, Ks, D4, L.ty, L.tx, s);
      dot_tile<KS, TM, TN>(Os, Vs, D4, L.ty, L.tx, dp);
      // Instantiated for each value of drop (see the header).
      const auto score_pass = [&](auto drop_c) {
        constexpr bool DROP = decltype(drop_c)::value;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const int r = L.ty * TM + i;
#pragma unroll
          for (int j = 0; j < TN; ++j) {
            const int c = L.tx + 8 * j;
            float pz = 0.f, ds = 0.f;
            if (r < rows_left && flags[c] != 0.f) {  // flags[c] != 0 implies n0 + c < Lk
              float x = s[i][j] * p.scale;
              if (p.bias != nullptr)
                x += static_cast<float>(
                    p.bias[bias_off + static_cast<int64_t>(m0 + r) * Lk + n0 + c]);
              const float pr = __expf(x - lse_s[r]);  // 0 for x = -inf or an empty row (lse = +inf)
              float dpz = dp[i][j];
              pz = pr;
              if constexpr (DROP) {  // Z from dropout_tile (drawn for every row < rows_left, key < Lk)
                const float z = Ss[r * PS + c];
                dpz *= z;
                pz *= z;
              }
              ds = pr * (dpz + G_s[c] * valid_s[r] - delta_s[r]);
            }
            Ps[r * PS + c] = pz;
            Ss[r * PS + c] = ds;
            if (!p.has_maps) store_dbias(r, c, ds);
          }
        }
      };
      if (drop)
        score_pass(std::true_type{});
      else
        score_pass(std::false_type{});
    }
    // The score maps' term, in a pass of its own once s and dp are dead, not unrolled: in the loop
    // above, or unrolled, it made ptxas spill in some instances on sm_90, which slowed the plain
    // backward too.
    // Each lane revisits the elements it wrote, so no sync is needed. Not times P, so present
    // where P = 0 as well (masked keys, empty rows). Past Lq or Lk, flags, valid_s, gw_s and gu_s
    // are all 0: dS stays 0 there, as the dq and dk sums over the whole tile need.
    if (p.has_maps) {
#pragma unroll 1
      for (int i = 0; i < TM; ++i) {
        const int r = L.ty * TM + i;
#pragma unroll 1
        for (int j = 0; j < TN; ++j) {
          const int c = L.tx + 8 * j;
          const float ds = Ss[r * PS + c] + valid_s[r] * flags[c] * (gw_s[r] + gu_s[c]);
          Ss[r * PS + c] = ds;
          store_dbias(r, c, ds);
        }
      }
    }
    __syncthreads();

    // dv[n] += sum_m (P Z)[m][n] dO[m], dk[n] += sum_m dS[m][n] q[m]; rows past Lq are all zero.
    const int m_end = min(BM, rows_left);
    for (int r = 0; r < m_end; ++r) {
      float pv[TK], sv[TK];
#pragma unroll
      for (int i = 0; i < TK; ++i) {
        pv[i] = Ps[r * PS + L.ty * TK + i];
        sv[i] = Ss[r * PS + L.ty * TK + i];
      }
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float4 o = *reinterpret_cast<const float4*>(Os + r * KS + 32 * c + 4 * L.tx);
        const float4 qq = *reinterpret_cast<const float4*>(Qs + r * KS + 32 * c + 4 * L.tx);
#pragma unroll
        for (int i = 0; i < TK; ++i) {
          dv[i][c][0] += pv[i] * o.x;
          dv[i][c][1] += pv[i] * o.y;
          dv[i][c][2] += pv[i] * o.z;
          dv[i][c][3] += pv[i] * o.w;
          dk[i][c][0] += sv[i] * qq.x;
          dk[i][c][1] += sv[i] * qq.y;
          dk[i][c][2] += sv[i] * qq.z;
          dk[i][c][3] += sv[i] * qq.w;
        }
      }
    }

    // dq[m] += scale sum_n dS[m][n] k[n], one 32-column chunk at a time (few registers), added
    // atomically: the other key tiles of (b, h) add to the same rows.
    const int n_end = min(BN, (Lk - n0 + 3) & ~3);  // past Lk, dS = 0 and K = 0
#pragma unroll 1
    for (int c = 0; c < NC; ++c) {
      if (32 * c >= D) break;  // uniform
      float a[TM][4];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) a[i][e] = 0.f;
      for (int n = 0; n < n_end; n += 4) {
        float4 sv[TM];
#pragma unroll
        for (int i = 0; i < TM; ++i)
          sv[i] = *reinterpret_cast<const float4*>(Ss + (L.ty * TM + i) * PS + n);
#pragma unroll
        for (int e4 = 0; e4 < 4; ++e4) {
          const float4 kk =
              *reinterpret_cast<const float4*>(Ks + (n + e4) * KS + 32 * c + 4 * L.tx);
#pragma unroll
          for (int i = 0; i < TM; ++i) {
            const float se = e4 == 0 ? sv[i].x : e4 == 1 ? sv[i].y : e4 == 2 ? sv[i].z : sv[i].w;
            a[i][0] += se * kk.x;
            a[i][1] += se * kk.y;
            a[i][2] += se * kk.z;
            a[i][3] += se * kk.w;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int r = L.ty * TM + i;
        if (r >= rows_left) continue;
        float* dqrow = p.dq + (bh * Lq + m0 + r) * D;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int d = 32 * c + 4 * L.tx + e;
          if (d < D && a[i][e] != 0.f) atomicAdd(dqrow + d, p.scale * a[i][e]);
        }
      }
    }
  }

  // dk, dv of the CTA's keys: dv and (own keys) dk stored, a key bank's dk added atomically.
#pragma unroll
  for (int i = 0; i < TK; ++i) {
    const int n = n0 + L.ty * TK + i;
    if (n >= Lk) continue;
    T* dvrow = p.dv + (bh * Lk + n) * D;
    const int64_t krow = (static_cast<int64_t>(h) * Lk + n) * D;  // dk32 is [1, H, Lk, D]
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = 32 * c + 4 * L.tx + e;
        if (d >= D) continue;
        dvrow[d] = static_cast<T>(dv[i][c][e]);
        const float g = p.scale * dk[i][c][e];
        if (p.dk_atomic) {
          if (g != 0.f) atomicAdd(p.dk32 + krow + d, g);
        } else {
          p.dk[k_off + static_cast<int64_t>(n) * D + d] = static_cast<T>(g);
        }
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Score maps (ska_score_maps)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// a and b summed over the CTA, the same bits in every thread (each adds the warps' partials in
// warp order), so that every thread takes the same branches on them. red: 2 kMapWarps floats,
// free again on return.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    red[2 * warp] = a;
    red[2 * warp + 1] = b;
  }
  __syncthreads();
  a = 0.f;
  b = 0.f;
#pragma unroll
  for (int w = 0; w < kMapWarps; ++w) {
    a += red[2 * w];
    b += red[2 * w + 1];
  }
  __syncthreads();
}

// out[c] = sum over the rows r < R that are not padded (pad null: none is) of A[r ld + c0 + c],
// for c < kMapChunk (0 where c0 + c >= C). A warp per row, 4 columns per lane; the warps' partials
// are added in warp order (deterministic). red: kMapWarps * kMapChunk floats. Ends synced, so
// out is readable by every thread and red is free again.
template <typename T>
__device__ __forceinline__ void map_colsum(const T* __restrict__ A, int R, int64_t ld, int C, int c0,
                           const bool* __restrict__ pad, float* red, float* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int r = warp; r < R; r += kMapWarps) {
    if (pad != nullptr && pad[r]) continue;
    const T* row = A + static_cast<int64_t>(r) * ld + c0;
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (c0 + lane + 32 * e < C) acc[e] += static_cast<float>(row[lane + 32 * e]);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) red[warp * kMapChunk + lane + 32 * e] = acc[e];
  __syncthreads();
  if (threadIdx.x < kMapChunk) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kMapWarps; ++w) t += red[w * kMapChunk + threadIdx.x];
    out[threadIdx.x] = t;
  }
  __syncthreads();
}

// out[r] += sum_{c in [c0, c1)} A[r ld + c] vec[c - c0] for the rows r < R that are not padded:
// a warp per row, r = warp + kMapWarps n, so that a row always has the same writer (lane 0).
template <typename T>
__device__ __forceinline__ void map_rowdot(const T* __restrict__ A, int R, int64_t ld, int c0,
                                           int c1, const bool* __restrict__ pad,
                                           const float* vec, float* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < R; r += kMapWarps) {
    if (pad != nullptr && pad[r]) continue;  // uniform over the warp
    const T* row = A + static_cast<int64_t>(r) * ld;
    float t = 0.f;
    for (int c = c0 + lane; c < c1; c += 32) t += static_cast<float>(row[c]) * vec[c - c0];
    t = warp_sum(t);
    if (lane == 0) out[r] += t;
  }
}

// d = ||ReLU(n(t) - n(x))|| over L, and g = dd/dx times the mask (0 at padded positions). x is
// this CTA's width or height (global, written before the caller's __syncthreads). Every thread
// returns the same d.
__device__ __forceinline__ float map_distance(const float* x, const float* __restrict__ t, int L,
                              const bool* __restrict__ pad, bool normalize, float* __restrict__ g,
                              float* red) {
  float nrm_x = 1.f, den_x = 1.f, den_t = 1.f;
  if (normalize) {
    float sx = 0.f, st = 0.f;
    for (int i = threadIdx.x; i < L; i += kMapThreads) {
      sx += x[i] * x[i];
      st += t[i] * t[i];
    }
    block_sum2(sx, st, red);
    nrm_x = sqrtf(sx);
    den_x = fmaxf(nrm_x, kNormEps);
    den_t = fmaxf(sqrtf(st), kNormEps);
  }
  // ||r||^2 and n(x) . r: the latter gives n(x) . g_n = -(n(x) . r) / d without another sweep
  float sr = 0.f, sxr = 0.f;
  for (int i = threadIdx.x; i < L; i += kMapThreads) {
    const float nx = x[i] / den_x;
    const float r = fmaxf(t[i] / den_t - nx, 0.f);
    sr += r * r;
    sxr += nx * r;
  }
  block_sum2(sr, sxr, red);
  const float d = sqrtf(sr);
  const float inv_d = d > 0.f ? 1.f / d : 0.f;  // d = 0: r = 0 everywhere, g_n = 0
  const float nx_gn = -sxr * inv_d;
  for (int i = threadIdx.x; i < L; i += kMapThreads) {
    float gx = 0.f;
    if (pad == nullptr || !pad[i]) {
      const float nx = x[i] / den_x;
      const float gn = -fmaxf(t[i] / den_t - nx, 0.f) * inv_d;
      if (!normalize)
        gx = gn;
      else if (nrm_x > kNormEps)  // through x / ||x||: the projection off n(x)
        gx = (gn - nx * nx_gn) / nrm_x;
      else  // through x / 1e-12 (the clamped norm is a constant)
        gx = gn / kNormEps;
    }
    g[i] = gx;
  }
  return d;
}

// One CTA per (b = blockIdx.y, h = blockIdx.x). See the header for the maths and the layout.
// The bound of 4 CTAs per SM (64 registers): with the plain bound, ptxas (CUDA 13) squeezed it into
// 40 registers and spilled.
template <typename T>
__global__ void __launch_bounds__(kMapThreads, 4) ska_maps_kernel(const MapParams<T> p) {
  __shared__ float red[kMapWarps * kMapChunk];
  __shared__ float ksum[kMapChunk];  // the chunk's ksum; then the bias column sums
  __shared__ float qsum[kMapChunk];
  __shared__ float red2[2 * kMapWarps];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int b = blockIdx.y, h = blockIdx.x;
  const int64_t bh = static_cast<int64_t>(b) * p.H + h;
  const int Lq = p.Lq, Lk = p.Lk, D = p.D;
  const float scale = p.scale;
  const T* qb = p.q + bh * Lq * D;
  const T* kb = p.k + b * p.k_bstride + static_cast<int64_t>(h) * Lk * D;
  const T* bb = p.bias == nullptr
                    ? nullptr
                    : p.bias + b * p.bias_bstride + static_cast<int64_t>(h) * Lq * Lk;
  const bool* qpm_b = p.qpm == nullptr ? nullptr : p.qpm + static_cast<int64_t>(b) * Lq;
  const bool* kpm_b = p.kpm == nullptr ? nullptr : p.kpm + static_cast<int64_t>(b) * Lk;
  float* w = p.width + bh * Lq;
  float* u = p.height + bh * Lk;

  // w_i = q_i . ksum, u_j = k_j . qsum, accumulated chunk by chunk of the head dim (padded rows
  // are skipped and stay 0). The zeros are ordered before the first update by the __syncthreads
  // in map_colsum; the chunk's ksum, qsum are rewritten only after the next chunk's first one.
  for (int i = tid; i < Lq; i += kMapThreads) w[i] = 0.f;
  for (int j = tid; j < Lk; j += kMapThreads) u[j] = 0.f;
  for (int d0 = 0; d0 < D; d0 += kMapChunk) {
    map_colsum<T>(kb, Lk, D, D, d0, kpm_b, red, ksum);
    map_colsum<T>(qb, Lq, D, D, d0, qpm_b, red, qsum);
    const int d1 = min(D, d0 + kMapChunk);
    map_rowdot<T>(qb, Lq, D, d0, d1, qpm_b, ksum, w);
    map_rowdot<T>(kb, Lk, D, d0, d1, kpm_b, qsum, u);
  }
  __syncthreads();  // w and u change hands below

  // w_i = qv_i (scale w_i + sum_j kv_j bias_ij): a warp per row, as above.
  for (int i = warp; i < Lq; i += kMapWarps) {
    if (qpm_b != nullptr && qpm_b[i]) {  // uniform over the warp
      if (lane == 0) w[i] = 0.f;
      continue;
    }
    float t = 0.f;
    if (bb != nullptr) {
      const T* row = bb + static_cast<int64_t>(i) * Lk;
      for (int j = lane; j < Lk; j += 32)
        if (kpm_b == nullptr || !kpm_b[j]) t += static_cast<float>(row[j]);
      t = warp_sum(t);
    }
    if (lane == 0) w[i] = scale * w[i] + t;
  }
  // u_j = kv_j (scale u_j + sum_i qv_i bias_ij): column sums of the bias, 128 columns at a time;
  // thread c of the chunk owns u[c0 + c] (its earlier writers are past map_colsum's syncs).
  if (bb != nullptr) {
    for (int c0 = 0; c0 < Lk; c0 += kMapChunk) {
      map_colsum<T>(bb, Lq, Lk, Lk, c0, qpm_b, red, ksum);
      const int j = c0 + tid;
      if (tid < kMapChunk && j < Lk)
        u[j] = (kpm_b == nullptr || !kpm_b[j]) ? scale * u[j] + ksum[tid] : 0.f;
    }
  } else {
    for (int j = tid; j < Lk; j += kMapThreads)
      u[j] = (kpm_b == nullptr || !kpm_b[j]) ? scale * u[j] : 0.f;
  }
  __syncthreads();  // w and u complete, read by every thread below

  float dist = 0.f;
  if (p.tw != nullptr)
    dist += map_distance(w, p.tw + bh * Lq, Lq, qpm_b, p.normalize, p.gw + bh * Lq, red2);
  if (p.th != nullptr)
    dist += map_distance(u, p.th + bh * Lk, Lk, kpm_b, p.normalize, p.gu + bh * Lk, red2);
  if (tid == 0) p.dist[bh] = dist;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------


int head_dim_bucket(int64_t D) {
  if (D <= 32) return 32;
  if (D <= 64) return 64;
  if (D <= 96) return 96;
  if (D <= 128) return 128;
  if (D <= 192) return 192;
  return 256;
}

// Dynamic shared memory above 48 KB must be requested per kernel; the tiles keep it under 99 KB,
// the smallest opt-in limit from sm_80 on, but check the card anyway.
template <typename Kernel>
void prepare_smem(Kernel kernel, int bytes) {
  const int limit = static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  TORCH_CHECK(bytes <= limit, "mmcl_fast: shared_key_attention needs ", bytes,
              " bytes of shared memory per block, this GPU allows ", limit);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

template <typename T, int DP>
void launch_fwd(const FwdParams<T>& p, int B, cudaStream_t stream) {
  const auto kernel = ska_fwd_kernel<T, DP>;
  constexpr int bytes = FwdTiles<DP>::kBytes;
  prepare_smem(kernel, bytes);
  const dim3 grid((p.Lq + FwdTiles<DP>::BM - 1) / FwdTiles<DP>::BM, p.H, B);
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DP>
void launch_bwd(const BwdParams<T>& p, int B, cudaStream_t stream) {
  const auto kernel = ska_bwd_kernel<T, DP>;
  constexpr int bytes = BwdTiles<DP>::kBytes;
  prepare_smem(kernel, bytes);
  const dim3 grid((p.Lk + BwdTiles<DP>::BN - 1) / BwdTiles<DP>::BN, p.H, B);
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_fwd(const FwdParams<T>& p, int B, cudaStream_t stream) {
  switch (head_dim_bucket(p.D)) {
    case 32: launch_fwd<T, 32>(p, B, stream); break;
    case 64: launch_fwd<T, 64>(p, B, stream); break;
    case 96: launch_fwd<T, 96>(p, B, stream); break;
    case 128: launch_fwd<T, 128>(p, B, stream); break;
    case 192: launch_fwd<T, 192>(p, B, stream); break;
    default: launch_fwd<T, 256>(p, B, stream); break;
  }
}

template <typename T>
void dispatch_bwd(const BwdParams<T>& p, int B, cudaStream_t stream) {
  switch (head_dim_bucket(p.D)) {
    case 32: launch_bwd<T, 32>(p, B, stream); break;
    case 64: launch_bwd<T, 64>(p, B, stream); break;
    case 96: launch_bwd<T, 96>(p, B, stream); break;
    case 128: launch_bwd<T, 128>(p, B, stream); break;
    case 192: launch_bwd<T, 192>(p, B, stream); break;
    default: launch_bwd<T, 256>(p, B, stream); break;
  }
}

// The shapes every op shares, checked once.
struct Shapes {
  int64_t B, H, Lq, Lk, D, Bk, Bb;
};

// The sizes every parameter block carries; k and bias have batch stride 0 when broadcast.
template <typename P>
void set_dims(P& p, const Shapes& s, double scale) {
  p.k_bstride = s.Bk == 1 ? 0 : s.H * s.Lk * s.D;
  p.bias_bstride = s.Bb == 1 ? 0 : s.H * s.Lq * s.Lk;
  p.H = static_cast<int>(s.H);
  p.Lq = static_cast<int>(s.Lq);
  p.Lk = static_cast<int>(s.Lk);
  p.D = static_cast<int>(s.D);
  p.scale = static_cast<float>(scale);
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t dim) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "mmcl_fast: ska: ", name,
              " must be on ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == dim, "mmcl_fast: ska: ", name, " must have ", dim, " dims, got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "mmcl_fast: ska: ", name, " must be contiguous");
}

// v: null for the score maps, which do not read it (and take any head dim).
Shapes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                    const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& key_padding_mask,
                    const std::optional<at::Tensor>& query_padding_mask) {
  check_tensor(q, "q", q, 4);
  check_tensor(k, "k", q, 4);
  if (v != nullptr) check_tensor(*v, "v", q, 4);
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "mmcl_fast: ska: the CUDA kernel takes float32, float16 or bfloat16, got ", dt);
  if (v != nullptr) {
    TORCH_CHECK(k.scalar_type() == dt && v->scalar_type() == dt,
                "mmcl_fast: ska: q, k and v must share one dtype");
  } else {
    TORCH_CHECK(k.scalar_type() == dt, "mmcl_fast: ska: q and k must share one dtype");
  }
  Shapes s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), k.size(0), 0};
  TORCH_CHECK(s.B >= 1 && s.H >= 1 && s.Lq >= 1 && s.Lk >= 1, "mmcl_fast: ska: empty q or k, ",
              q.sizes(), " and ", k.sizes());
  if (v != nullptr) {
    TORCH_CHECK(s.D >= 1 && s.D <= 256, "mmcl_fast: ska: head dim must be in 1..256, got ", s.D);
  } else {
    TORCH_CHECK(s.D >= 1 && s.D <= INT32_MAX / 2, "mmcl_fast: ska: head dim must be >= 1, got ",
                s.D);
  }
  TORCH_CHECK((s.Bk == 1 || s.Bk == s.B) && k.size(1) == s.H && k.size(3) == s.D,
              "mmcl_fast: ska: k must be [1 or B, H, Lk, D], got ", k.sizes(), " for q ", q.sizes());
  if (v != nullptr) {
    TORCH_CHECK(v->size(0) == s.B && v->size(1) == s.H && v->size(2) == s.Lk && v->size(3) == s.D,
                "mmcl_fast: ska: v must be [B, H, Lk, D], got ", v->sizes());
  }
  TORCH_CHECK(s.B <= 65535 && s.H <= 65535, "mmcl_fast: ska: B and H must be <= 65535");
  TORCH_CHECK(s.Lq <= INT32_MAX / 2 && s.Lk <= INT32_MAX / 2, "mmcl_fast: ska: sequence too long");
  if (bias.has_value()) {
    check_tensor(*bias, "bias", q, 4);
    TORCH_CHECK(bias->scalar_type() == dt, "mmcl_fast: ska: bias must have the dtype of q");
    s.Bb = bias->size(0);
    TORCH_CHECK((s.Bb == 1 || s.Bb == s.B) && bias->size(1) == s.H && bias->size(2) == s.Lq &&
                    bias->size(3) == s.Lk,
                "mmcl_fast: ska: bias must be [1 or B, H, Lq, Lk], got ", bias->sizes());
  }
  if (key_padding_mask.has_value()) {
    check_tensor(*key_padding_mask, "key_padding_mask", q, 2);
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool &&
                    key_padding_mask->size(0) == s.B && key_padding_mask->size(1) == s.Lk,
                "mmcl_fast: ska: key_padding_mask must be bool [B, Lk], got ",
                key_padding_mask->scalar_type(), " ", key_padding_mask->sizes());
  }
  if (query_padding_mask.has_value()) {
    check_tensor(*query_padding_mask, "query_padding_mask", q, 2);
    TORCH_CHECK(query_padding_mask->scalar_type() == at::kBool &&
                    query_padding_mask->size(0) == s.B && query_padding_mask->size(1) == s.Lq,
                "mmcl_fast: ska: query_padding_mask must be bool [B, Lq], got ",
                query_padding_mask->scalar_type(), " ", query_padding_mask->sizes());
  }
  return s;
}

// A per-(b, h) map argument (grad_width, grad_height, teacher_width, teacher_height): float32
// [B, H, L], contiguous, on q's device, or absent.
void check_map_arg(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& q,
                   int64_t B, int64_t H, int64_t L, const char* L_name) {
  if (!t.has_value()) return;
  check_tensor(*t, name, q, 3);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->size(0) == B && t->size(1) == H &&
                  t->size(2) == L,
              "mmcl_fast: ska: ", name, " must be [B, H, ", L_name, "] = [", B, ", ", H, ", ", L,
              "] float32, got ", t->scalar_type(), " ", t->sizes());
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// dropout_p in [0, 1); with p > 0 a seed, int64 with one element, on q's device (the kernels
// read it there: no host sync). Called before any output is allocated.
// thr = 0 (p = 0) tells the kernels there is no dropout.
template <typename P>
void set_dropout(P& p, double dropout_p, const std::optional<at::Tensor>& seed) {
  p.seed = nullptr;
  p.drop_thr = 0;
  p.drop_scale = 1.f;
  if (dropout_p == 0.0) return;
  p.seed = seed->const_data_ptr<int64_t>();
  p.drop_thr = ska_dropout_threshold(dropout_p);
  p.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ska_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, double scale, bool need_colsum,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(q.is_cuda(), "mmcl_fast: ska_forward: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const Shapes s = check_inputs(q, k, &v, bias, key_padding_mask, query_padding_mask);
  check_ska_dropout(dropout_p, dropout_seed, q);
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Lq}, f32);
  at::Tensor colsum = need_colsum ? at::zeros({s.B, s.H, s.Lk}, f32) : at::empty({0}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MMCL_DISPATCH_FHB(q.scalar_type(), "ska_forward_cuda", [&] {
    FwdParams<scalar_t> p{};
    p.q = q.const_data_ptr<scalar_t>();
    p.k = k.const_data_ptr<scalar_t>();
    p.v = v.const_data_ptr<scalar_t>();
    p.bias = opt_ptr<scalar_t>(bias);
    p.kpm = opt_ptr<bool>(key_padding_mask);
    p.qpm = opt_ptr<bool>(query_padding_mask);
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<float>();
    p.colsum = need_colsum ? colsum.data_ptr<float>() : nullptr;
    p.gcol = nullptr;
    p.delta = nullptr;
    set_dims(p, s, scale);
    set_dropout(p, dropout_p, dropout_seed);
    p.mode = need_colsum ? kForwardColsum : kForward;
    dispatch_fwd<scalar_t>(p, static_cast<int>(s.B), stream);
  });
  return {out, lse, colsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ska_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_colsum,
    const std::optional<at::Tensor>& grad_width, const std::optional<at::Tensor>& grad_height,
    double scale, bool need_dbias, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(q.is_cuda(), "mmcl_fast: ska_backward: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const Shapes s = check_inputs(q, k, &v, bias, key_padding_mask, query_padding_mask);
  check_ska_dropout(dropout_p, dropout_seed, q);
  TORCH_CHECK(!need_dbias || bias.has_value(), "mmcl_fast: ska_backward: need_dbias without a bias");
  // Autograd may hand a non-contiguous (e.g. expanded) gradient: made contiguous, not rejected.
  const at::Tensor dout = grad_out.contiguous();
  check_tensor(dout, "grad_out", q, 4);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(),
              "mmcl_fast: ska_backward: grad_out must match q in shape and dtype, got ",
              dout.sizes(), " ", dout.scalar_type());
  check_tensor(out, "out", q, 4);
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "mmcl_fast: ska_backward: out must match q in shape and dtype");
  check_tensor(lse, "lse", q, 3);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.size(0) == s.B && lse.size(1) == s.H &&
                  lse.size(2) == s.Lq,
              "mmcl_fast: ska_backward: lse must be float32 [B, H, Lq], got ", lse.scalar_type(),
              " ", lse.sizes());
  at::Tensor gcol;
  if (grad_colsum.has_value()) {
    gcol = grad_colsum->to(at::kFloat).contiguous();
    check_tensor(gcol, "grad_colsum", q, 3);
    TORCH_CHECK(gcol.size(0) == s.B && gcol.size(1) == s.H && gcol.size(2) == s.Lk,
                "mmcl_fast: ska_backward: grad_colsum must be [B, H, Lk], got ", gcol.sizes());
  }
  check_map_arg(grad_width, "grad_width", q, s.B, s.H, s.Lq, "Lq");
  check_map_arg(grad_height, "grad_height", q, s.B, s.H, s.Lk, "Lk");

  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  const bool dk_atomic = s.Bk == 1 && s.B > 1;
  const int dbias_mode = !need_dbias ? 0 : (s.Bb == 1 && s.B > 1 ? 2 : 1);
  at::Tensor delta = at::empty({s.B, s.H, s.Lq}, f32);
  at::Tensor dq32 = at::zeros(q.sizes(), f32);
  at::Tensor dk = dk_atomic ? at::zeros(k.sizes(), f32) : at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dbias;
  if (dbias_mode == 2)
    dbias = at::zeros(bias->sizes(), f32);
  else if (dbias_mode == 1)
    dbias = at::empty(bias->sizes(), bias->options());
  else
    dbias = at::empty({0}, bias.has_value() ? bias->options() : q.options());

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MMCL_DISPATCH_FHB(q.scalar_type(), "ska_backward_cuda", [&] {
    const int64_t rows = s.B * s.H * s.Lq;
    constexpr int rows_per_block = kDeltaThreads / 32;
    ska_delta_kernel<scalar_t><<<(rows + rows_per_block - 1) / rows_per_block, kDeltaThreads, 0,
                                 stream>>>(dout.const_data_ptr<scalar_t>(),
                                           out.const_data_ptr<scalar_t>(),
                                           delta.data_ptr<float>(), rows, static_cast<int>(s.D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (gcol.defined()) {  // delta += valid * sum_j P G_j: one sweep over the keys
      FwdParams<scalar_t> f{};
      f.q = q.const_data_ptr<scalar_t>();
      f.k = k.const_data_ptr<scalar_t>();
      f.v = v.const_data_ptr<scalar_t>();
      f.bias = opt_ptr<scalar_t>(bias);
      f.kpm = opt_ptr<bool>(key_padding_mask);
      f.qpm = opt_ptr<bool>(query_padding_mask);
      f.out = nullptr;
      f.lse = const_cast<float*>(lse.const_data_ptr<float>());  // only read in this mode
      f.colsum = nullptr;
      f.gcol = gcol.const_data_ptr<float>();
      f.delta = delta.data_ptr<float>();
      set_dims(f, s, scale);
      f.mode = kRowPG;  // sum_j P_ij G_j: the undropped P (f.drop_thr stays 0)
      dispatch_fwd<scalar_t>(f, static_cast<int>(s.B), stream);
    }
    BwdParams<scalar_t> p{};
    p.dout = dout.const_data_ptr<scalar_t>();
    p.q = q.const_data_ptr<scalar_t>();
    p.k = k.const_data_ptr<scalar_t>();
    p.v = v.const_data_ptr<scalar_t>();
    p.bias = opt_ptr<scalar_t>(bias);
    p.kpm = opt_ptr<bool>(key_padding_mask);
    p.qpm = opt_ptr<bool>(query_padding_mask);
    p.lse = lse.const_data_ptr<float>();
    p.delta = delta.const_data_ptr<float>();
    p.gcol = gcol.defined() ? gcol.const_data_ptr<float>() : nullptr;
    p.gw = opt_ptr<float>(grad_width);
    p.gu = opt_ptr<float>(grad_height);
    p.has_maps = grad_width.has_value() || grad_height.has_value();
    p.dq = dq32.data_ptr<float>();
    p.dk = dk_atomic ? nullptr : dk.data_ptr<scalar_t>();
    p.dk32 = dk_atomic ? dk.data_ptr<float>() : nullptr;
    p.dv = dv.data_ptr<scalar_t>();
    p.dbias = dbias_mode == 1 ? dbias.data_ptr<scalar_t>() : nullptr;
    p.dbias32 = dbias_mode == 2 ? dbias.data_ptr<float>() : nullptr;
    set_dims(p, s, scale);
    set_dropout(p, dropout_p, dropout_seed);
    p.dk_atomic = dk_atomic;
    p.dbias_mode = dbias_mode;
    dispatch_bwd<scalar_t>(p, static_cast<int>(s.B), stream);
  });
  // fp32 accumulation buffers to the output dtypes (no-ops for float32).
  at::Tensor dq = dq32.to(q.scalar_type());
  if (dk_atomic) dk = dk.to(k.scalar_type());
  if (dbias_mode == 2) dbias = dbias.to(bias->scalar_type());
  return {dq, dk, dv, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ska_score_maps_cuda(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask,
    const std::optional<at::Tensor>& teacher_width,
    const std::optional<at::Tensor>& teacher_height, double scale, bool normalize) {
  TORCH_CHECK(q.is_cuda(), "mmcl_fast: ska_score_maps: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const Shapes s = check_inputs(q, k, nullptr, bias, key_padding_mask, query_padding_mask);
  check_map_arg(teacher_width, "teacher_width", q, s.B, s.H, s.Lq, "Lq");
  check_map_arg(teacher_height, "teacher_height", q, s.B, s.H, s.Lk, "Lk");
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  at::Tensor width = at::empty({s.B, s.H, s.Lq}, f32);
  at::Tensor height = at::empty({s.B, s.H, s.Lk}, f32);
  at::Tensor dist = at::empty({s.B, s.H}, f32);  // every element written by the kernel
  at::Tensor gw = teacher_width.has_value() ? at::empty({s.B, s.H, s.Lq}, f32) : at::empty({0}, f32);
  at::Tensor gu = teacher_height.has_value() ? at::empty({s.B, s.H, s.Lk}, f32) : at::empty({0}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MMCL_DISPATCH_FHB(q.scalar_type(), "ska_score_maps_cuda", [&] {
    MapParams<scalar_t> p{};
    p.q = q.const_data_ptr<scalar_t>();
    p.k = k.const_data_ptr<scalar_t>();
    p.bias = opt_ptr<scalar_t>(bias);
    p.kpm = opt_ptr<bool>(key_padding_mask);
    p.qpm = opt_ptr<bool>(query_padding_mask);
    p.tw = opt_ptr<float>(teacher_width);
    p.th = opt_ptr<float>(teacher_height);
    p.width = width.data_ptr<float>();
    p.height = height.data_ptr<float>();
    p.dist = dist.data_ptr<float>();
    p.gw = teacher_width.has_value() ? gw.data_ptr<float>() : nullptr;
    p.gu = teacher_height.has_value() ? gu.data_ptr<float>() : nullptr;
    set_dims(p, s, scale);
    p.normalize = normalize;
    const dim3 grid(static_cast<unsigned>(s.H), static_cast<unsigned>(s.B));  // <= 65535 each
    ska_maps_kernel<scalar_t><<<grid, kMapThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {width, height, dist, gw, gu};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CUDA, m) {
  m.impl("ska_forward", &ska_forward_cuda);
  m.impl("ska_backward", &ska_backward_cuda);
  m.impl("ska_score_maps", &ska_score_maps_cuda);
}

}  // namespace mmcl_fast

// Op family B on the CPU: shared-key attention, flash-style, with the column sums of P
// (DESIGN.md section 5.2; the contract is that of the ska_forward / ska_backward schemas in
// ../mmcl_fast.cpp). Per (b, h), with k and bias read at batch 0 when they are broadcast:
//     S_ij = scale * q_i . k_j + bias_ij        (-inf where key j is padded)
//     lse_i = log sum_j exp(S_ij);  P_ij = exp(S_ij - lse_i);  out_i = sum_j P_ij v_j
//     colsum_j = sum_{i valid} P_ij
// A row whose scores are all -inf is empty: out_i = 0, lse_i = +inf, so P = exp(S - lse) = 0 in
// every later pass without a special case. Backward, with G = grad_colsum, gw = grad_width and
// gu = grad_height (each 0 when absent), qv_i / kv_j = 1 for a valid query / key, else 0:
//     Delta_i = dO_i . out_i + qv_i sum_j P_ij G_j
//     dS_ij = P_ij (dO_i . v_j + qv_i G_j - Delta_i) + qv_i kv_j (gw_i + gu_j)
//     dq = scale dS k,  dk = scale dS^T q,  dv = P^T dO,  dbias = dS
// (the last term of dS is the gradient through the pooled score maps below: w and u are linear
// in S, so it does not pass through the softmax).
// Dropout on P (dropout_p > 0): out_i = sum_j P_ij Z_ij v_j with Z_ij = keep_ij / (1 - p), keep
// drawn by Philox4x32-10 from (j >> 2, i, b H + h, "drop") and the seed (../ska_dropout.h; the
// spec is dropout_keep in mmcl_fast/ops/shared_key_attention.py), so the backward draws the
// forward's mask again instead of storing it. lse and colsum stay those of P; in the backward dv = (P Z)^T dO
// and dO . v_j becomes Z_ij dO . v_j; Delta = dO . out still holds, out being the dropped output.
// The pooled score maps (ska_score_maps), per (b, h), by their closed forms:
//     ksum = sum_j kv_j k_j,  qsum = sum_i qv_i q_i
//     w_i = qv_i (scale q_i . ksum + sum_j kv_j bias_ij),  u_j = kv_j (scale qsum . k_j + sum_i qv_i bias_ij)
// and against a teacher's map t (of w or u), n(x) = x / max(||x||, 1e-12) when normalizing:
//     d = ||ReLU(n(t) - n(x))||,  dist = d_w + d_u,  grad = dd/dx times the mask
// Accumulation is in the input's type (float or double), as are lse and colsum.
//
// Nothing of size Lq x Lk is allocated (dbias aside, when asked for): a block of BM queries meets
// the keys in tiles of BN, and the scores of one tile live in a per-thread scratch. The forward
// keeps a running max and sum per row (online softmax) and rescales its output accumulator when
// the max grows; the column sums need the final lse of each row, so they take a second sweep over
// the key tiles, except when one tile holds every key (the common case at MSPT lengths), where the
// tile's exp(S - max) divided by the row sum already is P. The backward recomputes P tile by tile
// (with G, a first sweep finds Delta). Keys after the last valid one of a batch element (right
// padding) are skipped altogether: their P is 0.
//
// The tile products are small GEMMs done by one register-blocked micro-kernel: a 6 x 16 (float;
// 6 x 8 double) block of C in twelve AVX2 registers, accumulated over k from a broadcast element
// of A times a contiguous row of B. Each operand is laid out so that B is contiguous along the
// output columns: k and v are transposed per (b, h) ([D][Lk], for S = q k^T and dP = dO v^T), and
// the rows of q, dO, k, v and of the gradients serve in place when D is a multiple of 16 (8 for
// double), else are copied zero-padded to one. The exp is a branch-free polynomial, so that the
// passes over a tile vectorise.
//
// Parallelism and determinism: the forward's work items are (b, h) pairs, or single query blocks
// when there are few pairs and no column sums; each output value is computed by one item in a
// fixed order. The backward's items are (b, h) pairs, each owning dq, dk, dv and dbias of its
// pair; when k is a bank (Bk == 1) or dbias is asked for a broadcast bias (Bb == 1), those
// gradients are sums over b, and an item is a head instead, looping over b in order. Results are
// therefore the same from run to run and for any number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include "cpu/cpu_clones.h"
#include "cpu/simd.h"
#include "philox.h"
#include "ska_dropout.h"

namespace mmcl_fast {
namespace {

// Columns of one micro-kernel block: two 256-bit registers.
template <typename T>
constexpr int64_t kNR = 64 / static_cast<int64_t>(sizeof(T));
// Rows of one micro-kernel block: 6 x 2 accumulators hide the FMA latency (4 cycles, 2 per
// cycle) and leave 4 of the 16 AVX2 registers for the two B loads and the broadcast.
constexpr int64_t kMR = 6;
// Query rows per block (forward, backward) and keys per tile. The backward's larger blocks halve
// how often its dk and dv accumulators are loaded and stored, for [BM][BN] tiles of P and dS of
// 36 KiB (float) each, which L2 holds; measured 5-10% faster than 32 rows. The forward holds one
// [BM][BN] tile and is indifferent.
constexpr int64_t kBM = 32;
constexpr int64_t kBMb = 64;
constexpr int64_t kBN = 128;
// Row stride of a score tile: off a power of two, so that the rows of a tile that a micro-kernel
// walks down (A = P^T) do not all fall into the same few L1 sets.
constexpr int64_t kLdS = kBN + 16;

MMCL_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ----------------------------------------------------------------------------------------------
// exp for the softmax, on a vector: branch-free. x = n ln2 + f with |f| <= ln2/2 (n by the
// round-to-nearest magic constant), exp(f) by a polynomial, 2^n by the exponent bits. Arguments
// are <= 0 up to rounding (scores minus their max or their lse); below the smallest normal result
// the answer is 0 (exp(-inf) = 0 included), which is what the softmax wants.
// float: Cephes' expf polynomial, ~1 ulp. double: Taylor series to f^13, ~1 ulp.
MMCL_INLINE vec_t<float> vexp(vec_t<float> x) {
  using V = vec_t<float>;
  using VI = Vec<float>::vi;
  const V lo = vsplat(-87.0f), hi = vsplat(88.0f), magic = vsplat(12582912.0f);  // 1.5 * 2^23
  const V xc = x < lo ? lo : (x > hi ? hi : x);
  const V r = xc * 1.44269504088896341f + magic;
  const V n = r - magic;
  const VI ni = reinterpret_cast<const VI&>(r) - reinterpret_cast<const VI&>(magic);
  const V f = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  const V f2 = f * f;
  const V p =
      ((((((1.9875691500e-4f * f + 1.3981999507e-3f) * f + 8.3334519073e-3f) * f +
          4.1665795894e-2f) * f + 1.6666665459e-1f) * f + 5.0000001201e-1f) * f2 + f) + 1.0f;
  const VI sbits = (ni + 127) << 23;
  const V e = p * reinterpret_cast<const V&>(sbits);
  return x < lo ? V{} : e;
}

MMCL_INLINE vec_t<double> vexp(vec_t<double> x) {
  using V = vec_t<double>;
  using VI = Vec<double>::vi;
  const V lo = vsplat(-708.0), hi = vsplat(709.0), magic = vsplat(6755399441055744.0);  // 1.5*2^52
  const V xc = x < lo ? lo : (x > hi ? hi : x);
  const V r = xc * 1.4426950408889634074 + magic;
  const V n = r - magic;
  const VI ni = reinterpret_cast<const VI&>(r) - reinterpret_cast<const VI&>(magic);
  const V f = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  V p = vsplat(1.0 / 6227020800.0);  // 1/13!
  p = p * f + 1.0 / 479001600.0;
  p = p * f + 1.0 / 39916800.0;
  p = p * f + 1.0 / 3628800.0;
  p = p * f + 1.0 / 362880.0;
  p = p * f + 1.0 / 40320.0;
  p = p * f + 1.0 / 5040.0;
  p = p * f + 1.0 / 720.0;
  p = p * f + 1.0 / 120.0;
  p = p * f + 1.0 / 24.0;
  p = p * f + 1.0 / 6.0;
  p = p * f + 0.5;
  p = p * f + 1.0;
  p = p * f + 1.0;
  const VI sbits = (ni + 1023) << 52;
  const V e = p * reinterpret_cast<const V&>(sbits);
  return x < lo ? V{} : e;
}

// ----------------------------------------------------------------------------------------------
// C[M][N] (+)= A[M][K] B[K][N], N a multiple of NR. A(i, k) is A[i * ars + k * aks] (so that a
// transposed tile serves as A without a copy), B(k, j) is B[k * ldb + j]. The MR x NR block of C
// lives in 2 * MR vector registers; each k costs two loads of B, MR broadcasts of A, 2 * MR FMAs.
template <typename T, int64_t MR, bool ACC>
MMCL_INLINE void micro_kernel(int64_t K, const T* __restrict__ A, int64_t ars, int64_t aks,
                              const T* __restrict__ B, int64_t ldb, T* __restrict__ C,
                              int64_t ldc) {
  using V = vec_t<T>;
  constexpr int64_t W = kW<T>;
  V c0[MR], c1[MR];
  for (int64_t i = 0; i < MR; ++i) {
    c0[i] = ACC ? vload(C + i * ldc) : V{};
    c1[i] = ACC ? vload(C + i * ldc + W) : V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = vload(B + k * ldb), b1 = vload(B + k * ldb + W);
    for (int64_t i = 0; i < MR; ++i) {
      const T a = A[i * ars + k * aks];
      c0[i] += a * b0;
      c1[i] += a * b1;
    }
  }
  for (int64_t i = 0; i < MR; ++i) {
    vstore(C + i * ldc, c0[i]);
    vstore(C + i * ldc + W, c1[i]);
  }
}

// One panel of NR columns at a time (its K x NR slice of B stays in L1 while every row block of A
// passes over it), rows in blocks of MR. A block of fewer than 4 rows has too few independent
// accumulators to hide the FMA latency, so a remainder of 1 to 3 rows borrows from the last full
// block: 7 = 3 + 4, 8 = 4 + 4, 9 = 5 + 4 rows.
template <typename T, bool ACC>
MMCL_CPU_CLONES MMCL_NOINLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars,
                                        int64_t aks, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t j = 0; j < N; j += NR) {
    for (int64_t i = 0; i < M;) {
      const int64_t r = M - i;
      const int64_t mr = (r >= 10 || r == kMR) ? kMR : (r > kMR ? r - 4 : r);
      const T* a = A + i * ars;
      T* c = C + i * ldc + j;
      switch (mr) {
        case 6:
          micro_kernel<T, 6, ACC>(K, a, ars, aks, B + j, ldb, c, ldc);
          break;
        case 5:
          micro_kernel<T, 5, ACC>(K, a, ars, aks, B + j, ldb, c, ldc);
          break;
        case 4:
          micro_kernel<T, 4, ACC>(K, a, ars, aks, B + j, ldb, c, ldc);
          break;
        case 3:
          micro_kernel<T, 3, ACC>(K, a, ars, aks, B + j, ldb, c, ldc);
          break;
        case 2:
          micro_kernel<T, 2, ACC>(K, a, ars, aks, B + j, ldb, c, ldc);
          break;
        default:
          micro_kernel<T, 1, ACC>(K, a, ars, aks, B + j, ldb, c, ldc);
          break;
      }
      i += mr;
    }
  }
}

// C = A B (first = true) or C += A B: the first product into a block of C writes it, so that
// outputs need no zero fill before they are accumulated into.
template <typename T>
MMCL_INLINE void gemm_into(bool first, int64_t M, int64_t N, int64_t K, const T* A, int64_t ars,
                           int64_t aks, const T* B, int64_t ldb, T* C, int64_t ldc) {
  if (first)
    gemm<T, false>(M, N, K, A, ars, aks, B, ldb, C, ldc);
  else
    gemm<T, true>(M, N, K, A, ars, aks, B, ldb, C, ldc);
}

// ----------------------------------------------------------------------------------------------
// Row helpers over n = a multiple of NR values, two vectors of lanes at a time; the lane order is
// fixed, so the results are reproducible.

// s = exp(s - shift) in place; returns the sum.
template <typename T>
MMCL_INLINE T row_exp_sum(T* __restrict__ s, int64_t n, T shift) {
  using V = vec_t<T>;
  constexpr int64_t W = kW<T>;
  V a0{}, a1{};
  for (int64_t j = 0; j < n; j += 2 * W) {
    const V p0 = vexp(vload(s + j) - shift), p1 = vexp(vload(s + j + W) - shift);
    vstore(s + j, p0);
    vstore(s + j + W, p1);
    a0 += p0;
    a1 += p1;
  }
  return hsum<T>(a0 + a1);
}

// sum_j a_j b_j over n = a multiple of NR
template <typename T>
MMCL_INLINE T row_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using V = vec_t<T>;
  constexpr int64_t W = kW<T>;
  V a0{}, a1{};
  for (int64_t j = 0; j < n; j += 2 * W) {
    a0 += vload(a + j) * vload(b + j);
    a1 += vload(a + j + W) * vload(b + j + W);
  }
  return hsum<T>(a0 + a1);
}

// ----------------------------------------------------------------------------------------------
// Per-thread scratch, carved into named tiles: one 64-byte-aligned buffer per thread, kept
// between calls so that a call does not page-fault fresh memory in (up to kKeepBytes; a larger
// one lives as long as the Scratch).
constexpr size_t kKeepBytes = size_t(8) << 20;

struct Buffer {
  void* p = nullptr;
  size_t bytes = 0;
  void reserve(size_t n) {  // n: a multiple of 64
    if (bytes >= n) return;
    std::free(p);
    p = std::aligned_alloc(64, n);
    bytes = p == nullptr ? 0 : n;
    TORCH_CHECK(p != nullptr, "mmcl_fast: ska: cannot allocate ", n, " bytes of scratch");
  }
  ~Buffer() { std::free(p); }
};

template <typename T>
struct Scratch {
  Buffer own;
  T* base;
  int64_t used = 0, cap;
  int64_t kt_key = -1;  // forward: which keys kt holds (a bank's head, or a pair; -1: none)
  explicit Scratch(int64_t elems) : cap(round_up(std::max<int64_t>(elems, 16), 16)) {
    static thread_local Buffer kept;
    const size_t bytes = static_cast<size_t>(cap) * sizeof(T);
    Buffer& buf = bytes <= kKeepBytes ? kept : own;
    buf.reserve(bytes);
    base = static_cast<T*>(buf.p);
  }
  T* take(int64_t n) {
    T* p = base + used;
    used += round_up(n, 16);  // keeps every tile 64-byte aligned
    TORCH_INTERNAL_ASSERT(used <= cap);
    return p;
  }
};

template <typename T>
struct Problem {
  const T* q;
  const T* k;
  const T* v;
  const T* bias;  // null: none
  const bool* kpm;  // null: none
  const bool* qpm;  // null: none
  int64_t B, H, Lq, Lk, D, Bk, Bb;
  T scale;
  int64_t Dp;    // D rounded up to NR: the row length of every [L][D] operand of a product
  int64_t Lkp;   // Lk rounded up to NR: the row length of transposed keys and values
  int64_t nqb;   // forward query blocks per (b, h), of bm rows (the last one may be shorter)
  int64_t bm;
  bool direct;   // D == Dp: rows of q, k, v, dO and the gradients serve as operands in place
  bool dropout;  // dropout on P: the fields below
  uint32_t drop_thr, drop_k0, drop_k1;
  T drop_scale;  // 1 / (1 - p)

  const T* k_of(int64_t b, int64_t h) const { return k + ((Bk == 1 ? 0 : b) * H + h) * Lk * D; }
  const T* v_of(int64_t b, int64_t h) const { return v + (b * H + h) * Lk * D; }
  const T* bias_of(int64_t b, int64_t h) const {
    return bias == nullptr ? nullptr : bias + ((Bb == 1 ? 0 : b) * H + h) * Lq * Lk;
  }
};

// In-register transpose of an 8 x 8 float block (the usual unpack / shuffle / lane-swap ladder).
MMCL_INLINE void transpose8x8(const float* x, int64_t ldx, float* y, int64_t ldy) {
  using V = vec_t<float>;
  V r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = vload(x + i * ldx);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    vstore(y + i * ldy, __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    vstore(y + (i + 4) * ldy, __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

// x [L][D] -> xt [D][ldt] (columns >= L zero)
template <typename T>
MMCL_INLINE void pack_transposed(const T* __restrict__ x, int64_t L, int64_t D, int64_t ldt,
                                 T* __restrict__ xt) {
  int64_t j0 = 0;
  if constexpr (std::is_same<T, float>::value) {
    for (; j0 + 8 <= L; j0 += 8) {
      int64_t d0 = 0;
      for (; d0 + 8 <= D; d0 += 8) transpose8x8(x + j0 * D + d0, D, xt + d0 * ldt + j0, ldt);
      for (int64_t d = d0; d < D; ++d)
        for (int64_t j = j0; j < j0 + 8; ++j) xt[d * ldt + j] = x[j * D + d];
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    T* row = xt + d * ldt;
    for (int64_t j = j0; j < L; ++j) row[j] = x[j * D + d];
    for (int64_t j = L; j < ldt; ++j) row[j] = T(0);
  }
}

// x [L][D] -> xp [L][Dp] (columns >= D zero)
template <typename T>
MMCL_INLINE void pack_rows(const T* __restrict__ x, int64_t L, int64_t D, int64_t Dp,
                           T* __restrict__ xp) {
  for (int64_t j = 0; j < L; ++j) {
    std::memcpy(xp + j * Dp, x + j * D, sizeof(T) * D);
    for (int64_t d = D; d < Dp; ++d) xp[j * Dp + d] = T(0);
  }
}

// Rows [r0, r0 + n) of a [*][D] tensor as a [n][Dp] operand: in place when D == Dp, else packed.
template <typename T>
MMCL_INLINE const T* operand_rows(const Problem<T>& p, const T* x, int64_t n, T* buf) {
  if (p.direct) return x;
  pack_rows(x, n, p.D, p.Dp, buf);
  return buf;
}

// acc [L][Dp] -> y [L][D] times s (in place when they are the same memory, D == Dp)
template <typename T>
MMCL_INLINE void store_rows(const T* acc, int64_t L, int64_t D, int64_t Dp, T s, T* y) {
  for (int64_t j = 0; j < L; ++j)
    for (int64_t d = 0; d < D; ++d) y[j * D + d] = s * acc[j * Dp + d];
}

// sum_e a_e b_e over any n
template <typename T>
MMCL_INLINE T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  constexpr int64_t W = kW<T>;
  vec_t<T> acc{};
  int64_t e = 0;
  for (; e + W <= n; e += W) acc += vload(a + e) * vload(b + e);
  T r = hsum<T>(acc);
  for (; e < n; ++e) r += a[e] * b[e];
  return r;
}

// Additive key mask of batch b: 0 for a valid key, -inf for a padded one and for the padding
// columns [Lk, Lkp) of the last tile.
template <typename T>
MMCL_INLINE void fill_key_add(const Problem<T>& p, int64_t b, T* __restrict__ kadd) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const bool* m = p.kpm == nullptr ? nullptr : p.kpm + b * p.Lk;
  for (int64_t j = 0; j < p.Lk; ++j) kadd[j] = (m != nullptr && m[j]) ? ninf : T(0);
  for (int64_t j = p.Lk; j < p.Lkp; ++j) kadd[j] = ninf;
}

// Keys after the last valid one of batch b (right padding) take no part at all: their P is 0, so
// the key tiles stop there. Returns that count (0 when every key is padded).
template <typename T>
MMCL_INLINE int64_t active_keys(const Problem<T>& p, int64_t b) {
  if (p.kpm == nullptr) return p.Lk;
  const bool* m = p.kpm + b * p.Lk;
  int64_t n = p.Lk;
  while (n > 0 && m[n - 1]) --n;
  return n;
}

// The keep flags (1.f / 0.f) of one row of dropout: keys 4 g0 .. 4 (g0 + ng) - 1 of query i of
// pair bh, one Philox call per group of four keys (word e for key 4 g + e). Two forms: AVX2
// intrinsics (8 groups per vector: the 32 x 32 -> 64-bit products by vpmuludq on the even and odd
// lanes, and the words transposed to key order in registers) and a portable loop over
// ../philox.h's scalar function. The AVX2 form replaced GCC's vectorisation of the loop in
// structure-of-arrays form, which spent most of its time in shuffles: at B 32, H 12, L 128 on this
// repo's 2-core VM the raw backward with dropout took 38.5-39.3 ms with the AVX2 form and
// 46.0-47.8 ms with that loop (34-35 ms without dropout; two runs each of
// [MMCL_FAST_PORTABLE_DROPOUT=1] python benchmarks/profile_shared_key_attention.py cpu). The scalar
// loop now in its place is simpler; two runs of the same command on a busier VM did not separate it
// from the AVX2 form (backward with minus without dropout: 6.0 and 8.4 ms AVX2, 4.8 and 15.0 ms
// scalar).
// The AVX2 form writes 4 round_up(ng, 8) floats (its last vector may run past the row's keys).
constexpr int64_t kKeepGroups = kBN / 4;

inline void keep_row_portable(uint32_t k0, uint32_t k1, uint32_t i, uint32_t bh, uint32_t g0,
                              int64_t ng, uint32_t thr, float* keep) {
  for (int64_t g = 0; g < ng; ++g) {
    const Philox4 x = philox4x32_10(g0 + static_cast<uint32_t>(g), i, bh, kDropoutTag, k0, k1);
    for (int e = 0; e < 4; ++e) keep[4 * g + e] = (x.x[e] >> 8) >= thr ? 1.f : 0.f;
  }
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MMCL_KEEP_AVX2 1
// (hi, lo) 32-bit halves of m * c per lane
__attribute__((target("avx2"))) inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void keep_row_avx2(uint32_t k0_, uint32_t k1_, uint32_t i,
                                                  uint32_t bh, uint32_t g0, int64_t ng,
                                                  uint32_t thr, float* keep) {
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i below = _mm256_set1_epi32(static_cast<int>(thr) - 1);  // thr >= 1 with dropout
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < ng; g += 8) {
    const __m256i gi = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(g0 + g)), lane);
    __m256i c0 = gi, c1 = _mm256_set1_epi32(static_cast<int>(i));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(bh));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(kDropoutTag));
    uint32_t k0 = k0_, k1 = k1_;
    for (int r = 0; r < 10; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(ma, c0, hi0, lo0);
      mulhilo8(mb, c2, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // keep = (x >> 8) >= thr (x >> 8 < 2^24: a signed compare is exact); groups past ng drop
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ng - g)), lane);
    __m256 w[4];
    const __m256i x[4] = {c0, c1, c2, c3};
    for (int e = 0; e < 4; ++e) {
      const __m256i k = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_srli_epi32(x[e], 8), below), live);
      w[e] = _mm256_and_ps(_mm256_castsi256_ps(k), one);
    }
    // [word e][group] -> [group][word e]: a 4 x 8 transpose
    const __m256 t0 = _mm256_unpacklo_ps(w[0], w[1]), t1 = _mm256_unpackhi_ps(w[0], w[1]);
    const __m256 t2 = _mm256_unpacklo_ps(w[2], w[3]), t3 = _mm256_unpackhi_ps(w[2], w[3]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    float* out = keep + 4 * g;
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}
#endif

// The dropout multipliers Z of a tile, rows [i0, i0 + mq) and keys [j0, j0 + nkp) of pair bh
// (j0 and nkp multiples of 4), into z (rows kLdS apart): Z = keep / (1 - p).
template <typename T>
MMCL_INLINE void dropout_tile(const Problem<T>& p, int64_t bh, int64_t i0, int64_t mq, int64_t j0,
                              int64_t nkp, T* z) {
  static_assert(4 * kKeepGroups <= kLdS, "a keep row is written in whole vectors of 8 groups");
#ifdef MMCL_KEEP_AVX2
  // MMCL_FAST_PORTABLE_DROPOUT=1 takes the portable form on an AVX2 machine too (its test)
  static const bool avx2 = __builtin_cpu_supports("avx2") &&
                           std::getenv("MMCL_FAST_PORTABLE_DROPOUT") == nullptr;
#endif
  alignas(64) float keep[4 * kKeepGroups];
  const int64_t ng = nkp / 4;
  const T sc = p.drop_scale;
  for (int64_t i = 0; i < mq; ++i) {
    const uint32_t qi = static_cast<uint32_t>(i0 + i), g0 = static_cast<uint32_t>(j0 >> 2);
#ifdef MMCL_KEEP_AVX2
    if (avx2)
      keep_row_avx2(p.drop_k0, p.drop_k1, qi, static_cast<uint32_t>(bh), g0, ng, p.drop_thr, keep);
    else
#endif
      keep_row_portable(p.drop_k0, p.drop_k1, qi, static_cast<uint32_t>(bh), g0, ng, p.drop_thr,
                        keep);
    T* __restrict__ zr = z + i * kLdS;
    for (int64_t j = 0; j < nkp; ++j) zr[j] = static_cast<T>(keep[j]) * sc;
  }
}

// x *= z over a tile of mq rows and nkp (a multiple of NR) columns, both kLdS apart
template <typename T>
MMCL_INLINE void scale_tile(T* __restrict__ x, const T* __restrict__ z, int64_t mq, int64_t nkp) {
  constexpr int64_t W = kW<T>;
  for (int64_t i = 0; i < mq; ++i)
    for (int64_t j = 0; j < nkp; j += W) vstore(x + i * kLdS + j, vload(x + i * kLdS + j) * vload(z + i * kLdS + j));
}

// Epilogue of the score product (store(i, j, ...) gets columns [j, j + NR) of row i of the tile):
// S = scale q.k + key mask + bias (bias only over the nk real
// columns of the tile; the padding columns get -inf from the mask), and with EXP the
// probabilities P = exp(S - lse_i) instead.
template <typename T, bool EXP>
struct ScoreEpi {
  T scale;
  const T* kadd;   // at the tile's first column
  const T* bias;   // at the tile's first row and column, rows ldbias apart; null: none
  int64_t ldbias;
  int64_t nk;
  const T* shift;  // EXP: lse of the tile's rows
  MMCL_INLINE void compute(int64_t i, int64_t j, vec_t<T>& s0, vec_t<T>& s1) const {
    constexpr int64_t W = kW<T>, NR = kNR<T>;
    s0 = scale * s0 + vload(kadd + j);
    s1 = scale * s1 + vload(kadd + j + W);
    if (bias != nullptr) {
      const T* br = bias + i * ldbias + j;
      if (j + NR <= nk) {
        s0 += vload(br);
        s1 += vload(br + W);
      } else {  // the last, partial panel: the bias row ends at nk
        T t[NR];
        for (int64_t l = 0; l < NR; ++l) t[l] = j + l < nk ? br[l] : T(0);
        s0 += vload(t);
        s1 += vload(t + W);
      }
    }
    if (EXP) {
      s0 = vexp(s0 - shift[i]);
      s1 = vexp(s1 - shift[i]);
    }
  }
  MMCL_INLINE void store(int64_t i, int64_t j, vec_t<T> c0, vec_t<T> c1, T* c) const {
    compute(i, j, c0, c1);
    vstore(c, c0);
    vstore(c + kW<T>, c1);
  }
};

// One pass of an epilogue over a tile of M rows and N (a multiple of NR) columns, in place. (Run
// inside the GEMM's micro-kernel instead, it would save a pass but leave the hot loop short of
// registers: GCC then spills accumulators.)
template <typename T, typename Epi>
MMCL_INLINE void apply_epi(const Epi& epi, T* c, int64_t ldc, int64_t M, int64_t N) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; j += kNR<T>) {
      T* x = c + i * ldc + j;
      epi.store(i, j, vload(x), vload(x + kW<T>), x);
    }
}

// S (shift = null) or P (shift = lse of the rows) tile of query rows [i0, i0 + mq) and keys
// [j0, j0 + nkp). qa [mq][ldq], kt [D][Lkp]; rows of s are kLdS apart. With rowmax (S only), the
// max of each row of the tile too, in the same pass.
template <typename T>
MMCL_INLINE void score_tile(const Problem<T>& p, const T* qa, int64_t ldq, const T* kt,
                            const T* bias_bh, const T* kadd, int64_t i0, int64_t mq, int64_t j0,
                            int64_t nk, int64_t nkp, const T* shift, T* s, T* rowmax = nullptr) {
  gemm<T, false>(mq, nkp, p.D, qa, ldq, 1, kt + j0, p.Lkp, s, kLdS);
  const T* bias = bias_bh == nullptr ? nullptr : bias_bh + i0 * p.Lk + j0;
  if (shift != nullptr) {
    apply_epi(ScoreEpi<T, true>{p.scale, kadd + j0, bias, p.Lk, nk, shift}, s, kLdS, mq, nkp);
    return;
  }
  const ScoreEpi<T, false> epi{p.scale, kadd + j0, bias, p.Lk, nk, nullptr};
  if (rowmax == nullptr) {
    apply_epi(epi, s, kLdS, mq, nkp);
    return;
  }
  using V = vec_t<T>;
  constexpr int64_t W = kW<T>;
  for (int64_t i = 0; i < mq; ++i) {
    V m0 = vsplat(-std::numeric_limits<T>::infinity()), m1 = m0;
    for (int64_t j = 0; j < nkp; j += kNR<T>) {
      T* x = s + i * kLdS + j;
      V s0 = vload(x), s1 = vload(x + W);
      epi.compute(i, j, s0, s1);
      vstore(x, s0);
      vstore(x + W, s1);
      m0 = vmax<T>(s0, m0);
      m1 = vmax<T>(s1, m1);
    }
    rowmax[i] = hmax<T>(vmax<T>(m0, m1));
  }
}

// Epilogue of the dP = dO v^T product: dS = P (dP + valid G - Delta) + valid kv (gw + gu), stored
// in place of dP and, over the tile's nk real columns, written or added to dbias.
template <typename T>
struct DsEpi {
  const T* P;      // the tile's probabilities, rows kLdS apart
  const T* z;      // the tile's dropout multipliers, rows kLdS apart; null: no dropout
  const T* delta;  // Delta of the tile's rows
  const T* valid;  // valid of the tile's rows
  const T* g;      // G at the tile's first column; null: none
  const T* gw;     // grad_width of the tile's rows; null: none
  const T* kv;     // key validity (1/0) at the tile's first column (with gw)
  const T* gu;     // kv grad_height at the tile's first column (0 past Lk); null: none
  T* dbias;        // at the tile's first row and column, rows ldbias apart; null: none
  int64_t ldbias;
  int64_t nk;
  bool first;      // write dbias (else add to it)
  MMCL_INLINE void store(int64_t i, int64_t j, vec_t<T> c0, vec_t<T> c1, T* c) const {
    using V = vec_t<T>;
    constexpr int64_t W = kW<T>, NR = kNR<T>;
    const T di = delta[i];
    if (z != nullptr) {  // dropout: dO . v_j is times Z_ij, G_j is not
      c0 *= vload(z + i * kLdS + j);
      c1 *= vload(z + i * kLdS + j + W);
    }
    V t0 = c0 - di, t1 = c1 - di;
    if (g != nullptr && valid[i] != T(0)) {
      t0 += vload(g + j);
      t1 += vload(g + j + W);
    }
    V d0 = vload(P + i * kLdS + j) * t0, d1 = vload(P + i * kLdS + j + W) * t1;
    // the pooled score maps' gradient, valid_i kv_j (gw_i + gu_j): it does not pass through the
    // softmax, so it is not times P (gu here is already times kv)
    if (valid[i] != T(0)) {
      if (gw != nullptr) {
        d0 += gw[i] * vload(kv + j);
        d1 += gw[i] * vload(kv + j + W);
      }
      if (gu != nullptr) {
        d0 += vload(gu + j);
        d1 += vload(gu + j + W);
      }
    }
    vstore(c, d0);
    vstore(c + W, d1);
    if (dbias == nullptr) return;
    T* db = dbias + i * ldbias + j;
    if (j + NR <= nk) {
      if (first) {
        vstore(db, d0);
        vstore(db + W, d1);
      } else {
        vstore(db, vload(db) + d0);
        vstore(db + W, vload(db + W) + d1);
      }
    } else {  // the last, partial panel: the dbias row ends at nk
      T t[NR];
      vstore(t, d0);
      vstore(t + W, d1);
      for (int64_t l = 0; l < nk - j; ++l) db[l] = first ? t[l] : db[l] + t[l];
    }
  }
};

// ----------------------------------------------------------------------------------------------
// Forward

template <typename T>
struct FwdOut {
  T* out;
  T* lse;
  T* colsum;  // null: not asked for
};

template <typename T>
int64_t fwd_scratch_elems(const Problem<T>& p) {
  return round_up(p.D * p.Lkp, 16) + round_up(p.Lk * p.Dp, 16) + round_up(p.Lkp, 16) * 2 +
         round_up(kBM * p.Dp, 16) + round_up(kBM * kLdS, 16) * (p.dropout ? 2 : 1) +
         round_up(kBM, 16) * 4;
}

// Query blocks [qb_lo, qb_hi) of pair (b, h).
template <typename T>
MMCL_CPU_CLONES void fwd_item(const Problem<T>& p, const FwdOut<T>& o, int64_t b, int64_t h,
                              int64_t qb_lo, int64_t qb_hi, Scratch<T>& sc) {
  const int64_t D = p.D, Dp = p.Dp, Lk = p.Lk, Lkp = p.Lkp, Lq = p.Lq;
  const int64_t bh = b * p.H + h;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T pinf = std::numeric_limits<T>::infinity();
  sc.used = 0;
  T* kt = sc.take(D * Lkp);
  T* vbuf = sc.take(Lk * Dp);
  T* kadd = sc.take(Lkp);
  T* cs = sc.take(Lkp);
  T* accbuf = sc.take(kBM * Dp);
  T* s = sc.take(kBM * kLdS);
  T* m = sc.take(kBM);
  T* l = sc.take(kBM);
  T* w = sc.take(kBM);
  T* mt = sc.take(kBM);
  T* z = p.dropout ? sc.take(kBM * kLdS) : nullptr;

  // the transposed keys stay for the next items with the same keys (items run head-major: a
  // bank's head, or the query blocks of one pair)
  const int64_t kt_key = p.Bk == 1 ? h : p.H + bh;
  if (sc.kt_key != kt_key) {
    pack_transposed(p.k_of(b, h), Lk, D, Lkp, kt);
    sc.kt_key = kt_key;
  }
  const T* vb = operand_rows(p, p.v_of(b, h), Lk, vbuf);
  fill_key_add(p, b, kadd);
  const T* bias_bh = p.bias_of(b, h);
  const bool* qpm = p.qpm == nullptr ? nullptr : p.qpm + b * Lq;
  const bool colsum = o.colsum != nullptr;
  if (colsum) std::fill(cs, cs + Lkp, T(0));
  const int64_t Lke = active_keys(p, b), nkt = (Lke + kBN - 1) / kBN;
  // with one key tile, exp(S - m) / l of the tile is P: the column sums need no second sweep
  // (unless dropout has changed the tile by then)
  const bool one_tile = nkt == 1 && !p.dropout;

  for (int64_t qb = qb_lo; qb < qb_hi; ++qb) {
    const int64_t i0 = qb * p.bm, mq = std::min(p.bm, Lq - i0);
    const T* qa = p.q + (bh * Lq + i0) * D;  // A operand: no padding needed
    T* out = o.out + (bh * Lq + i0) * D;
    T* acc = p.direct ? out : accbuf;  // [mq][Dp]
    if (nkt == 0) std::fill(acc, acc + mq * Dp, T(0));
    for (int64_t i = 0; i < mq; ++i) {
      m[i] = ninf;
      l[i] = T(0);
    }
    for (int64_t t = 0; t < nkt; ++t) {
      const int64_t j0 = t * kBN, nk = std::min(kBN, Lke - j0), nkp = round_up(nk, kNR<T>);
      score_tile<T>(p, qa, D, kt, bias_bh, kadd, i0, mq, j0, nk, nkp, nullptr, s, mt);
      // online softmax: rescale what was accumulated when the running max grows
      for (int64_t i = 0; i < mq; ++i) {
        T* row = s + i * kLdS;
        const T mnew = mt[i] > m[i] ? mt[i] : m[i];
        const T shift = mnew == ninf ? T(0) : mnew;  // empty so far: exp(-inf - 0) = 0
        const T rowsum = row_exp_sum(row, nkp, shift);
        if (t > 0) {
          const T alpha = std::exp(m[i] - shift);  // m = -inf: 0
          l[i] = l[i] * alpha + rowsum;
          if (alpha != T(1)) {
            T* __restrict__ a = acc + i * Dp;
            for (int64_t d = 0; d < Dp; ++d) a[d] *= alpha;
          }
        } else {
          l[i] = rowsum;
        }
        m[i] = mnew;
      }
      if (p.dropout) {  // l has the tile's P; the output gets P Z
        dropout_tile(p, bh, i0, mq, j0, nkp, z);
        scale_tile(s, z, mq, nkp);
      }
      gemm_into(t == 0, mq, Dp, nk, s, kLdS, 1, vb + j0 * Dp, Dp, acc, Dp);
    }
    T* lse = o.lse + bh * Lq + i0;
    for (int64_t i = 0; i < mq; ++i) {
      const bool empty = !(l[i] > T(0));
      const T inv = empty ? T(0) : T(1) / l[i];
      lse[i] = empty ? pinf : m[i] + std::log(l[i]);
      store_rows(acc + i * Dp, 1, D, Dp, inv, out + i * D);
      // column-sum weight: valid_i / l_i with the single-tile shortcut, valid_i otherwise
      const T valid = (qpm != nullptr && qpm[i0 + i]) ? T(0) : T(1);
      w[i] = empty ? T(0) : (one_tile ? valid * inv : valid);
    }
    if (!colsum) continue;
    if (one_tile) {
      // s still holds exp(S - m) of the only tile: P = that / l
      const int64_t nkp = round_up(Lke, kNR<T>);
      for (int64_t i = 0; i < mq; ++i) {
        if (w[i] == T(0)) continue;
        const T wi = w[i];
        const T* __restrict__ row = s + i * kLdS;
        for (int64_t j = 0; j < nkp; ++j) cs[j] += wi * row[j];
      }
    } else {
      for (int64_t t = 0; t < nkt; ++t) {
        const int64_t j0 = t * kBN, nk = std::min(kBN, Lke - j0), nkp = round_up(nk, kNR<T>);
        score_tile(p, qa, D, kt, bias_bh, kadd, i0, mq, j0, nk, nkp, lse, s);
        for (int64_t i = 0; i < mq; ++i) {
          if (w[i] == T(0)) continue;
          const T* __restrict__ row = s + i * kLdS;
          T* __restrict__ c = cs + j0;
          for (int64_t j = 0; j < nkp; ++j) c[j] += row[j];
        }
      }
    }
  }
  if (colsum) std::copy(cs, cs + Lk, o.colsum + bh * Lk);
}

// ----------------------------------------------------------------------------------------------
// Backward

template <typename T>
struct BwdIO {
  const T* dout;
  const T* out;
  const T* lse;
  const T* gcol;  // null: none
  const T* gw;    // grad_width [B, H, Lq]; null: none
  const T* gu;    // grad_height [B, H, Lk]; null: none
  T* dq;
  T* dk;
  T* dv;
  T* dbias;  // null: not asked for
};

template <typename T>
int64_t bwd_scratch_elems(const Problem<T>& p) {
  return round_up(p.D * p.Lkp, 16) * 2 + round_up(p.Lk * p.Dp, 16) * 3 + round_up(p.Lkp, 16) * 4 +
         round_up(kBMb * p.Dp, 16) * 3 + round_up(kBMb * kLdS, 16) * (p.dropout ? 3 : 2) +
         round_up(kBMb, 16) * 2;
}

template <typename T>
struct BwdBufs {
  T *kt, *vt, *kbuf, *dkbuf, *dvbuf, *kadd, *g, *kv, *gu, *qbuf, *dobuf, *dqbuf, *ps, *ds, *delta,
      *valid, *z;
};

// The gradients of pair (b, h): dq and dv written, dbias rows and dk_acc ([Lk][Dp], unscaled)
// written (dbias_first, dk_first) or added to (for a key bank dk keeps summing over b). kt and kb hold
// this pair's keys (transposed, and as [Lk][Dp] rows).
template <typename T>
MMCL_CPU_CLONES void bwd_pair(const Problem<T>& p, const BwdIO<T>& io, int64_t b, int64_t h,
                              const T* kb, bool dbias_first, bool dk_first, T* dk_acc,
                              const BwdBufs<T>& s) {
  const int64_t D = p.D, Dp = p.Dp, Lk = p.Lk, Lkp = p.Lkp, Lq = p.Lq;
  const int64_t bh = b * p.H + h;
  const int64_t Lke = active_keys(p, b), nkt = (Lke + kBN - 1) / kBN;
  pack_transposed(p.v_of(b, h), Lke, D, Lkp, s.vt);
  fill_key_add(p, b, s.kadd);
  const bool has_g = io.gcol != nullptr;
  if (has_g) {
    std::copy(io.gcol + bh * Lk, io.gcol + (bh + 1) * Lk, s.g);
    std::fill(s.g + Lk, s.g + Lkp, T(0));
  }
  if (io.gw != nullptr || io.gu != nullptr)
    for (int64_t j = 0; j < Lkp; ++j) s.kv[j] = s.kadd[j] == T(0) ? T(1) : T(0);  // 0 past Lk
  if (io.gu != nullptr)
    for (int64_t j = 0; j < Lkp; ++j) s.gu[j] = j < Lk ? s.kv[j] * io.gu[bh * Lk + j] : T(0);
  T* dv = io.dv + bh * Lk * D;
  T* dv_acc = p.direct ? dv : s.dvbuf;
  // rows of the trimmed keys get no product
  std::fill(dv_acc + Lke * Dp, dv_acc + Lk * Dp, T(0));
  if (dk_first) std::fill(dk_acc + Lke * Dp, dk_acc + Lk * Dp, T(0));
  const T* bias_bh = p.bias_of(b, h);
  T* dbias_bh =
      io.dbias == nullptr ? nullptr : io.dbias + ((p.Bb == 1 ? 0 : b) * p.H + h) * Lq * Lk;
  const bool* qpm = p.qpm == nullptr ? nullptr : p.qpm + b * Lq;
  T* delta = s.delta;
  T* valid = s.valid;

  const int64_t nqb = (Lq + kBMb - 1) / kBMb, bm = (Lq + nqb - 1) / nqb;  // balanced blocks
  for (int64_t qb = 0; qb < nqb; ++qb) {
    const int64_t i0 = qb * bm, mq = std::min(bm, Lq - i0);
    const T* qa = operand_rows(p, p.q + (bh * Lq + i0) * D, mq, s.qbuf);        // [mq][Dp]
    const T* doa = operand_rows(p, io.dout + (bh * Lq + i0) * D, mq, s.dobuf);  // [mq][Dp]
    T* dq = io.dq + (bh * Lq + i0) * D;
    T* dq_acc = p.direct ? dq : s.dqbuf;
    if (nkt == 0) std::fill(dq_acc, dq_acc + mq * Dp, T(0));
    const T* lse = io.lse + bh * Lq + i0;
    for (int64_t i = 0; i < mq; ++i) {
      delta[i] = dot(doa + i * Dp, io.out + (bh * Lq + i0 + i) * D, D);
      valid[i] = (qpm != nullptr && qpm[i0 + i]) ? T(0) : T(1);
    }
    if (has_g) {
      // Delta_i += valid_i sum_j P_ij G_j: one more sweep over the keys
      for (int64_t t = 0; t < nkt; ++t) {
        const int64_t j0 = t * kBN, nk = std::min(kBN, Lke - j0), nkp = round_up(nk, kNR<T>);
        score_tile(p, qa, Dp, s.kt, bias_bh, s.kadd, i0, mq, j0, nk, nkp, lse, s.ps);
        for (int64_t i = 0; i < mq; ++i) {
          if (valid[i] == T(0)) continue;
          delta[i] += row_dot(s.ps + i * kLdS, s.g + j0, nkp);
        }
      }
    }
    for (int64_t t = 0; t < nkt; ++t) {
      const int64_t j0 = t * kBN, nk = std::min(kBN, Lke - j0), nkp = round_up(nk, kNR<T>);
      T* ps = s.ps;
      T* ds = s.ds;
      // (with one key tile, the sweep for G left this tile's P in ps)
      if (!(has_g && nkt == 1)) score_tile(p, qa, Dp, s.kt, bias_bh, s.kadd, i0, mq, j0, nk, nkp, lse, ps);
      if (p.dropout) dropout_tile(p, bh, i0, mq, j0, nkp, s.z);
      // dP = dO v^T, turned into dS (and dbias) in place
      gemm<T, false>(mq, nkp, D, doa, Dp, 1, s.vt + j0, Lkp, ds, kLdS);
      apply_epi(DsEpi<T>{ps, s.z, delta, valid, has_g ? s.g + j0 : nullptr,
                         io.gw == nullptr ? nullptr : io.gw + bh * Lq + i0, s.kv + j0,
                         io.gu == nullptr ? nullptr : s.gu + j0,
                         dbias_bh == nullptr ? nullptr : dbias_bh + i0 * Lk + j0, Lk, nk,
                         dbias_first},
                ds, kLdS, mq, nkp);
      // dv[j] += sum_i P_ij Z_ij dO_i ; dk[j] += sum_i dS_ij q_i ; dq_i += sum_j dS_ij k_j
      if (p.dropout) scale_tile(ps, s.z, mq, nkp);  // (P is not read again: a later tile recomputes it)
      gemm_into(qb == 0, nk, Dp, mq, ps, 1, kLdS, doa, Dp, dv_acc + j0 * Dp, Dp);
      gemm_into(qb == 0 && dk_first, nk, Dp, mq, ds, 1, kLdS, qa, Dp, dk_acc + j0 * Dp, Dp);
      gemm_into(t == 0, mq, Dp, nk, ds, kLdS, 1, kb + j0 * Dp, Dp, dq_acc, Dp);
    }
    store_rows(dq_acc, mq, D, Dp, p.scale, dq);
    if (dbias_bh != nullptr && dbias_first && Lke < Lk)
      for (int64_t i = 0; i < mq; ++i)
        std::fill(dbias_bh + (i0 + i) * Lk + Lke, dbias_bh + (i0 + i + 1) * Lk, T(0));
  }
  if (!p.direct) store_rows(dv_acc, Lk, D, Dp, T(1), dv);
}

// One work item of the backward: pair (b, h), or head h for every b in order (shared = true).
template <typename T>
MMCL_CPU_CLONES void bwd_item(const Problem<T>& p, const BwdIO<T>& io, int64_t item, bool shared,
                              Scratch<T>& sc) {
  const int64_t D = p.D, Dp = p.Dp, Lk = p.Lk, Lkp = p.Lkp;
  sc.used = 0;
  BwdBufs<T> s;
  s.kt = sc.take(D * Lkp);
  s.vt = sc.take(D * Lkp);
  s.kbuf = sc.take(Lk * Dp);
  s.dkbuf = sc.take(Lk * Dp);
  s.dvbuf = sc.take(Lk * Dp);
  s.kadd = sc.take(Lkp);
  s.g = sc.take(Lkp);
  s.kv = sc.take(Lkp);
  s.gu = sc.take(Lkp);
  s.qbuf = sc.take(kBMb * Dp);
  s.dobuf = sc.take(kBMb * Dp);
  s.dqbuf = sc.take(kBMb * Dp);
  s.ps = sc.take(kBMb * kLdS);
  s.ds = sc.take(kBMb * kLdS);
  s.delta = sc.take(kBMb);
  s.valid = sc.take(kBMb);
  s.z = p.dropout ? sc.take(kBMb * kLdS) : nullptr;
  const int64_t b_lo = shared ? 0 : item / p.H, b_hi = shared ? p.B : b_lo + 1;
  const int64_t h = item % p.H;
  const T* kb = nullptr;
  T* dk_acc = nullptr;
  for (int64_t b = b_lo; b < b_hi; ++b) {
    // a bank's keys are packed once per head and its dk sums over b; per-batch k every b
    T* dk = io.dk + ((p.Bk == 1 ? 0 : b) * p.H + h) * Lk * D;
    if (b == b_lo || p.Bk != 1) {
      pack_transposed(p.k_of(b, h), Lk, D, Lkp, s.kt);
      kb = operand_rows(p, p.k_of(b, h), Lk, s.kbuf);
      dk_acc = p.direct ? dk : s.dkbuf;
    }
    bwd_pair(p, io, b, h, kb, b == b_lo || p.Bb != 1, b == b_lo || p.Bk != 1, dk_acc, s);
    if (p.Bk != 1 || b == b_hi - 1) store_rows(dk_acc, Lk, D, Dp, p.scale, dk);
  }
}

// ----------------------------------------------------------------------------------------------
// The pooled score maps by their closed forms, and the distillation distance per (b, h)

// One side of the distance: x (the student's map, masked), t (the teacher's), both of length n.
// Returns d = ||ReLU(n(t) - n(x))|| and writes gx = dd/dx times the mask m (1/0 per position).
template <typename T>
T map_distance(const T* x, const T* t, const T* m, int64_t n, bool normalize, T* gx) {
  constexpr double kEps = 1e-12;
  double xx = 0, tt = 0;
  for (int64_t i = 0; i < n; ++i) {
    xx += double(x[i]) * x[i];
    tt += double(t[i]) * t[i];
  }
  const double xn = std::sqrt(xx), tn = std::sqrt(tt);
  const T sx = normalize ? T(1 / std::max(xn, kEps)) : T(1);
  const T st = normalize ? T(1 / std::max(tn, kEps)) : T(1);
  double rr = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T r = std::max(t[i] * st - x[i] * sx, T(0));
    gx[i] = r;  // r for now
    rr += double(r) * r;
  }
  const T d = T(std::sqrt(rr));
  // gnx = -r / d (0 when d = 0); through nx = x / max(||x||, eps): the projection off nx, over
  // ||x||, where ||x|| > eps, else 1 / eps
  const T inv_d = d > T(0) ? T(1) / d : T(0);
  double dot = 0;
  for (int64_t i = 0; i < n; ++i) {
    gx[i] = -gx[i] * inv_d;
    dot += double(x[i] * sx) * gx[i];
  }
  const bool proj = normalize && xn > kEps;
  for (int64_t i = 0; i < n; ++i) {
    T g = gx[i];
    if (proj) g = (g - x[i] * sx * T(dot)) * sx;
    else if (normalize) g = g * T(1 / kEps);
    gx[i] = g * m[i];
  }
  return d;
}

template <typename T>
struct MapsIO {
  const T* tw;  // teacher maps; null: absent
  const T* th;
  T* w;
  T* u;
  T* dist;
  T* gw;  // null with tw
  T* gu;  // null with th
};

// Pair (b, h): ksum = sum_j kv_j k_j, qsum = sum_i qv_i q_i,
//   w_i = qv_i (scale q_i.ksum + sum_j kv_j bias_ij),  u_j = kv_j (scale qsum.k_j + sum_i qv_i bias_ij)
// then the distances against the teachers present. buf: 2 D + Lq + Lk elements.
template <typename T>
MMCL_CPU_CLONES void maps_pair(const Problem<T>& p, const MapsIO<T>& io, bool normalize, int64_t b,
                               int64_t h, T* buf) {
  const int64_t D = p.D, Lq = p.Lq, Lk = p.Lk, bh = b * p.H + h;
  T* ksum = buf;
  T* qsum = buf + D;
  T* qv = buf + 2 * D;
  T* kv = qv + Lq;
  for (int64_t i = 0; i < Lq; ++i) qv[i] = (p.qpm != nullptr && p.qpm[b * Lq + i]) ? T(0) : T(1);
  for (int64_t j = 0; j < Lk; ++j) kv[j] = (p.kpm != nullptr && p.kpm[b * Lk + j]) ? T(0) : T(1);
  const T* q = p.q + bh * Lq * D;
  const T* k = p.k_of(b, h);
  std::fill(ksum, ksum + 2 * D, T(0));
  for (int64_t j = 0; j < Lk; ++j)
    if (kv[j] != T(0))
      for (int64_t d = 0; d < D; ++d) ksum[d] += k[j * D + d];
  for (int64_t i = 0; i < Lq; ++i)
    if (qv[i] != T(0))
      for (int64_t d = 0; d < D; ++d) qsum[d] += q[i * D + d];
  T* w = io.w + bh * Lq;
  T* u = io.u + bh * Lk;
  for (int64_t i = 0; i < Lq; ++i) w[i] = p.scale * dot(q + i * D, ksum, D);
  for (int64_t j = 0; j < Lk; ++j) u[j] = p.scale * dot(k + j * D, qsum, D);
  if (const T* bias = p.bias_of(b, h)) {
    for (int64_t i = 0; i < Lq; ++i) {
      if (qv[i] == T(0)) continue;
      const T* __restrict__ row = bias + i * Lk;
      T* __restrict__ uu = u;
      for (int64_t j = 0; j < Lk; ++j) uu[j] += row[j];  // (apart from the dot: vectorised)
      w[i] += dot(kv, row, Lk);
    }
  }
  for (int64_t i = 0; i < Lq; ++i) w[i] *= qv[i];
  for (int64_t j = 0; j < Lk; ++j) u[j] *= kv[j];
  T dist = T(0);
  if (io.tw != nullptr) dist += map_distance(w, io.tw + bh * Lq, qv, Lq, normalize, io.gw + bh * Lq);
  if (io.th != nullptr) dist += map_distance(u, io.th + bh * Lk, kv, Lk, normalize, io.gu + bh * Lk);
  io.dist[bh] = dist;
}

// ----------------------------------------------------------------------------------------------
// Argument checks and the ops

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "mmcl_fast: ska: ", name, " must have ", dim, " dimensions, got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "mmcl_fast: ska: ", name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "mmcl_fast: ska: ", name, " must be a CPU tensor");
}

void check_same(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "mmcl_fast: ska: ", name, " has dtype ",
              t.scalar_type(), ", q has ", q.scalar_type());
}

// A per-(b, h) vector [B, H, L] in q's dtype (float32/float64: the accumulation type), or absent.
void check_map(const std::optional<at::Tensor>& t, const at::Tensor& q, const char* name,
               int64_t B, int64_t H, int64_t L) {
  if (!t.has_value()) return;
  check_tensor(*t, name, 3);
  check_same(*t, q, name);
  TORCH_CHECK(t->size(0) == B && t->size(1) == H && t->size(2) == L, "mmcl_fast: ska: ", name,
              " must be [B, H, L] = [", B, ", ", H, ", ", L, "], got ", t->sizes());
}

struct Dims {
  int64_t B, H, Lq, Lk, D, Bk, Bb;
};

// v: null for the score maps, which do not read it
Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& kpm,
                  const std::optional<at::Tensor>& qpm) {
  check_tensor(q, "q", 4);
  check_tensor(k, "k", 4);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "mmcl_fast: ska (CPU): q must be float32 or float64, got ", q.scalar_type());
  check_same(k, q, "k");
  Dims d{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), k.size(0), 1};
  TORCH_CHECK(d.B >= 1 && d.H >= 1 && d.Lq >= 1 && d.Lk >= 1 && d.D >= 1,
              "mmcl_fast: ska: empty dimension in q ", q.sizes(), " or k ", k.sizes());
  TORCH_CHECK((d.Bk == 1 || d.Bk == d.B) && k.size(1) == d.H && k.size(3) == d.D,
              "mmcl_fast: ska: k must be [1 or B, H, Lk, D] = [1 or ", d.B, ", ", d.H, ", Lk, ",
              d.D, "], got ", k.sizes());
  if (v != nullptr) {
    check_tensor(*v, "v", 4);
    check_same(*v, q, "v");
    TORCH_CHECK(v->size(0) == d.B && v->size(1) == d.H && v->size(2) == d.Lk && v->size(3) == d.D,
                "mmcl_fast: ska: v must be [B, H, Lk, D] = [", d.B, ", ", d.H, ", ", d.Lk, ", ",
                d.D, "], got ", v->sizes());
  }
  if (bias.has_value()) {
    check_tensor(*bias, "bias", 4);
    check_same(*bias, q, "bias");
    d.Bb = bias->size(0);
    TORCH_CHECK((d.Bb == 1 || d.Bb == d.B) && bias->size(1) == d.H && bias->size(2) == d.Lq &&
                    bias->size(3) == d.Lk,
                "mmcl_fast: ska: bias must be [1 or B, H, Lq, Lk] = [1 or ", d.B, ", ", d.H, ", ",
                d.Lq, ", ", d.Lk, "], got ", bias->sizes());
  }
  if (kpm.has_value()) {
    check_tensor(*kpm, "key_padding_mask", 2);
    TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->size(0) == d.B && kpm->size(1) == d.Lk,
                "mmcl_fast: ska: key_padding_mask must be bool [B, Lk] = [", d.B, ", ", d.Lk,
                "], got ", kpm->scalar_type(), " ", kpm->sizes());
  }
  if (qpm.has_value()) {
    check_tensor(*qpm, "query_padding_mask", 2);
    TORCH_CHECK(qpm->scalar_type() == at::kBool && qpm->size(0) == d.B && qpm->size(1) == d.Lq,
                "mmcl_fast: ska: query_padding_mask must be bool [B, Lq] = [", d.B, ", ", d.Lq,
                "], got ", qpm->scalar_type(), " ", qpm->sizes());
  }
  return d;
}

template <typename T>
Problem<T> make_problem(const Dims& d, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& kpm,
                        const std::optional<at::Tensor>& qpm, double scale) {
  Problem<T> p;
  p.q = q.const_data_ptr<T>();
  p.k = k.const_data_ptr<T>();
  p.v = v.const_data_ptr<T>();
  p.bias = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  p.kpm = kpm.has_value() ? kpm->const_data_ptr<bool>() : nullptr;
  p.qpm = qpm.has_value() ? qpm->const_data_ptr<bool>() : nullptr;
  p.B = d.B;
  p.H = d.H;
  p.Lq = d.Lq;
  p.Lk = d.Lk;
  p.D = d.D;
  p.Bk = d.Bk;
  p.Bb = d.Bb;
  p.scale = static_cast<T>(scale);
  p.Dp = round_up(d.D, kNR<T>);
  p.Lkp = round_up(d.Lk, kNR<T>);
  // transposed keys and values are walked down their D rows: keep that stride off powers of two
  if (p.Lkp * static_cast<int64_t>(sizeof(T)) % 512 == 0) p.Lkp += kNR<T>;
  // blocks of balanced sizes (80 rows: 27 + 27 + 26, not 32 + 32 + 16): a short last block
  // makes short products
  p.nqb = (d.Lq + kBM - 1) / kBM;
  p.bm = (d.Lq + p.nqb - 1) / p.nqb;
  p.direct = p.Dp == d.D;
  p.dropout = false;
  p.drop_thr = p.drop_k0 = p.drop_k1 = 0;
  p.drop_scale = T(1);
  return p;
}

template <typename T>
void set_dropout(Problem<T>& p, double dropout_p, const std::optional<at::Tensor>& seed) {
  if (dropout_p == 0.0) return;
  const uint64_t s = static_cast<uint64_t>(*seed->const_data_ptr<int64_t>());
  p.dropout = true;
  p.drop_k0 = static_cast<uint32_t>(s);
  p.drop_k1 = static_cast<uint32_t>(s >> 32);
  p.drop_thr = ska_dropout_threshold(dropout_p);
  p.drop_scale = static_cast<T>(1.0 / (1.0 - dropout_p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ska_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, double scale, bool need_colsum,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const Dims d = check_inputs(q, k, &v, bias, key_padding_mask, query_padding_mask);
  check_ska_dropout(dropout_p, dropout_seed, q);
  at::Tensor out = at::empty({d.B, d.H, d.Lq, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Lq}, q.options());
  at::Tensor colsum = need_colsum ? at::empty({d.B, d.H, d.Lk}, q.options())
                                  : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "ska_forward_cpu", [&] {
    using T = scalar_t;
    Problem<T> p = make_problem<T>(d, q, k, v, bias, key_padding_mask, query_padding_mask,
                                   scale);
    set_dropout(p, dropout_p, dropout_seed);
    const FwdOut<T> o{out.data_ptr<T>(), lse.data_ptr<T>(),
                      need_colsum ? colsum.data_ptr<T>() : nullptr};
    const int64_t pairs = d.B * d.H;
    // Few pairs and no column sums (which sum over query blocks): one query block per item, so
    // that every thread has work. Each block's values are the same either way.
    const bool split = !need_colsum && pairs < 4 * at::get_num_threads() && p.nqb > 1;
    const int64_t items = split ? pairs * p.nqb : pairs;
    const int64_t elems = fwd_scratch_elems(p);
    at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
      Scratch<T> sc(elems);
      for (int64_t it = lo; it < hi; ++it) {
        // pairs head-major, so that consecutive items of one thread share a bank's keys
        const int64_t pair = split ? it / p.nqb : it;
        const int64_t qb_lo = split ? it % p.nqb : 0, qb_hi = split ? qb_lo + 1 : p.nqb;
        fwd_item<T>(p, o, pair % d.B, pair / d.B, qb_lo, qb_hi, sc);
      }
    });
  });
  return {out, lse, colsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ska_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_colsum,
    const std::optional<at::Tensor>& grad_width, const std::optional<at::Tensor>& grad_height,
    double scale, bool need_dbias, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const Dims d = check_inputs(q, k, &v, bias, key_padding_mask, query_padding_mask);
  check_ska_dropout(dropout_p, dropout_seed, q);
  check_tensor(grad_out, "grad_out", 4);
  check_tensor(out, "out", 4);
  check_same(grad_out, q, "grad_out");
  check_same(out, q, "out");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "mmcl_fast: ska: grad_out and out must have q's shape ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  check_tensor(lse, "lse", 3);
  check_same(lse, q, "lse");
  TORCH_CHECK(lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.Lq,
              "mmcl_fast: ska: lse must be [B, H, Lq], got ", lse.sizes());
  check_map(grad_colsum, q, "grad_colsum", d.B, d.H, d.Lk);
  check_map(grad_width, q, "grad_width", d.B, d.H, d.Lq);
  check_map(grad_height, q, "grad_height", d.B, d.H, d.Lk);
  TORCH_CHECK(!need_dbias || bias.has_value(), "mmcl_fast: ska: need_dbias without a bias");
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  at::Tensor dbias = need_dbias ? at::empty_like(*bias) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "ska_backward_cpu", [&] {
    using T = scalar_t;
    Problem<T> p = make_problem<T>(d, q, k, v, bias, key_padding_mask, query_padding_mask,
                                   scale);
    set_dropout(p, dropout_p, dropout_seed);
    const BwdIO<T> io{grad_out.const_data_ptr<T>(),
                      out.const_data_ptr<T>(),
                      lse.const_data_ptr<T>(),
                      grad_colsum.has_value() ? grad_colsum->const_data_ptr<T>() : nullptr,
                      grad_width.has_value() ? grad_width->const_data_ptr<T>() : nullptr,
                      grad_height.has_value() ? grad_height->const_data_ptr<T>() : nullptr,
                      dq.data_ptr<T>(),
                      dk.data_ptr<T>(),
                      dv.data_ptr<T>(),
                      need_dbias ? dbias.data_ptr<T>() : nullptr};
    // Gradients shared by the batch (a key bank's dk, a broadcast bias's dbias) are summed over b
    // inside one item per head, in order; otherwise one item per pair.
    const bool shared = d.B > 1 && (d.Bk == 1 || (need_dbias && d.Bb == 1));
    const int64_t items = shared ? d.H : d.B * d.H;
    const int64_t elems = bwd_scratch_elems(p);
    at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
      Scratch<T> sc(elems);
      for (int64_t it = lo; it < hi; ++it) bwd_item<T>(p, io, it, shared, sc);
    });
  });
  return {dq, dk, dv, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ska_score_maps_cpu(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask,
    const std::optional<at::Tensor>& teacher_width,
    const std::optional<at::Tensor>& teacher_height, double scale, bool normalize) {
  const Dims d = check_inputs(q, k, nullptr, bias, key_padding_mask, query_padding_mask);
  check_map(teacher_width, q, "teacher_width", d.B, d.H, d.Lq);
  check_map(teacher_height, q, "teacher_height", d.B, d.H, d.Lk);
  at::Tensor w = at::empty({d.B, d.H, d.Lq}, q.options());
  at::Tensor u = at::empty({d.B, d.H, d.Lk}, q.options());
  at::Tensor dist = at::empty({d.B, d.H}, q.options());
  at::Tensor gw = teacher_width.has_value() ? at::empty_like(w) : at::empty({0}, q.options());
  at::Tensor gu = teacher_height.has_value() ? at::empty_like(u) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "ska_score_maps_cpu", [&] {
    using T = scalar_t;
    // v is never read here: k stands in for it
    const Problem<T> p = make_problem<T>(d, q, k, k, bias, key_padding_mask, query_padding_mask,
                                         scale);
    const MapsIO<T> io{teacher_width.has_value() ? teacher_width->const_data_ptr<T>() : nullptr,
                       teacher_height.has_value() ? teacher_height->const_data_ptr<T>() : nullptr,
                       w.data_ptr<T>(),
                       u.data_ptr<T>(),
                       dist.data_ptr<T>(),
                       teacher_width.has_value() ? gw.data_ptr<T>() : nullptr,
                       teacher_height.has_value() ? gu.data_ptr<T>() : nullptr};
    const int64_t elems = 2 * d.D + d.Lq + d.Lk;
    at::parallel_for(0, d.B * d.H, 1, [&](int64_t lo, int64_t hi) {
      std::unique_ptr<T[]> buf(new T[elems]);
      for (int64_t it = lo; it < hi; ++it)
        maps_pair<T>(p, io, normalize, it / d.H, it % d.H, buf.get());
    });
  });
  return {w, u, dist, gw, gu};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CPU, m) {
  m.impl("ska_forward", &ska_forward_cpu);
  m.impl("ska_backward", &ska_backward_cpu);
  m.impl("ska_score_maps", &ska_score_maps_cpu);
}

}  // namespace mmcl_fast

// Op family B on the CPU: shared-key attention, flash-style, with the column sums of P
// (DESIGN.md section 5.2; the kernel contract is the one of the ska_forward / ska_backward schemas
// in ../mmcl_fast.cpp). Per (b, h), with k and bias read at batch 0 when they are broadcast:
//     S_ij = scale * q_i . k_j + bias_ij        (-inf where key j is padded)
//     lse_i = log sum_j exp(S_ij);  P_ij = exp(S_ij - lse_i);  out_i = sum_j P_ij v_j
//     colsum_j = sum_{i valid} P_ij
// A row whose scores are all -inf is empty: out_i = 0, lse_i = +inf, so P = exp(S - lse) = 0 in
// every later pass without a special case. Backward, with G = grad_colsum (0 when absent):
//     Delta_i = dO_i . out_i + valid_i sum_j P_ij G_j
//     dS_ij = P_ij (dO_i . v_j + valid_i G_j - Delta_i)
//     dq = scale dS k,  dk = scale dS^T q,  dv = P^T dO,  dbias = dS
//
// Nothing of size Lq x Lk is allocated (except dbias, when asked for): a query block of BM rows
// meets the keys in tiles of BN columns, and the scores of one such tile live in a per-thread
// scratch. The forward keeps a running max and sum per row (online softmax) and rescales its
// output accumulator when the max grows; the column sums need the final lse of each row, so they
// take a second sweep over the key tiles, except when one tile holds every key (the common case
// at MSPT lengths), where the tile's P divided by the row sum already is the final P.
//
// The tile products are small GEMMs done by one register-blocked micro-kernel: an MR x NR block
// of C (NR = 16 floats or 8 doubles, two AVX2 registers) accumulated over k from a broadcast
// A element times a contiguous row of B. Every operand is laid out so that its B side is
// contiguous along the output columns: K and V are also kept transposed ([D][Lk], for S = q k^T
// and dP = dO v^T), and rows of q, dO, k and v are zero-padded to a multiple of NR so that no
// product needs a column remainder. The exp is a branch-free polynomial, so that the loops over a
// row of a tile vectorise (libm's exp does not without -ffast-math).
//
// Parallelism and determinism: the forward runs (b, h) pairs (or single query blocks, when there
// are few pairs and no column sums) as independent work items; every value is computed by one
// item in a fixed order. The backward runs one item per (b, h), which owns dq, dk, dv and dbias of
// its pair; when k is a bank (Bk == 1) or dbias is asked for a broadcast bias (Bb == 1), the
// batch-shared gradients are summed over b, so an item is one head instead, looping over b in
// order. Either way the result does not depend on the number of threads.
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

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// Built once for x86-64-v3 (AVX2, FMA) and once generic; the loader picks the clone the CPU can
// run. (Not "arch=haswell": that clone is chosen by CPU model, so AMD CPUs would never get it.)
#define MMCL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define MMCL_INLINE inline __attribute__((always_inline))
#define MMCL_NOINLINE __attribute__((noinline))
#else
#define MMCL_CPU_CLONES
#define MMCL_INLINE inline
#define MMCL_NOINLINE
#endif

namespace mmcl_fast {
namespace {

// Columns of one micro-kernel block: two 256-bit registers.
template <typename T>
constexpr int64_t kNR = 64 / static_cast<int64_t>(sizeof(T));
// Rows of one micro-kernel block: 4 x 2 accumulators hide the FMA latency (4 cycles, 2 per
// cycle) and leave registers for the two B loads and the broadcast.
constexpr int64_t kMR = 4;
// Query rows per block and keys per tile. A [BM][BN] float tile is 16 KiB; the backward holds two
// of them (P and dS) next to [BM][D] blocks of q, dO and dq.
constexpr int64_t kBM = 32;
constexpr int64_t kBN = 128;

MMCL_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ----------------------------------------------------------------------------------------------
// 256-bit vectors as GCC vector extensions: the x86-64-v3 clone compiles them to AVX2 registers,
// the generic clone to pairs of SSE registers. (Plain loops over the micro-kernel's block were
// vectorised badly by GCC 12: along k, with shuffles.) may_alias and element alignment make the
// loads and stores below plain unaligned moves.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float v __attribute__((vector_size(32), __may_alias__, aligned(4)));
  typedef int32_t vi __attribute__((vector_size(32), __may_alias__, aligned(4)));
  typedef int32_t si;
};
template <>
struct Vec<double> {
  typedef double v __attribute__((vector_size(32), __may_alias__, aligned(8)));
  typedef int64_t vi __attribute__((vector_size(32), __may_alias__, aligned(8)));
  typedef int64_t si;
};
template <typename T>
using vec_t = typename Vec<T>::v;
template <typename T>
constexpr int64_t kW = 32 / static_cast<int64_t>(sizeof(T));  // lanes per vector

template <typename T>
MMCL_INLINE vec_t<T> vload(const T* p) {
  return *reinterpret_cast<const vec_t<T>*>(p);
}
template <typename T>
MMCL_INLINE void vstore(T* p, vec_t<T> x) {
  *reinterpret_cast<vec_t<T>*>(p) = x;
}
template <typename T>
MMCL_INLINE vec_t<T> vsplat(T x) {
  return vec_t<T>{} + x;
}
template <typename T>
MMCL_INLINE vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  return a > b ? a : b;
}

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
// passes over it); rows in blocks of MR, then the remainder.
template <typename T, bool ACC>
MMCL_CPU_CLONES MMCL_NOINLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars,
                                        int64_t aks, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t j = 0; j < N; j += NR) {
    int64_t i = 0;
    for (; i + kMR <= M; i += kMR)
      micro_kernel<T, kMR, ACC>(K, A + i * ars, ars, aks, B + j, ldb, C + i * ldc + j, ldc);
    switch (M - i) {
      case 3:
        micro_kernel<T, 3, ACC>(K, A + i * ars, ars, aks, B + j, ldb, C + i * ldc + j, ldc);
        break;
      case 2:
        micro_kernel<T, 2, ACC>(K, A + i * ars, ars, aks, B + j, ldb, C + i * ldc + j, ldc);
        break;
      case 1:
        micro_kernel<T, 1, ACC>(K, A + i * ars, ars, aks, B + j, ldb, C + i * ldc + j, ldc);
        break;
      default:
        break;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Row helpers over n = a multiple of NR values, two vectors of lanes at a time; the lane order is
// fixed, so the results are reproducible.
template <typename T>
MMCL_INLINE T hsum(vec_t<T> x) {
  T r = x[0];
  for (int64_t l = 1; l < kW<T>; ++l) r += x[l];
  return r;
}

template <typename T>
MMCL_INLINE T row_max(const T* __restrict__ s, int64_t n) {
  using V = vec_t<T>;
  constexpr int64_t W = kW<T>;
  V m0 = vsplat(-std::numeric_limits<T>::infinity()), m1 = m0;
  for (int64_t j = 0; j < n; j += 2 * W) {
    m0 = vmax<T>(vload(s + j), m0);
    m1 = vmax<T>(vload(s + j + W), m1);
  }
  m0 = vmax<T>(m0, m1);
  T r = m0[0];
  for (int64_t l = 1; l < W; ++l) r = m0[l] > r ? m0[l] : r;
  return r;
}

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

template <typename T>
MMCL_INLINE void row_exp(T* __restrict__ s, int64_t n, T shift) {
  constexpr int64_t W = kW<T>;
  for (int64_t j = 0; j < n; j += W) vstore(s + j, vexp(vload(s + j) - shift));
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
// Per-thread scratch: one 64-byte-aligned allocation carved into named tiles.
template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> mem;
  int64_t used = 0, cap = 0;
  explicit Scratch(int64_t elems) : cap(elems) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(elems, 16), 16)) * sizeof(T);
    mem.reset(static_cast<T*>(std::aligned_alloc(64, round_up(static_cast<int64_t>(bytes), 64))));
    TORCH_CHECK(mem != nullptr, "mmcl_fast: ska: cannot allocate ", bytes, " bytes of scratch");
  }
  T* take(int64_t n) {
    T* p = mem.get() + used;
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
  // padded sizes
  int64_t Dp, Lkp;
  int64_t nqb;  // query blocks per (b, h)

  const T* k_of(int64_t b, int64_t h) const { return k + ((Bk == 1 ? 0 : b) * H + h) * Lk * D; }
  const T* v_of(int64_t b, int64_t h) const { return v + (b * H + h) * Lk * D; }
  const T* bias_of(int64_t b, int64_t h) const {
    return bias == nullptr ? nullptr : bias + ((Bb == 1 ? 0 : b) * H + h) * Lq * Lk;
  }
};

// x [L][D] -> xt [D][ldt] (columns >= L zero)
template <typename T>
MMCL_INLINE void pack_transposed(const T* __restrict__ x, int64_t L, int64_t D, int64_t ldt,
                                 T* __restrict__ xt) {
  for (int64_t d = 0; d < D; ++d) {
    T* row = xt + d * ldt;
    for (int64_t j = 0; j < L; ++j) row[j] = x[j * D + d];
    for (int64_t j = L; j < ldt; ++j) row[j] = T(0);
  }
}

// x [L][D] -> xp [L][Dp] scaled by s (columns >= D zero)
template <typename T>
MMCL_INLINE void pack_rows(const T* __restrict__ x, int64_t L, int64_t D, int64_t Dp, T s,
                           T* __restrict__ xp) {
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t d = 0; d < D; ++d) xp[j * Dp + d] = s * x[j * D + d];
    for (int64_t d = D; d < Dp; ++d) xp[j * Dp + d] = T(0);
  }
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

// S tile of rows [i0, i0 + mq) and keys [j0, j0 + nkp): scale q k^T (scale is in qs) + bias +
// key mask. qs [mq][ldq], kt [D][Lkp].
template <typename T>
MMCL_INLINE void score_tile(const Problem<T>& p, const T* qs, int64_t ldq, const T* kt,
                            const T* bias_bh, const T* kadd, int64_t i0, int64_t mq, int64_t j0,
                            int64_t nk, int64_t nkp, T* s) {
  gemm<T, false>(mq, nkp, p.D, qs, ldq, 1, kt + j0, p.Lkp, s, kBN);
  for (int64_t i = 0; i < mq; ++i) {
    T* __restrict__ row = s + i * kBN;
    const T* __restrict__ ka = kadd + j0;
    if (bias_bh != nullptr) {
      const T* __restrict__ br = bias_bh + (i0 + i) * p.Lk + j0;
      for (int64_t j = 0; j < nk; ++j) row[j] += br[j] + ka[j];
    } else {
      for (int64_t j = 0; j < nk; ++j) row[j] += ka[j];
    }
    for (int64_t j = nk; j < nkp; ++j) row[j] = ka[j];  // -inf
  }
}

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
         round_up(kBM * p.D, 16) + round_up(kBM * kBN, 16) + round_up(kBM * p.Dp, 16) +
         round_up(kBM, 16) * 3;
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
  T* vp = sc.take(Lk * Dp);
  T* kadd = sc.take(Lkp);
  T* cs = sc.take(Lkp);
  T* qs = sc.take(kBM * D);
  T* s = sc.take(kBM * kBN);
  T* acc = sc.take(kBM * Dp);
  T* m = sc.take(kBM);
  T* l = sc.take(kBM);
  T* w = sc.take(kBM);

  pack_transposed(p.k_of(b, h), Lk, D, Lkp, kt);
  pack_rows(p.v_of(b, h), Lk, D, Dp, T(1), vp);
  fill_key_add(p, b, kadd);
  const T* bias_bh = p.bias_of(b, h);
  const bool* qpm = p.qpm == nullptr ? nullptr : p.qpm + b * Lq;
  const bool colsum = o.colsum != nullptr;
  if (colsum) std::fill(cs, cs + Lkp, T(0));
  const int64_t nkt = (Lk + kBN - 1) / kBN;

  for (int64_t qb = qb_lo; qb < qb_hi; ++qb) {
    const int64_t i0 = qb * kBM, mq = std::min(kBM, Lq - i0);
    pack_rows(p.q + (bh * Lq + i0) * D, mq, D, D, p.scale, qs);
    std::fill(acc, acc + mq * Dp, T(0));
    for (int64_t i = 0; i < mq; ++i) {
      m[i] = ninf;
      l[i] = T(0);
    }
    for (int64_t t = 0; t < nkt; ++t) {
      const int64_t j0 = t * kBN, nk = std::min(kBN, Lk - j0), nkp = round_up(nk, kNR<T>);
      score_tile(p, qs, D, kt, bias_bh, kadd, i0, mq, j0, nk, nkp, s);
      // online softmax: rescale what was accumulated when the running max grows
      for (int64_t i = 0; i < mq; ++i) {
        T* row = s + i * kBN;
        const T mt = row_max(row, nkp);
        const T mnew = mt > m[i] ? mt : m[i];
        const T shift = mnew == ninf ? T(0) : mnew;  // empty so far: exp(-inf - 0) = 0
        const T alpha = std::exp(m[i] - shift);       // 0 on the first tile (m = -inf)
        l[i] = l[i] * alpha + row_exp_sum(row, nkp, shift);
        m[i] = mnew;
        if (t > 0 && alpha != T(1)) {
          T* __restrict__ a = acc + i * Dp;
          for (int64_t d = 0; d < Dp; ++d) a[d] *= alpha;
        }
      }
      gemm<T, true>(mq, Dp, nk, s, kBN, 1, vp + j0 * Dp, Dp, acc, Dp);
    }
    T* out = o.out + (bh * Lq + i0) * D;
    T* lse = o.lse + bh * Lq + i0;
    for (int64_t i = 0; i < mq; ++i) {
      const bool empty = !(l[i] > T(0));
      const T inv = empty ? T(0) : T(1) / l[i];
      lse[i] = empty ? pinf : m[i] + std::log(l[i]);
      const T* __restrict__ a = acc + i * Dp;
      T* __restrict__ orow = out + i * D;
      for (int64_t d = 0; d < D; ++d) orow[d] = a[d] * inv;
      // column-sum weight: valid_i / l_i with the single-tile shortcut, valid_i otherwise
      const T valid = (qpm != nullptr && qpm[i0 + i]) ? T(0) : T(1);
      w[i] = empty ? T(0) : (nkt == 1 ? valid * inv : valid);
    }
    if (!colsum) continue;
    if (nkt == 1) {
      // s still holds exp(S - m) for the only tile: P = that / l
      for (int64_t i = 0; i < mq; ++i) {
        if (w[i] == T(0)) continue;
        const T wi = w[i];
        const T* __restrict__ row = s + i * kBN;
        for (int64_t j = 0; j < Lkp; ++j) cs[j] += wi * row[j];
      }
    } else {
      for (int64_t t = 0; t < nkt; ++t) {
        const int64_t j0 = t * kBN, nk = std::min(kBN, Lk - j0), nkp = round_up(nk, kNR<T>);
        score_tile(p, qs, D, kt, bias_bh, kadd, i0, mq, j0, nk, nkp, s);
        for (int64_t i = 0; i < mq; ++i) {
          if (w[i] == T(0)) continue;
          T* __restrict__ row = s + i * kBN;
          row_exp(row, nkp, lse[i]);
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
  T* dq;
  T* dk;
  T* dv;
  T* dbias;  // null: not asked for
};

template <typename T>
int64_t bwd_scratch_elems(const Problem<T>& p) {
  return round_up(p.D * p.Lkp, 16) * 2 + round_up(p.Lk * p.Dp, 16) * 3 + round_up(p.Lkp, 16) * 2 +
         round_up(kBM * p.Dp, 16) * 3 + round_up(kBM * kBN, 16) * 2 + round_up(kBM, 16) * 2;
}

// The gradients of pair (b, h). dk_acc ([Lk][Dp]) is the caller's: for a key bank it keeps
// summing over b. dbias rows are written (first = true) or added to.
template <typename T>
MMCL_CPU_CLONES void bwd_pair(const Problem<T>& p, const BwdIO<T>& io, int64_t b, int64_t h,
                              bool pack_k, bool dbias_first, T* kt, T* kp, T* vt, T* dk_acc,
                              T* dv_acc, T* kadd, T* g, T* qs, T* dop, T* dq_acc, T* ps, T* ds,
                              T* delta, T* valid) {
  const int64_t D = p.D, Dp = p.Dp, Lk = p.Lk, Lkp = p.Lkp, Lq = p.Lq;
  const int64_t bh = b * p.H + h;
  if (pack_k) {
    const T* k = p.k_of(b, h);
    pack_transposed(k, Lk, D, Lkp, kt);
    pack_rows(k, Lk, D, Dp, T(1), kp);
  }
  pack_transposed(p.v_of(b, h), Lk, D, Lkp, vt);
  fill_key_add(p, b, kadd);
  if (io.gcol != nullptr) {
    std::copy(io.gcol + bh * Lk, io.gcol + (bh + 1) * Lk, g);
    std::fill(g + Lk, g + Lkp, T(0));
  }
  std::fill(dv_acc, dv_acc + Lk * Dp, T(0));
  const T* bias_bh = p.bias_of(b, h);
  T* dbias_bh = io.dbias == nullptr ? nullptr : io.dbias + ((p.Bb == 1 ? 0 : b) * p.H + h) * Lq * Lk;
  const bool* qpm = p.qpm == nullptr ? nullptr : p.qpm + b * Lq;
  const int64_t nkt = (Lk + kBN - 1) / kBN;

  for (int64_t qb = 0; qb < p.nqb; ++qb) {
    const int64_t i0 = qb * kBM, mq = std::min(kBM, Lq - i0);
    pack_rows(p.q + (bh * Lq + i0) * D, mq, D, Dp, p.scale, qs);
    pack_rows(io.dout + (bh * Lq + i0) * D, mq, D, Dp, T(1), dop);
    std::fill(dq_acc, dq_acc + mq * Dp, T(0));
    const T* lse = io.lse + bh * Lq + i0;
    for (int64_t i = 0; i < mq; ++i) {
      const T* __restrict__ o = io.out + (bh * Lq + i0 + i) * D;
      const T* __restrict__ d = dop + i * Dp;
      T dot = T(0);
      for (int64_t e = 0; e < D; ++e) dot += d[e] * o[e];
      delta[i] = dot;
      valid[i] = (qpm != nullptr && qpm[i0 + i]) ? T(0) : T(1);
    }
    if (io.gcol != nullptr) {
      // Delta_i += valid_i sum_j P_ij G_j: one more sweep over the keys
      for (int64_t t = 0; t < nkt; ++t) {
        const int64_t j0 = t * kBN, nk = std::min(kBN, Lk - j0), nkp = round_up(nk, kNR<T>);
        score_tile(p, qs, Dp, kt, bias_bh, kadd, i0, mq, j0, nk, nkp, ps);
        for (int64_t i = 0; i < mq; ++i) {
          if (valid[i] == T(0)) continue;
          T* __restrict__ row = ps + i * kBN;
          const T* __restrict__ gg = g + j0;
          row_exp(row, nkp, lse[i]);
          delta[i] += row_dot(row, gg, nkp);
        }
      }
    }
    for (int64_t t = 0; t < nkt; ++t) {
      const int64_t j0 = t * kBN, nk = std::min(kBN, Lk - j0), nkp = round_up(nk, kNR<T>);
      score_tile(p, qs, Dp, kt, bias_bh, kadd, i0, mq, j0, nk, nkp, ps);
      for (int64_t i = 0; i < mq; ++i) row_exp(ps + i * kBN, nkp, lse[i]);
      // dP = dO v^T into ds, then dS = P (dP + valid G - Delta) in place
      gemm<T, false>(mq, nkp, D, dop, Dp, 1, vt + j0, Lkp, ds, kBN);
      for (int64_t i = 0; i < mq; ++i) {
        const T* __restrict__ prow = ps + i * kBN;
        T* __restrict__ drow = ds + i * kBN;
        const T di = delta[i];
        if (io.gcol != nullptr && valid[i] != T(0)) {
          const T* __restrict__ gg = g + j0;
          for (int64_t j = 0; j < nkp; ++j) drow[j] = prow[j] * (drow[j] + gg[j] - di);
        } else {
          for (int64_t j = 0; j < nkp; ++j) drow[j] = prow[j] * (drow[j] - di);
        }
        if (dbias_bh != nullptr) {
          T* __restrict__ db = dbias_bh + (i0 + i) * Lk + j0;
          if (dbias_first) {
            for (int64_t j = 0; j < nk; ++j) db[j] = drow[j];
          } else {
            for (int64_t j = 0; j < nk; ++j) db[j] += drow[j];
          }
        }
      }
      // dv[j] += sum_i P_ij dO_i ; dk[j] += sum_i dS_ij (scale q_i) ; dq_i += sum_j dS_ij k_j
      gemm<T, true>(nk, Dp, mq, ps, 1, kBN, dop, Dp, dv_acc + j0 * Dp, Dp);
      gemm<T, true>(nk, Dp, mq, ds, 1, kBN, qs, Dp, dk_acc + j0 * Dp, Dp);
      gemm<T, true>(mq, Dp, nk, ds, kBN, 1, kp + j0 * Dp, Dp, dq_acc, Dp);
    }
    T* dq = io.dq + (bh * Lq + i0) * D;
    for (int64_t i = 0; i < mq; ++i)
      for (int64_t d = 0; d < D; ++d) dq[i * D + d] = p.scale * dq_acc[i * Dp + d];
  }
  T* dv = io.dv + bh * Lk * D;
  for (int64_t j = 0; j < Lk; ++j)
    for (int64_t d = 0; d < D; ++d) dv[j * D + d] = dv_acc[j * Dp + d];
}

// One work item of the backward: pair (b, h), or head h for every b in order (shared = true).
template <typename T>
void bwd_item(const Problem<T>& p, const BwdIO<T>& io, int64_t item, bool shared, Scratch<T>& sc) {
  const int64_t D = p.D, Dp = p.Dp, Lk = p.Lk, Lkp = p.Lkp;
  sc.used = 0;
  T* kt = sc.take(D * Lkp);
  T* vt = sc.take(D * Lkp);
  T* kp = sc.take(Lk * Dp);
  T* dk_acc = sc.take(Lk * Dp);
  T* dv_acc = sc.take(Lk * Dp);
  T* kadd = sc.take(Lkp);
  T* g = sc.take(Lkp);
  T* qs = sc.take(kBM * Dp);
  T* dop = sc.take(kBM * Dp);
  T* dq_acc = sc.take(kBM * Dp);
  T* ps = sc.take(kBM * kBN);
  T* ds = sc.take(kBM * kBN);
  T* delta = sc.take(kBM);
  T* valid = sc.take(kBM);
  const int64_t b_lo = shared ? 0 : item / p.H, b_hi = shared ? p.B : b_lo + 1;
  const int64_t h = item % p.H;
  std::fill(dk_acc, dk_acc + Lk * Dp, T(0));
  for (int64_t b = b_lo; b < b_hi; ++b) {
    // a bank's k is packed once per head; per-batch k (shared only for dbias) every b
    const bool pack_k = b == b_lo || p.Bk != 1;
    if (p.Bk != 1 && b != b_lo) std::fill(dk_acc, dk_acc + Lk * Dp, T(0));
    bwd_pair(p, io, b, h, pack_k, b == b_lo || p.Bb != 1, kt, kp, vt, dk_acc, dv_acc, kadd, g, qs,
             dop, dq_acc, ps, ds, delta, valid);
    if (p.Bk != 1) {
      T* dk = io.dk + (b * p.H + h) * Lk * D;
      for (int64_t j = 0; j < Lk; ++j)
        for (int64_t d = 0; d < D; ++d) dk[j * D + d] = dk_acc[j * Dp + d];
    }
  }
  if (p.Bk == 1) {
    T* dk = io.dk + h * Lk * D;
    for (int64_t j = 0; j < Lk; ++j)
      for (int64_t d = 0; d < D; ++d) dk[j * D + d] = dk_acc[j * Dp + d];
  }
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

struct Dims {
  int64_t B, H, Lq, Lk, D, Bk, Bb;
};

Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& kpm,
                  const std::optional<at::Tensor>& qpm) {
  check_tensor(q, "q", 4);
  check_tensor(k, "k", 4);
  check_tensor(v, "v", 4);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "mmcl_fast: ska (CPU): q must be float32 or float64, got ", q.scalar_type());
  check_same(k, q, "k");
  check_same(v, q, "v");
  Dims d{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), k.size(0), 1};
  TORCH_CHECK(d.B >= 1 && d.H >= 1 && d.Lq >= 1 && d.Lk >= 1 && d.D >= 1,
              "mmcl_fast: ska: empty dimension in q ", q.sizes(), " or k ", k.sizes());
  TORCH_CHECK((d.Bk == 1 || d.Bk == d.B) && k.size(1) == d.H && k.size(3) == d.D,
              "mmcl_fast: ska: k must be [1 or B, H, Lk, D] = [1 or ", d.B, ", ", d.H, ", Lk, ",
              d.D, "], got ", k.sizes());
  TORCH_CHECK(v.size(0) == d.B && v.size(1) == d.H && v.size(2) == d.Lk && v.size(3) == d.D,
              "mmcl_fast: ska: v must be [B, H, Lk, D] = [", d.B, ", ", d.H, ", ", d.Lk, ", ",
              d.D, "], got ", v.sizes());
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
  p.nqb = (d.Lq + kBM - 1) / kBM;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ska_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, double scale, bool need_colsum) {
  const Dims d = check_inputs(q, k, v, bias, key_padding_mask, query_padding_mask);
  at::Tensor out = at::empty({d.B, d.H, d.Lq, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.Lq}, q.options());
  at::Tensor colsum = need_colsum ? at::empty({d.B, d.H, d.Lk}, q.options())
                                  : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "ska_forward_cpu", [&] {
    using T = scalar_t;
    const Problem<T> p = make_problem<T>(d, q, k, v, bias, key_padding_mask, query_padding_mask,
                                         scale);
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
        const int64_t bh = split ? it / p.nqb : it;
        const int64_t qb_lo = split ? it % p.nqb : 0, qb_hi = split ? qb_lo + 1 : p.nqb;
        fwd_item<T>(p, o, bh / d.H, bh % d.H, qb_lo, qb_hi, sc);
      }
    });
  });
  return {out, lse, colsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ska_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_colsum, double scale,
    bool need_dbias) {
  const Dims d = check_inputs(q, k, v, bias, key_padding_mask, query_padding_mask);
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
  if (grad_colsum.has_value()) {
    check_tensor(*grad_colsum, "grad_colsum", 3);
    check_same(*grad_colsum, q, "grad_colsum");
    TORCH_CHECK(grad_colsum->size(0) == d.B && grad_colsum->size(1) == d.H &&
                    grad_colsum->size(2) == d.Lk,
                "mmcl_fast: ska: grad_colsum must be [B, H, Lk], got ", grad_colsum->sizes());
  }
  TORCH_CHECK(!need_dbias || bias.has_value(), "mmcl_fast: ska: need_dbias without a bias");
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  at::Tensor dbias = need_dbias ? at::empty_like(*bias) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "ska_backward_cpu", [&] {
    using T = scalar_t;
    const Problem<T> p = make_problem<T>(d, q, k, v, bias, key_padding_mask, query_padding_mask,
                                         scale);
    const BwdIO<T> io{grad_out.const_data_ptr<T>(),
                      out.const_data_ptr<T>(),
                      lse.const_data_ptr<T>(),
                      grad_colsum.has_value() ? grad_colsum->const_data_ptr<T>() : nullptr,
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

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CPU, m) {
  m.impl("ska_forward", &ska_forward_cpu);
  m.impl("ska_backward", &ska_backward_cpu);
}

}  // namespace mmcl_fast

// Op family C on the CPU, part 2: filtered ranking without the score matrix (DESIGN.md section
// 6.4; the contract is that of the filtered_rank_counts schema in ../mmcl_fast.cpp). float32 and
// float64, scores accumulated in the input's type. For query b (q = queries[b]) and candidate c
// (e = entities[c]), the score s(b, c), higher is better:
//     0 transe_l1  -sum_d |q_d - e_d|         2 distmult, 3 complex ([re | im] halves), 5 dot:
//     1 transe_l2  -sum_d (q_d - e_d)^2                  sum_d q_d e_d
//     4 rotate     -sum_{k<D/2} sqrt((q_k - e_k)^2 + (q_{k+D/2} - e_{k+D/2})^2)
// With t_b = s(b, target_b), over the candidates c < C = num_candidates, c != target_b, c not in
// filter row b (indices[indptr[b], indptr[b+1]), sorted ascending; duplicates count once, the
// target and ids >= C are ignored):
//     greater_b = #{c : s(b, c) > t_b},   equal_b = #{c : s(b, c) == t_b}
// A NaN score compares false, so a NaN candidate counts in neither and a NaN target counts nothing.
//
// Every score, the target's and the filter entries' included, comes out of one function,
// score_rows (one compiled body, cloned for AVX2/FMA and generic; the clone is picked once at load
// time), which scores kQB query rows against a list of candidate rows given by pointers, kCB
// candidates at a time, all through the same inlined block: per pair, one vector accumulator along
// d (4 x 3 = 12 of them in registers), the lanes of kW accumulators added at once by a fixed
// shuffle tree (the same association for every pair), then the scalar tail of d in order. Each
// pair's sequence of operations is the same whatever its place in the block, so a candidate equal
// to the target's row ties with the target exactly. The distance scores (0, 1, 4) are kept as
// the positive sums, "s > t" becoming "sum < sum_t" (negation is exact).
//
// The count runs over all c < C except the target, in work items of (a chunk of kQC queries) x
// (a range of candidates): the chunk's query rows stay in L2 while the candidate range streams
// through in tiles of about 16 KiB (L1), each tile met by every query block of the chunk. Counts
// are integers: the per-range partials add up to the same totals for any split or thread count.
// The filtered entries are then scored again (same function, same bits) and subtracted. Memory:
// O(B * ranges) counters, no [B, N] buffer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_clones.h"
#include "cpu/simd.h"

namespace mmcl_fast {
namespace {

// |x|: the sign bit cleared
template <typename T>
MMCL_INLINE vec_t<T> vabs(vec_t<T> x) {
  using VI = typename Vec<T>::vi;
  using I = typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type;
  const VI r = reinterpret_cast<const VI&>(x) & (VI{} + std::numeric_limits<I>::max());
  return reinterpret_cast<const vec_t<T>&>(r);
}
// The lane sums of kW accumulators at once, as one vector: r[p] = the sum of a[p]'s lanes, in the
// same order for every p: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) (float),
// (l0 + l1) + (l2 + l3) (double). Pairwise adds of neighbours within 128-bit halves (hadd), then
// the two halves.
MMCL_INLINE vec_t<float> hadd(vec_t<float> a, vec_t<float> b) {
  typedef int32_t vi __attribute__((vector_size(32)));
  return __builtin_shuffle(a, b, vi{0, 2, 8, 10, 4, 6, 12, 14}) +
         __builtin_shuffle(a, b, vi{1, 3, 9, 11, 5, 7, 13, 15});
}
MMCL_INLINE vec_t<double> hadd(vec_t<double> a, vec_t<double> b) {
  typedef int64_t vi __attribute__((vector_size(32)));
  return __builtin_shuffle(a, b, vi{0, 4, 2, 6}) + __builtin_shuffle(a, b, vi{1, 5, 3, 7});
}
MMCL_INLINE vec_t<float> lane_sums(const vec_t<float>* a) {
  typedef int32_t vi __attribute__((vector_size(32)));
  // u = [s0 s1 s2 s3 | s0' s1' s2' s3'] (first and second halves of the lanes of a[0..3]), etc.
  const vec_t<float> u = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
  const vec_t<float> v = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return __builtin_shuffle(u, v, vi{0, 1, 2, 3, 8, 9, 10, 11}) +
         __builtin_shuffle(u, v, vi{4, 5, 6, 7, 12, 13, 14, 15});
}
MMCL_INLINE vec_t<double> lane_sums(const vec_t<double>* a) {
  typedef int64_t vi __attribute__((vector_size(32)));
  // u = [a0: l0+l1, a1: l0+l1, a0: l2+l3, a1: l2+l3], v likewise for a2, a3
  const vec_t<double> u = hadd(a[0], a[1]), v = hadd(a[2], a[3]);
  return __builtin_shuffle(u, v, vi{0, 1, 4, 5}) + __builtin_shuffle(u, v, vi{2, 3, 6, 7});
}

enum Score { kL1 = 0, kL2 = 1, kDistMult = 2, kComplEx = 3, kRotatE = 4, kDot = 5 };
constexpr bool lower_is_better(int s) { return s == kL1 || s == kL2 || s == kRotatE; }

constexpr int64_t kQB = 4;   // queries per score block
constexpr int64_t kCB = 3;   // candidates per score block
constexpr int64_t kQC = 64;  // queries per work item
constexpr int64_t kTileBytes = 16384;  // candidate rows per tile: about this many bytes (L1)

// acc += the per-pair term of the elementwise scores
template <int S, typename T>
MMCL_INLINE void accumulate(vec_t<T>& acc, vec_t<T> q, vec_t<T> e) {
  if (S == kL1) {
    acc += vabs<T>(q - e);
  } else if (S == kL2) {
    const vec_t<T> d = q - e;
    acc += d * d;
  } else {
    acc += q * e;
  }
}
template <int S, typename T>
MMCL_INLINE T term_scalar(T q, T e) {
  if (S == kL1) {
    return std::abs(q - e);
  } else if (S == kL2) {
    const T d = q - e;
    return d * d;
  } else {
    return q * e;
  }
}

// blk[p] = the lane sum of acc[p] for the kQB * kCB pairs, kW at a time (the last group padded
// with zero accumulators); blk holds kPairsPadded values.
constexpr int64_t kPairs = kQB * kCB;
template <typename T>
constexpr int64_t kPairsPadded = (kPairs + kW<T> - 1) / kW<T> * kW<T>;
template <typename T>
MMCL_INLINE void reduce_pairs(const vec_t<T>* acc, T* blk) {
  constexpr int64_t W = kW<T>;
  for (int64_t p = 0; p < kPairs; p += W) {
    vec_t<T> a[W];
    for (int64_t l = 0; l < W; ++l) a[l] = p + l < kPairs ? acc[p + l] : vec_t<T>{};
    *reinterpret_cast<vec_t<T>*>(blk + p) = lane_sums(a);
  }
}

// blk[i * kCB + j] = the sum of score S (the positive distance for 0, 1, 4) of query row q[i]
// against candidate row e[j]: per pair one vector accumulator along d, its lanes summed in the
// fixed order of lane_sums, then the scalar tail of d in order.
template <typename T, int S>
MMCL_INLINE void score_block(const T* const* q, const T* const* e, int64_t D, T* blk) {
  using V = vec_t<T>;
  constexpr int64_t W = kW<T>;
  V acc[kQB][kCB];
  for (int64_t i = 0; i < kQB; ++i)
    for (int64_t j = 0; j < kCB; ++j) acc[i][j] = V{};
  if (S == kRotatE) {
    const int64_t H = D / 2;
    int64_t k = 0;
    for (; k + W <= H; k += W) {
      V er[kCB], ei[kCB];
      for (int64_t j = 0; j < kCB; ++j) {
        er[j] = vload(e[j] + k);
        ei[j] = vload(e[j] + H + k);
      }
      for (int64_t i = 0; i < kQB; ++i) {
        const V qr = vload(q[i] + k), qi = vload(q[i] + H + k);
        for (int64_t j = 0; j < kCB; ++j) {
          const V dr = qr - er[j], di = qi - ei[j];
          acc[i][j] += vsqrt<T>(dr * dr + di * di);
        }
      }
    }
    reduce_pairs<T>(&acc[0][0], blk);
    for (int64_t i = 0; i < kQB; ++i)
      for (int64_t j = 0; j < kCB; ++j) {
        T s = blk[i * kCB + j];
        for (int64_t kk = k; kk < H; ++kk) {
          const T dr = q[i][kk] - e[j][kk], di = q[i][H + kk] - e[j][H + kk];
          s += std::sqrt(dr * dr + di * di);
        }
        blk[i * kCB + j] = s;
      }
    return;
  }
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    V ev[kCB];
    for (int64_t j = 0; j < kCB; ++j) ev[j] = vload(e[j] + d);
    for (int64_t i = 0; i < kQB; ++i) {
      const V qv = vload(q[i] + d);
      for (int64_t j = 0; j < kCB; ++j) accumulate<S, T>(acc[i][j], qv, ev[j]);
    }
  }
  reduce_pairs<T>(&acc[0][0], blk);
  if (d < D)
    for (int64_t i = 0; i < kQB; ++i)
      for (int64_t j = 0; j < kCB; ++j) {
        T s = blk[i * kCB + j];
        for (int64_t dd = d; dd < D; ++dd) s += term_scalar<S, T>(q[i][dd], e[j][dd]);
        blk[i * kCB + j] = s;
      }
}

// out[i * n + j] = the score sum of query row q[i] (i < kQB) against candidate row e[j] (j < n).
// The only function that scores (see the header): one compiled body per clone, whose blocks all
// run the same inlined score_block (a last block of fewer than kCB rows repeats its last row).
template <typename T, int S>
MMCL_CPU_CLONES MMCL_NOINLINE void score_rows(const T* const* q, const T* const* e, int64_t n,
                                              int64_t D, T* out) {
  T blk[kPairsPadded<T>];
  for (int64_t j0 = 0; j0 < n; j0 += kCB) {
    const int64_t nc = std::min(kCB, n - j0);
    const T* ep[kCB];
    for (int64_t j = 0; j < kCB; ++j) ep[j] = e[j0 + std::min(j, nc - 1)];
    score_block<T, S>(q, ep, D, blk);
    for (int64_t i = 0; i < kQB; ++i)
      for (int64_t j = 0; j < nc; ++j) out[i * n + j0 + j] = blk[i * kCB + j];
  }
}

// "s(b, c) > t": candidate sum x against the target's sum t (false when either is NaN)
template <int S, typename T>
MMCL_INLINE bool better(T x, T t) {
  return lower_is_better(S) ? x < t : x > t;
}

struct RankArgs {
  int64_t B, N, D, C;
  const int64_t* target;
  const int64_t* indptr;
  const int64_t* indices;
};

constexpr int64_t kMaxTile = 256;  // candidates per tile, at most

template <typename T, int S>
void rank_counts(const RankArgs& a, const T* Q, const T* E, int64_t* greater, int64_t* equal,
                 bool& bad_filter) {
  const int64_t B = a.B, D = a.D, C = a.C;
  // 1. the target sums, one query per call (the other query slots repeat it)
  std::vector<T> tkey(static_cast<size_t>(B));
  at::parallel_for(0, B, 64, [&](int64_t lo, int64_t hi) {
    const T* qp[kQB];
    T out[kQB];
    for (int64_t b = lo; b < hi; ++b) {
      for (int64_t i = 0; i < kQB; ++i) qp[i] = Q + b * D;
      const T* ep = E + a.target[b] * D;
      score_rows<T, S>(qp, &ep, 1, D, out);
      tkey[b] = out[0];
    }
  });

  // 2. counts over every candidate but the target, in (query chunk) x (candidate range) items
  const int64_t nqc = (B + kQC - 1) / kQC;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (4 * nt + nqc - 1) / nqc;
  const int64_t ncs = std::max<int64_t>(1, std::min<int64_t>(want, C / 512));
  const int64_t crange = (C + ncs - 1) / ncs;
  const int64_t row_bytes = std::max<int64_t>(1, D * static_cast<int64_t>(sizeof(T)));
  const int64_t kt =
      std::min(kMaxTile, std::max<int64_t>(kCB, (kTileBytes / row_bytes) / kCB * kCB));
  std::vector<int64_t> pg(static_cast<size_t>(ncs * B)), pe(static_cast<size_t>(ncs * B));
  at::parallel_for(0, nqc * ncs, 1, [&](int64_t lo, int64_t hi) {
    const T* qp[kQB];
    const T* ep[kMaxTile];
    T out[kQB * kMaxTile];
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t qc = item / ncs, cs = item % ncs;
      const int64_t q0 = qc * kQC, q1 = std::min(B, q0 + kQC);
      const int64_t c0 = cs * crange, c1 = std::min(C, c0 + crange);
      int64_t* g = pg.data() + cs * B;
      int64_t* eq = pe.data() + cs * B;
      for (int64_t b = q0; b < q1; ++b) g[b] = eq[b] = 0;
      for (int64_t t0 = c0; t0 < c1; t0 += kt) {
        const int64_t n = std::min(c1, t0 + kt) - t0;
        for (int64_t j = 0; j < n; ++j) ep[j] = E + (t0 + j) * D;
        for (int64_t qb = q0; qb < q1; qb += kQB) {
          const int64_t nq = std::min(kQB, q1 - qb);
          for (int64_t i = 0; i < kQB; ++i) qp[i] = Q + (qb + std::min(i, nq - 1)) * D;
          score_rows<T, S>(qp, ep, n, D, out);
          for (int64_t i = 0; i < nq; ++i) {
            const T t = tkey[qb + i];
            const int64_t self = a.target[qb + i] - t0;  // the target's column, if in this tile
            const T* o = out + i * n;
            int64_t cg = 0, ce = 0;
            for (int64_t j = 0; j < n; ++j) {
              cg += static_cast<int64_t>(better<S>(o[j], t));
              ce += static_cast<int64_t>(o[j] == t);
            }
            if (self >= 0 && self < n) {  // the target is not its own competitor
              cg -= static_cast<int64_t>(better<S>(o[self], t));
              ce -= static_cast<int64_t>(o[self] == t);
            }
            g[qb + i] += cg;
            eq[qb + i] += ce;
          }
        }
      }
    }
  });

  // 3. totals, minus the filtered candidates (each counted once: an entry equal to its
  //    predecessor is skipped; entries >= C and the target itself are ignored)
  std::atomic<bool> bad{false};
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    const T* qp[kQB];
    const T* ep[kMaxTile];
    T out[kQB * kMaxTile];
    for (int64_t b = lo; b < hi; ++b) {
      int64_t gt = 0, e = 0;
      for (int64_t cs = 0; cs < ncs; ++cs) {
        gt += pg[cs * B + b];
        e += pe[cs * B + b];
      }
      for (int64_t i = 0; i < kQB; ++i) qp[i] = Q + b * D;
      const T t = tkey[b];
      const int64_t tb = a.target[b];
      int64_t nf = 0;
      const int64_t p0 = a.indptr[b], p1 = a.indptr[b + 1];
      for (int64_t p = p0; p <= p1; ++p) {
        if (p < p1) {
          const int64_t id = a.indices[p];
          if (id < 0 || (p > p0 && id < a.indices[p - 1])) {
            bad.store(true, std::memory_order_relaxed);
            continue;
          }
          if ((p > p0 && id == a.indices[p - 1]) || id >= C || id == tb) continue;
          ep[nf++] = E + id * D;
          if (nf < kMaxTile) continue;
        }
        if (nf == 0) continue;
        score_rows<T, S>(qp, ep, nf, D, out);
        for (int64_t j = 0; j < nf; ++j) {
          gt -= static_cast<int64_t>(better<S>(out[j], t));
          e -= static_cast<int64_t>(out[j] == t);
        }
        nf = 0;
      }
      greater[b] = gt;
      equal[b] = e;
    }
  });
  bad_filter = bad.load();
}

std::tuple<at::Tensor, at::Tensor> filtered_rank_counts_cpu(
    const at::Tensor& queries, const at::Tensor& entities, const at::Tensor& target,
    const at::Tensor& filter_indptr, const at::Tensor& filter_indices, int64_t score,
    int64_t num_candidates) {
  auto check = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "mmcl_fast: ", name, " must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), "mmcl_fast: ", name, " must be contiguous");
  };
  check(queries, "queries");
  check(entities, "entities");
  check(target, "target");
  check(filter_indptr, "filter_indptr");
  check(filter_indices, "filter_indices");
  TORCH_CHECK(queries.dim() == 2, "mmcl_fast: queries must be [B, D], got ", queries.sizes());
  TORCH_CHECK(entities.dim() == 2, "mmcl_fast: entities must be [N, D], got ", entities.sizes());
  TORCH_CHECK(queries.scalar_type() == at::kFloat || queries.scalar_type() == at::kDouble,
              "mmcl_fast: queries must be float32 or float64 on the CPU, got ",
              queries.scalar_type());
  TORCH_CHECK(entities.scalar_type() == queries.scalar_type(),
              "mmcl_fast: entities must have the queries' dtype");
  const int64_t B = queries.size(0), D = queries.size(1), N = entities.size(0);
  TORCH_CHECK(entities.size(1) == D, "mmcl_fast: entities have ", entities.size(1),
              " features, queries have ", D);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == B && target.scalar_type() == at::kLong,
              "mmcl_fast: target must be [B] int64");
  TORCH_CHECK(filter_indptr.dim() == 1 && filter_indptr.size(0) == B + 1 &&
                  filter_indptr.scalar_type() == at::kLong,
              "mmcl_fast: filter_indptr must be [B + 1] int64");
  TORCH_CHECK(filter_indices.dim() == 1 && filter_indices.scalar_type() == at::kLong,
              "mmcl_fast: filter_indices must be [nnz] int64");
  TORCH_CHECK(score >= 0 && score <= 5, "mmcl_fast: score must be 0..5, got ", score);
  TORCH_CHECK(!(score == kComplEx || score == kRotatE) || D % 2 == 0,
              "mmcl_fast: complex and rotate scores need an even D, got ", D);
  at::Tensor greater = at::empty({B}, queries.options().dtype(at::kLong));
  at::Tensor equal = at::empty({B}, queries.options().dtype(at::kLong));
  if (B == 0) return {greater, equal};
  const int64_t C = num_candidates;
  TORCH_CHECK(C >= 1 && C <= N, "mmcl_fast: num_candidates must be in [1, N = ", N, "], got ", C);
  const int64_t nnz = filter_indices.size(0);
  const int64_t* tp = target.const_data_ptr<int64_t>();
  const int64_t* ptr = filter_indptr.const_data_ptr<int64_t>();
  TORCH_CHECK(ptr[0] >= 0 && ptr[B] <= nnz, "mmcl_fast: filter_indptr must lie in [0, nnz = ",
              nnz, "]");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tp[b] >= 0 && tp[b] < C, "mmcl_fast: target[", b, "] = ", tp[b],
                " is outside [0, num_candidates = ", C, ")");
    TORCH_CHECK(ptr[b] <= ptr[b + 1], "mmcl_fast: filter_indptr must be non-decreasing");
  }
  const RankArgs args{B, N, D, C, tp, ptr, filter_indices.const_data_ptr<int64_t>()};
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "filtered_rank_counts_cpu", [&] {
    const scalar_t* q = queries.const_data_ptr<scalar_t>();
    const scalar_t* e = entities.const_data_ptr<scalar_t>();
    int64_t* g = greater.data_ptr<int64_t>();
    int64_t* eq = equal.data_ptr<int64_t>();
    switch (score) {
      case kL1:
        rank_counts<scalar_t, kL1>(args, q, e, g, eq, bad);
        break;
      case kL2:
        rank_counts<scalar_t, kL2>(args, q, e, g, eq, bad);
        break;
      case kDistMult:
        rank_counts<scalar_t, kDistMult>(args, q, e, g, eq, bad);
        break;
      case kComplEx:
        rank_counts<scalar_t, kComplEx>(args, q, e, g, eq, bad);
        break;
      case kRotatE:
        rank_counts<scalar_t, kRotatE>(args, q, e, g, eq, bad);
        break;
      default:
        rank_counts<scalar_t, kDot>(args, q, e, g, eq, bad);
        break;
    }
  });
  TORCH_CHECK(!bad, "mmcl_fast: filter rows must be sorted ascending with ids >= 0");
  return {greater, equal};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CPU, m) { m.impl("filtered_rank_counts", &filtered_rank_counts_cpu); }

}  // namespace mmcl_fast

// Op family C on the CPU, part 3: knowledge-graph triple scores with their negatives, fused (the
// contract is that of the kge_scores_* schemas in ../mmcl_fast.cpp; the maths and the reference:
// mmcl_fast/ops/kge_scores.py). float32 and float64, everything accumulated in the input's type.
//
// Positive i scores (x, r, y) = (E[heads_i], R_i, E[tails_i]); negative k < num_head scores
// (E[neg_ik], R_i, E[tails_i]), negative k >= num_head scores (E[heads_i], R_i, E[neg_ik]); the
// scores and their element-wise gradients: ../kge_scores.h.
//
// Forward: one pass over the positives; a positive's x, r, y rows stay in L1 while its K negative
// rows stream past (the next positive's rows are prefetched: they are random rows); nothing
// [b, K, D] is made. Rotate's cos / sin of the phases come from ATen's vectorised kernels once per
// call ([b, D/2] each), not from a scalar sincos per coordinate and triple.
// Backward (from the inputs alone: the differences are recomputed; transe_l2 scores each triple
// once more for its norm). Its order of additions is fixed, whatever the thread count, so
// grad_entities is bit-reproducible:
//  1. a counting sort of the b (K + 2) occurrences of entity rows (occurrence i (K + 2) + j: the
//     head of positive i for j = 0, its tail for 1, negative j - 2 after) by row id, stable;
//  2. one work item per block of positives writes each occurrence's gradient row, without
//     conflicts: a row's first occurrence straight into grad_entities, every later one into a
//     scratch buffer row of its own; the head's and tail's rows accumulate their positive's K + 1
//     terms in L1; grad_relations rows are written directly;
//  3. one work item per block of entity rows adds each row's buffered occurrences to it, in
//     occurrence order (rows that occur nowhere get zeros).
// Measured (b 1024, K 16, D 200, U 10.6k, transe_l1, one thread of a shared 2-core EPYC VM): this
// 5.4-6.1 ms; every occurrence in the buffer and a sum per row afterwards 6.2 ms; per-thread dense
// [U, D] buffers (zero-filled, added into, then reduced; the sums depend on the thread count)
// 7.1 ms. Step 2 dominates: its reads are the forward's, its writes random rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_clones.h"
#include "cpu/simd.h"
#include "kge_scores.h"

namespace mmcl_fast {
namespace {

constexpr int64_t kPosGrain = 16;   // positives per work item
constexpr int64_t kRowGrain = 64;   // grad_entities rows per work item

struct KgeGeom {
  int64_t U, D, Dr, b, K, nh;
  const int64_t* heads;
  const int64_t* tails;
  const int64_t* negs;
};

// The rows one score reads: x (head side), y (tail side), r (the relation row; rotate: rr, ri
// the cos / sin rows of its phases).
template <typename T>
struct Triple {
  const T* x;
  const T* r;
  const T* rr;
  const T* ri;
  const T* y;
};

// E elements at p: one scalar (E = T) or one vector.
template <typename E, typename T>
MMCL_INLINE E ld(const T* p) {
  if constexpr (std::is_same_v<E, T>) return *p;
  else return vload(p);
}

template <bool Store, typename T>
MMCL_INLINE void put(T* p, vec_t<T> v) {
  vstore(p, Store ? v : vload(p) + v);
}
template <bool Store, typename T>
MMCL_INLINE void put(T* p, T v) {
  *p = Store ? v : *p + v;
}

// The relation's (rr, ri) rows of a complex score: [re | im] halves, or rotate's cos and sin.
template <int S, typename T>
MMCL_INLINE void relation_halves(const Triple<T>& t, int64_t H, const T*& rr, const T*& ri) {
  rr = S == kRotatE ? t.rr : t.r;
  ri = S == kRotatE ? t.ri : t.r + H;
}

// The score's term at coordinates [j, j + |E|) of n (n = D, or D/2 complex coordinates).
template <int S, typename E, typename T>
MMCL_INLINE E term_at(const Triple<T>& t, int64_t n, int64_t j) {
  if constexpr (is_complex(S)) {
    const T *rr, *ri;
    relation_halves<S>(t, n, rr, ri);
    return complex_term<S, T>(ld<E>(t.x + j), ld<E>(t.x + n + j), ld<E>(rr + j), ld<E>(ri + j),
                              ld<E>(t.y + j), ld<E>(t.y + n + j));
  } else {
    return real_term<S>(ld<E>(t.x + j), ld<E>(t.r + j), ld<E>(t.y + j));
  }
}

// The gradient of c * the term at coordinates [j, j + |E|) into gx, gr, gy, each stored (its
// first contribution) or added: SX, SR, SY.
template <int S, bool SX, bool SR, bool SY, typename E, typename T>
MMCL_INLINE void grad_at(const Triple<T>& t, int64_t n, int64_t j, E c, T* gx, T* gr, T* gy) {
  if constexpr (is_complex(S)) {
    const T *rr, *ri;
    relation_halves<S>(t, n, rr, ri);
    E dxr, dxi, drr, dri, dyr, dyi;
    complex_grad<S, T>(ld<E>(t.x + j), ld<E>(t.x + n + j), ld<E>(rr + j), ld<E>(ri + j),
                       ld<E>(t.y + j), ld<E>(t.y + n + j), c, dxr, dxi, drr, dri, dyr, dyi);
    put<SX>(gx + j, dxr);
    put<SX>(gx + n + j, dxi);
    put<SR>(gr + j, drr);
    if constexpr (S == kComplEx) put<SR>(gr + n + j, dri);
    put<SY>(gy + j, dyr);
    put<SY>(gy + n + j, dyi);
  } else {
    E dx, dr, dy;
    real_grad<S>(ld<E>(t.x + j), ld<E>(t.r + j), ld<E>(t.y + j), c, dx, dr, dy);
    put<SX>(gx + j, dx);
    put<SR>(gr + j, dr);
    put<SY>(gy + j, dy);
  }
}

// score(x, r, y) over the row (D wide).
template <int S, typename T>
MMCL_INLINE T triple_score(const Triple<T>& t, int64_t D) {
  constexpr int64_t W = kW<T>;
  const int64_t n = is_complex(S) ? D / 2 : D;
  vec_t<T> acc{};
  int64_t j = 0;
  for (; j + W <= n; j += W) acc += term_at<S, vec_t<T>>(t, n, j);
  T s = hsum<T>(acc);
  for (; j < n; ++j) s += term_at<S, T>(t, n, j);
  if constexpr (S == kL1 || S == kRotatE) return -s;
  else if constexpr (S == kL2) return -std::sqrt(s);
  else return s;
}

// The gradient of g * score(x, r, y) into gx, gr, gy (stored or added: SX, SR, SY).
// transe_l2 takes c = g / ||d|| (0 at d = 0) in place of g.
template <int S, bool SX, bool SR, bool SY, typename T>
MMCL_INLINE void triple_grad(const Triple<T>& t, int64_t D, T c, T* gx, T* gr, T* gy) {
  constexpr int64_t W = kW<T>;
  const int64_t n = is_complex(S) ? D / 2 : D;
  const vec_t<T> cv = vsplat<T>(c);
  int64_t j = 0;
  for (; j + W <= n; j += W) grad_at<S, SX, SR, SY>(t, n, j, cv, gx, gr, gy);
  for (; j < n; ++j) grad_at<S, SX, SR, SY>(t, n, j, c, gx, gr, gy);
}

// The coefficient triple_grad takes for upstream gradient g.
template <int S, typename T>
MMCL_INLINE T grad_coef(const Triple<T>& t, int64_t D, T g) {
  if constexpr (S == kL2) {
    const T n = -triple_score<S, T>(t, D);
    return n > T(0) ? g / n : T(0);  // the norm's gradient at 0 is 0, as torch's
  } else {
    return g;
  }
}

// The rows of positive i + 1, requested while positive i computes (the gathers would stall).
template <typename T>
MMCL_INLINE void prefetch_positive(const KgeGeom& g, const T* E, int64_t i) {
  const int64_t bytes = g.D * static_cast<int64_t>(sizeof(T));
  auto row = [&](int64_t id) {
    const char* p = reinterpret_cast<const char*>(E + id * g.D);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
  };
  row(g.heads[i]);
  row(g.tails[i]);
  for (int64_t k = 0; k < g.K; ++k) row(g.negs[i * g.K + k]);
}

template <typename T>
MMCL_INLINE Triple<T> positive_rows(const KgeGeom& g, const T* E, const T* R, const T* cs,
                                   const T* sn, int64_t i) {
  const int64_t H = g.D / 2;
  return {E + g.heads[i] * g.D, R + i * g.Dr, cs == nullptr ? nullptr : cs + i * H,
          sn == nullptr ? nullptr : sn + i * H, E + g.tails[i] * g.D};
}

template <int S, typename T>
MMCL_CPU_CLONES void kge_forward_rows(const KgeGeom& g, const T* E, const T* R, const T* cs,
                                      const T* sn, T* pos, T* neg, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    if (i + 1 < i1) prefetch_positive(g, E, i + 1);
    Triple<T> t = positive_rows(g, E, R, cs, sn, i);
    const T* x = t.x;
    const T* y = t.y;
    pos[i] = triple_score<S, T>(t, g.D);
    const int64_t* ni = g.negs + i * g.K;
    T* out = neg + i * g.K;
    for (int64_t k = 0; k < g.nh; ++k) {
      t.x = E + ni[k] * g.D;
      out[k] = triple_score<S, T>(t, g.D);
    }
    t.x = x;
    for (int64_t k = g.nh; k < g.K; ++k) {
      t.y = E + ni[k] * g.D;
      out[k] = triple_score<S, T>(t, g.D);
    }
    t.y = y;
  }
}

// Where occurrence p's gradient row goes: dst[p] < U is grad_entities row dst[p] (the first
// occurrence of that row: it is written in place), otherwise buffer row dst[p] - U.
template <typename T>
MMCL_INLINE T* occurrence_row(const int64_t* dst, int64_t p, int64_t U, int64_t D, T* ge, T* buf) {
  const int64_t r = dst[p];
  return r < U ? ge + r * D : buf + (r - U) * D;
}

// Step 2 of the backward: the occurrence rows of positives [i0, i1), the grad_relations rows.
template <int S, typename T>
MMCL_CPU_CLONES void kge_backward_rows(const KgeGeom& g, const T* E, const T* R, const T* cs,
                                       const T* sn, const T* gpos, const T* gneg,
                                       const int64_t* dst, T* ge, T* buf, T* grel, int64_t i0,
                                       int64_t i1) {
  const int64_t D = g.D, K = g.K, U = g.U;
  for (int64_t i = i0; i < i1; ++i) {
    if (i + 1 < i1) prefetch_positive(g, E, i + 1);
    Triple<T> t = positive_rows(g, E, R, cs, sn, i);
    const T* x = t.x;
    const T* y = t.y;
    const int64_t p = i * (K + 2);
    T* gh = occurrence_row(dst, p, U, D, ge, buf);
    T* gt = occurrence_row(dst, p + 1, U, D, ge, buf);
    T* gr = grel + i * g.Dr;
    triple_grad<S, true, true, true>(t, D, grad_coef<S>(t, D, gpos[i]), gh, gr, gt);
    const int64_t* ni = g.negs + i * K;
    const T* gk = gneg + i * K;
    for (int64_t k = 0; k < g.nh; ++k) {
      t.x = E + ni[k] * D;
      triple_grad<S, true, false, false>(t, D, grad_coef<S>(t, D, gk[k]),
                                         occurrence_row(dst, p + 2 + k, U, D, ge, buf), gr, gt);
    }
    t.x = x;
    for (int64_t k = g.nh; k < K; ++k) {
      t.y = E + ni[k] * D;
      triple_grad<S, false, false, true>(t, D, grad_coef<S>(t, D, gk[k]), gh, gr,
                                         occurrence_row(dst, p + 2 + k, U, D, ge, buf));
    }
    t.y = y;
  }
}

// Step 3: rows [u0, u1) of grad_entities. A row's first occurrence is already in place; the
// others (buffer rows extra[start[u] + 1 ..], ascending occurrence order) are added to it in
// that order. Rows that occur nowhere get zeros.
template <typename T>
MMCL_CPU_CLONES void kge_segment_rows(const T* buf, const int64_t* start, const int64_t* extra,
                                      int64_t D, T* ge, int64_t u0, int64_t u1) {
  constexpr int64_t W = kW<T>;
  for (int64_t u = u0; u < u1; ++u) {
    T* __restrict__ o = ge + u * D;
    const int64_t q0 = start[u], q1 = start[u + 1];
    if (q0 == q1) {
      for (int64_t d = 0; d < D; ++d) o[d] = T(0);
      continue;
    }
    for (int64_t q = q0 + 1; q < q1; ++q) {
      const T* __restrict__ r = buf + extra[q] * D;
      int64_t d = 0;
      for (; d + W <= D; d += W) vstore(o + d, vload(o + d) + vload(r + d));
      for (; d < D; ++d) o[d] += r[d];
    }
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mmcl_fast: ", name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), "mmcl_fast: ", name, " must be contiguous");
}

void check_ids(const int64_t* p, int64_t n, int64_t U, const char* name) {
  for (int64_t k = 0; k < n; ++k)
    TORCH_CHECK(p[k] >= 0 && p[k] < U, "mmcl_fast: ", name, " holds id ", p[k],
                ", outside the entities' rows [0, ", U, ")");
}

KgeGeom check_kge(const at::Tensor& entities, const at::Tensor& relations, const at::Tensor& heads,
                  const at::Tensor& tails, const at::Tensor& negatives, int64_t num_head,
                  int64_t score) {
  check_cpu(entities, "entities");
  check_cpu(relations, "relations");
  check_cpu(heads, "heads");
  check_cpu(tails, "tails");
  check_cpu(negatives, "negatives");
  TORCH_CHECK(entities.scalar_type() == at::kFloat || entities.scalar_type() == at::kDouble,
              "mmcl_fast: entities must be float32 or float64 on the CPU, got ",
              entities.scalar_type());
  const KgeShape s = check_kge_shapes(entities, relations, heads, tails, negatives, num_head, score);
  const KgeGeom g{s.U, s.D, s.Dr, s.b, s.K, num_head, heads.const_data_ptr<int64_t>(),
                  tails.const_data_ptr<int64_t>(), negatives.const_data_ptr<int64_t>()};
  check_ids(g.heads, g.b, g.U, "heads");
  check_ids(g.tails, g.b, g.U, "tails");
  check_ids(g.negs, g.b * g.K, g.U, "negatives");
  return g;
}

// Rotate's cos / sin of the phases, [b, D/2] each (ATen's vectorised kernels); empty otherwise.
std::tuple<at::Tensor, at::Tensor> rotations(const at::Tensor& relations, int64_t score) {
  if (score != kRotatE) return {at::Tensor(), at::Tensor()};
  return {at::cos(relations), at::sin(relations)};
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> kge_scores_forward_cpu(
    const at::Tensor& entities, const at::Tensor& relations, const at::Tensor& heads,
    const at::Tensor& tails, const at::Tensor& negatives, int64_t num_head, int64_t score) {
  const KgeGeom g = check_kge(entities, relations, heads, tails, negatives, num_head, score);
  at::Tensor pos = at::empty({g.b}, entities.options());
  at::Tensor neg = at::empty({g.b, g.K}, entities.options());
  if (g.b == 0) return {pos, neg};
  at::Tensor cs, sn;
  std::tie(cs, sn) = rotations(relations, score);
  AT_DISPATCH_FLOATING_TYPES(entities.scalar_type(), "kge_scores_forward_cpu", [&] {
    using T = scalar_t;
    const T* E = entities.const_data_ptr<T>();
    const T* R = relations.const_data_ptr<T>();
    const T* cp = ptr_or_null<T>(cs);
    const T* sp = ptr_or_null<T>(sn);
    T* pp = pos.data_ptr<T>();
    T* np = neg.data_ptr<T>();
    dispatch_score(score, [&](auto s) {
      at::parallel_for(0, g.b, kPosGrain, [&](int64_t lo, int64_t hi) {
        kge_forward_rows<decltype(s)::value, T>(g, E, R, cp, sp, pp, np, lo, hi);
      });
    });
  });
  return {pos, neg};
}

std::tuple<at::Tensor, at::Tensor> kge_scores_backward_cpu(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& entities,
    const at::Tensor& relations, const at::Tensor& heads, const at::Tensor& tails,
    const at::Tensor& negatives, int64_t num_head, int64_t score) {
  const KgeGeom g = check_kge(entities, relations, heads, tails, negatives, num_head, score);
  check_cpu(grad_pos, "grad_pos");
  check_cpu(grad_neg, "grad_neg");
  const auto dt = entities.scalar_type();
  TORCH_CHECK(grad_pos.dim() == 1 && grad_pos.size(0) == g.b && grad_pos.scalar_type() == dt,
              "mmcl_fast: grad_pos must be [b] of the accumulation dtype (the entities' on the CPU)");
  TORCH_CHECK(grad_neg.dim() == 2 && grad_neg.size(0) == g.b && grad_neg.size(1) == g.K &&
                  grad_neg.scalar_type() == dt,
              "mmcl_fast: grad_neg must be [b, K] of the accumulation dtype (the entities' on the CPU)");
  at::Tensor grad_e = at::empty({g.U, g.D}, entities.options());
  at::Tensor grad_r = at::empty({g.b, g.Dr}, entities.options());
  const int64_t n_occ = g.b * (g.K + 2);
  if (g.b == 0) {
    grad_e.zero_();
    return {grad_e, grad_r};
  }
  at::Tensor cs, sn;
  std::tie(cs, sn) = rotations(relations, score);
  // occurrence p = i (K + 2) + j: j = 0 the head of positive i, 1 its tail, 2 + k negative k.
  // A counting sort by row: start[u] .. start[u + 1] are row u's occurrences in ascending p; the
  // first goes straight into grad_entities (dst[p] = u), each later one to its own buffer row
  // (dst[p] = U + its buffer row, extra[its sorted position] = its buffer row).
  std::vector<int64_t> start(static_cast<size_t>(g.U) + 1, 0), dst(static_cast<size_t>(n_occ)),
      extra(static_cast<size_t>(n_occ));
  auto occ_row = [&](int64_t p) {
    const int64_t i = p / (g.K + 2), j = p - i * (g.K + 2);
    return j == 0 ? g.heads[i] : j == 1 ? g.tails[i] : g.negs[i * g.K + j - 2];
  };
  for (int64_t p = 0; p < n_occ; ++p) ++start[occ_row(p) + 1];
  for (int64_t u = 0; u < g.U; ++u) start[u + 1] += start[u];
  int64_t n_buf = 0;
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < n_occ; ++p) {
      const int64_t u = occ_row(p), q = next[u]++;
      if (q == start[u]) {
        dst[p] = u;
      } else {
        extra[q] = n_buf;
        dst[p] = g.U + n_buf++;
      }
    }
  }
  at::Tensor buf = at::empty({n_buf, g.D}, entities.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "kge_scores_backward_cpu", [&] {
    using T = scalar_t;
    const T* E = entities.const_data_ptr<T>();
    const T* R = relations.const_data_ptr<T>();
    const T* cp = ptr_or_null<T>(cs);
    const T* sp = ptr_or_null<T>(sn);
    const T* gp = grad_pos.const_data_ptr<T>();
    const T* gn = grad_neg.const_data_ptr<T>();
    T* bp = buf.data_ptr<T>();
    T* grp = grad_r.data_ptr<T>();
    T* gep = grad_e.data_ptr<T>();
    dispatch_score(score, [&](auto s) {
      at::parallel_for(0, g.b, kPosGrain, [&](int64_t lo, int64_t hi) {
        kge_backward_rows<decltype(s)::value, T>(g, E, R, cp, sp, gp, gn, dst.data(), gep, bp, grp,
                                                 lo, hi);
      });
    });
    at::parallel_for(0, g.U, kRowGrain, [&](int64_t lo, int64_t hi) {
      kge_segment_rows<T>(bp, start.data(), extra.data(), g.D, gep, lo, hi);
    });
  });
  return {grad_e, grad_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CPU, m) {
  m.impl("kge_scores_forward", &kge_scores_forward_cpu);
  m.impl("kge_scores_backward", &kge_scores_backward_cpu);
}

}  // namespace mmcl_fast

// Op family C on the CPU, part 1: the modulated multimodal embedding, the snapshot weight
// interpolation and the anchor penalty (DESIGN.md sections 6.1-6.3; the contract is that of the
// schemas in ../mmcl_fast.cpp). float32 and float64; "acc", the type of every accumulation and
// of the gates, logits gradients, norms and sums, is the input's type here, except that the
// multi-tensor reductions (norms, dots, penalty sums) are carried in double and rounded once.
//
// Modulated embedding, tables [M, N, D], index [B], gamma/beta [M, D]:
//     keep_bm  = modality_mask[index_b, m]             (true without a mask)
//     gates_bm = softmax over the kept m of logit_bm     (logit = gate_logits[b, m], gate_logits[m]
//                or 0 without logits; 0 where not kept)
//     x_bm = tables[m, index_b],  y_bm = gamma_m * x_bm + beta_m
//     out_b = sum_m gates_bm y_bm
// Backward, g_b = grad_out[b], a_bm = gates[b, m]:
//     grad_tables[m, index_b] += a_bm gamma_m g_b     (dense [M, N, D]; or, sparse, the COO values
//                                                     [M, B, D], values[m, b] = a_bm gamma_m g_b)
//     grad_gamma_m = sum_b a_bm g_b x_bm,  grad_beta_m = sum_b a_bm g_b
//     d_bm = g_b . y_bm,  grad_logits_bm = a_bm (d_bm - sum_m' a_bm' d_bm')   (0 where a_bm = 0)
// The forward and the per-sample part of the backward run over blocks of samples; one pass over
// d per (b, m) builds d_bm and the gamma/beta partial sums of the block (kRows samples, a fixed
// partition, so the sums over b are the same for every thread count: the block partials are then
// added in block order). The dense table gradient is zeroed by one parallel fill (a large one on
// transparent huge pages, see zeros_for_grad) and only gathered rows are written: positions are
// sorted by (id, position), and each id's segment is reduced in that order by one work item, so
// duplicates accumulate deterministically without atomics.
//
// Weight interpolation over a list of K tensors (sigma [K] acc, i >= 1):
//     n_k = ||new_k||_F,  nn_k = max(n_k, eps)
//     out_k = (1 - 1/i) prev_k + (1/i) sigma_k new_k / nn_k
//     backward: dot_k = sum g_k new_k;  grad_sigma_k = (1/i) dot_k / nn_k
//               grad_new_k = sigma_k / (i nn_k) (g_k - [n_k > eps] dot_k / nn_k^2 new_k)
// Anchor penalty: sums_k = sum w_k (p_k - a_k)^2 (w absent: 1; one value; one per row of p; one
// per element), grad_p_k = 2 grad_k w_k (p_k - a_k).
// These three multi-tensor ops cut every tensor of the list into chunks of kChunk elements, run
// the chunks with at::parallel_for, and add the per-chunk partials of a reduction in chunk order:
// the results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/cpu_clones.h"
#include "cpu/simd.h"

namespace mmcl_fast {
namespace {

// ==============================================================================================
// Modulated embedding
// ==============================================================================================

constexpr int64_t kRows = 64;  // samples per work item (and per gamma/beta partial)

// The masked softmax of one sample's gate logits into a[0, M) (acc = T). lg: the logits row or
// null (all 0); keep: the mask row or null (all kept). No kept modality gives all-zero gates.
template <typename T>
MMCL_INLINE void sample_gates(const T* lg, const bool* keep, int64_t M, T* a) {
  T mx = -std::numeric_limits<T>::infinity();
  bool any = false;
  for (int64_t m = 0; m < M; ++m) {
    if (keep != nullptr && !keep[m]) continue;
    const T l = lg != nullptr ? lg[m] : T(0);
    mx = (!any || l > mx) ? l : mx;
    any = true;
  }
  T s = T(0);
  for (int64_t m = 0; m < M; ++m) {
    const bool k = keep == nullptr || keep[m];
    const T e = k ? std::exp((lg != nullptr ? lg[m] : T(0)) - mx) : T(0);
    a[m] = e;
    s += e;
  }
  for (int64_t m = 0; m < M; ++m) a[m] = any ? a[m] / s : T(0);
}

struct EmbGeom {
  int64_t M, N, D, B;
};

// Forward of samples [b0, b1): gates, then out_b = sum_m a_bm (gamma_m x_bm + beta_m).
// Returns false when an index is out of range (that sample's output is left zero).
template <typename T>
MMCL_CPU_CLONES bool emb_forward_rows(const EmbGeom& g, const T* tables, const int64_t* index,
                                      const T* gamma, const T* beta, const T* logits,
                                      int64_t logits_row_stride, const bool* mask, T* out,
                                      T* gates, int64_t b0, int64_t b1) {
  const int64_t M = g.M, N = g.N, D = g.D;
  bool ok = true;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t id = index[b];
    T* __restrict__ o = out + b * D;
    T* a = gates + b * M;
    if (id < 0 || id >= N) {
      ok = false;
      for (int64_t m = 0; m < M; ++m) a[m] = T(0);
      for (int64_t d = 0; d < D; ++d) o[d] = T(0);
      continue;
    }
    if (b + 2 < b1) {  // the rows of a later sample, so that the gather does not stall
      const int64_t nid = index[b + 2];
      if (nid >= 0 && nid < N)
        for (int64_t m = 0; m < M; ++m) {
          const char* r = reinterpret_cast<const char*>(tables + (m * N + nid) * D);
          for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
            __builtin_prefetch(r + off);
        }
    }
    sample_gates<T>(logits != nullptr ? logits + b * logits_row_stride : nullptr,
                    mask != nullptr ? mask + id * M : nullptr, M, a);
    for (int64_t m = 0; m < M; ++m) {
      const T am = a[m];
      const T* __restrict__ x = tables + (m * N + id) * D;
      const T* __restrict__ gm = gamma + m * D;
      const T* __restrict__ bm = beta + m * D;
      if (m == 0) {
        for (int64_t d = 0; d < D; ++d) o[d] = am * (gm[d] * x[d] + bm[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] += am * (gm[d] * x[d] + bm[d]);
      }
    }
    if (M == 0)
      for (int64_t d = 0; d < D; ++d) o[d] = T(0);
  }
  return ok;
}

// Per-sample part of the backward for samples [b0, b1): grad_logits, the block's partial sums
// pg/pb [M, D] (overwritten) of a g x and a g, and, when vals is not null, the sparse values.
// One pass over d per (b, m). Returns false when an index is out of range.
template <typename T>
MMCL_CPU_CLONES bool emb_backward_rows(const EmbGeom& g, const T* grad_out, const T* tables,
                                       const int64_t* index, const T* gamma, const T* beta,
                                       const T* gates, T* grad_logits, T* pg, T* pb, T* vals,
                                       int64_t b0, int64_t b1, T* dm) {
  using V = vec_t<T>;
  constexpr int64_t W = kW<T>;
  const int64_t M = g.M, N = g.N, D = g.D, B = g.B;
  for (int64_t k = 0; k < M * D; ++k) pg[k] = T(0);
  for (int64_t k = 0; k < M * D; ++k) pb[k] = T(0);
  bool ok = true;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t id = index[b];
    const T* a = gates + b * M;
    T* gl = grad_logits + b * M;
    if (id < 0 || id >= N) {
      ok = false;
      for (int64_t m = 0; m < M; ++m) gl[m] = T(0);
      continue;
    }
    if (b + 2 < b1) {
      const int64_t nid = index[b + 2];
      if (nid >= 0 && nid < N)
        for (int64_t m = 0; m < M; ++m) {
          const char* r = reinterpret_cast<const char*>(tables + (m * N + nid) * D);
          for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
            __builtin_prefetch(r + off);
        }
    }
    const T* __restrict__ go = grad_out + b * D;
    for (int64_t m = 0; m < M; ++m) {
      const T am = a[m];
      const T* __restrict__ x = tables + (m * N + id) * D;
      const T* __restrict__ gm = gamma + m * D;
      const T* __restrict__ bm = beta + m * D;
      T* __restrict__ pgm = pg + m * D;
      T* __restrict__ pbm = pb + m * D;
      T* __restrict__ v = vals != nullptr ? vals + (m * B + b) * D : nullptr;
      V acc{};
      int64_t d = 0;
      for (; d + W <= D; d += W) {
        const V gv = vload(go + d), xv = vload(x + d), gmv = vload(gm + d);
        acc += gv * (gmv * xv + vload(bm + d));
        const V ag = am * gv;
        vstore(pgm + d, vload(pgm + d) + ag * xv);
        vstore(pbm + d, vload(pbm + d) + ag);
        if (v != nullptr) vstore(v + d, gmv * ag);
      }
      T dot = hsum<T>(acc);
      for (; d < D; ++d) {
        dot += go[d] * (gm[d] * x[d] + bm[d]);
        const T ag = am * go[d];
        pgm[d] += ag * x[d];
        pbm[d] += ag;
        if (v != nullptr) v[d] = gm[d] * ag;
      }
      dm[m] = dot;
    }
    T s = T(0);
    for (int64_t m = 0; m < M; ++m) s += a[m] * dm[m];
    for (int64_t m = 0; m < M; ++m) gl[m] = a[m] == T(0) ? T(0) : a[m] * (dm[m] - s);
  }
  return ok;
}

// Dense table gradient of the id segments [s0, s1): segment s holds the positions
// order[seg[s], seg[s + 1]) (ascending), all of one id. row = gamma_m * sum_p a_pm g_p.
template <typename T>
MMCL_CPU_CLONES void emb_scatter_segments(const EmbGeom& g, const T* grad_out, const int64_t* index,
                                          const T* gamma, const T* gates, const int64_t* order,
                                          const int64_t* seg, T* grad_tables, int64_t s0,
                                          int64_t s1) {
  const int64_t M = g.M, N = g.N, D = g.D;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t p0 = seg[s], p1 = seg[s + 1];
    const int64_t id = index[order[p0]];
    for (int64_t m = 0; m < M; ++m) {
      T* __restrict__ row = grad_tables + (m * N + id) * D;
      const T* __restrict__ gm = gamma + m * D;
      {
        const int64_t b = order[p0];
        const T am = gates[b * M + m];
        const T* __restrict__ go = grad_out + b * D;
        for (int64_t d = 0; d < D; ++d) row[d] = am * go[d];
      }
      for (int64_t p = p0 + 1; p < p1; ++p) {
        const int64_t b = order[p];
        const T am = gates[b * M + m];
        const T* __restrict__ go = grad_out + b * D;
        for (int64_t d = 0; d < D; ++d) row[d] += am * go[d];
      }
      for (int64_t d = 0; d < D; ++d) row[d] = gm[d] * row[d];
    }
  }
}

// A zero-filled tensor for the dense table gradient: at::empty, then one parallel fill. A large
// one is first advised to use transparent huge pages: its first touch (the fill) then faults in
// 2 MiB pages instead of 4 KiB ones, which is most of the cost of zeroing a freshly mapped
// gigabyte buffer (measured 2.5x faster for the 3 GB gradient of N = 1M on a 2-core VM). The
// advice is a hint only: the contents are the same whether or not the kernel honours it.
at::Tensor zeros_for_grad(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.nbytes();
  if (bytes >= 16 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  t.zero_();
  return t;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mmcl_fast: ", name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), "mmcl_fast: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> modulated_embedding_forward_cpu(
    const at::Tensor& tables, const at::Tensor& index, const at::Tensor& gamma,
    const at::Tensor& beta, const std::optional<at::Tensor>& gate_logits,
    const std::optional<at::Tensor>& modality_mask) {
  check_cpu(tables, "tables");
  check_cpu(index, "index");
  check_cpu(gamma, "gamma");
  check_cpu(beta, "beta");
  TORCH_CHECK(tables.dim() == 3, "mmcl_fast: tables must be [M, N, D], got ", tables.sizes());
  TORCH_CHECK(tables.scalar_type() == at::kFloat || tables.scalar_type() == at::kDouble,
              "mmcl_fast: tables must be float32 or float64 on the CPU, got ",
              tables.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "mmcl_fast: index must be a 1-D int64 tensor");
  const int64_t M = tables.size(0), N = tables.size(1), D = tables.size(2), B = index.size(0);
  const auto dt = tables.scalar_type();
  TORCH_CHECK(gamma.sizes() == at::IntArrayRef({M, D}) && gamma.scalar_type() == dt,
              "mmcl_fast: gamma must be [M, D] of the tables' dtype");
  TORCH_CHECK(beta.sizes() == at::IntArrayRef({M, D}) && beta.scalar_type() == dt,
              "mmcl_fast: beta must be [M, D] of the tables' dtype");
  int64_t lstride = 0;
  if (gate_logits.has_value()) {
    const at::Tensor& l = *gate_logits;
    check_cpu(l, "gate_logits");
    TORCH_CHECK(l.scalar_type() == tables.scalar_type(),
                "mmcl_fast: gate_logits must have the tables' dtype");
    TORCH_CHECK((l.dim() == 2 && l.size(0) == B && l.size(1) == M) ||
                    (l.dim() == 1 && l.size(0) == M),
                "mmcl_fast: gate_logits must be [B, M] or [M], got ", l.sizes());
    lstride = l.dim() == 2 ? M : 0;
  }
  if (modality_mask.has_value()) {
    const at::Tensor& k = *modality_mask;
    check_cpu(k, "modality_mask");
    TORCH_CHECK(k.scalar_type() == at::kBool && k.dim() == 2 && k.size(0) == N && k.size(1) == M,
                "mmcl_fast: modality_mask must be [N, M] bool, got ", k.sizes(), " ",
                k.scalar_type());
  }
  at::Tensor out = at::empty({B, D}, tables.options());
  at::Tensor gates = at::empty({B, M}, tables.options());
  if (B == 0) return {out, gates};
  std::atomic<bool> ok{true};
  const EmbGeom geom{M, N, D, B};
  AT_DISPATCH_FLOATING_TYPES(tables.scalar_type(), "modulated_embedding_forward_cpu", [&] {
    const scalar_t* tp = tables.const_data_ptr<scalar_t>();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
    const scalar_t* bp = beta.const_data_ptr<scalar_t>();
    const scalar_t* lp =
        gate_logits.has_value() ? gate_logits->const_data_ptr<scalar_t>() : nullptr;
    const bool* kp = modality_mask.has_value() ? modality_mask->const_data_ptr<bool>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* ap = gates.data_ptr<scalar_t>();
    at::parallel_for(0, B, kRows, [&](int64_t lo, int64_t hi) {
      if (!emb_forward_rows<scalar_t>(geom, tp, ip, gp, bp, lp, lstride, kp, op, ap, lo, hi))
        ok.store(false, std::memory_order_relaxed);
    });
  });
  TORCH_CHECK(ok.load(), "mmcl_fast: index holds an id outside [0, ", N, ")");
  return {out, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_embedding_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& tables, const at::Tensor& index,
    const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& gates, bool sparse) {
  check_cpu(grad_out, "grad_out");
  check_cpu(tables, "tables");
  check_cpu(index, "index");
  check_cpu(gamma, "gamma");
  check_cpu(beta, "beta");
  check_cpu(gates, "gates");
  TORCH_CHECK(tables.dim() == 3, "mmcl_fast: tables must be [M, N, D], got ", tables.sizes());
  TORCH_CHECK(tables.scalar_type() == at::kFloat || tables.scalar_type() == at::kDouble,
              "mmcl_fast: tables must be float32 or float64 on the CPU, got ",
              tables.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "mmcl_fast: index must be a 1-D int64 tensor");
  const int64_t M = tables.size(0), N = tables.size(1), D = tables.size(2), B = index.size(0);
  const auto dt = tables.scalar_type();
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, D}) && grad_out.scalar_type() == dt,
              "mmcl_fast: grad_out must be [B, D] of the tables' dtype, got ", grad_out.sizes());
  TORCH_CHECK(gamma.sizes() == at::IntArrayRef({M, D}) && gamma.scalar_type() == dt,
              "mmcl_fast: gamma must be [M, D] of the tables' dtype");
  TORCH_CHECK(beta.sizes() == at::IntArrayRef({M, D}) && beta.scalar_type() == dt,
              "mmcl_fast: beta must be [M, D] of the tables' dtype");
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({B, M}) && gates.scalar_type() == dt,
              "mmcl_fast: gates must be [B, M] of the accumulation dtype (the tables' on the CPU)");
  at::Tensor grad_tables =
      sparse ? at::empty({M, B, D}, tables.options()) : zeros_for_grad({M, N, D}, tables.options());
  at::Tensor grad_gamma = at::empty({M, D}, tables.options());
  at::Tensor grad_beta = at::empty({M, D}, tables.options());
  at::Tensor grad_logits = at::empty({B, M}, tables.options());
  const int64_t nblk = (B + kRows - 1) / kRows;
  if (B == 0) {
    grad_gamma.zero_();
    grad_beta.zero_();
    return {grad_tables, grad_gamma, grad_beta, grad_logits};
  }
  std::atomic<bool> ok{true};
  const EmbGeom geom{M, N, D, B};
  AT_DISPATCH_FLOATING_TYPES(dt, "modulated_embedding_backward_cpu", [&] {
    using T = scalar_t;
    const T* gop = grad_out.const_data_ptr<T>();
    const T* tp = tables.const_data_ptr<T>();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    const T* gp = gamma.const_data_ptr<T>();
    const T* bp = beta.const_data_ptr<T>();
    const T* ap = gates.const_data_ptr<T>();
    T* glp = grad_logits.data_ptr<T>();
    T* vals = sparse ? grad_tables.data_ptr<T>() : nullptr;
    std::vector<T> part(static_cast<size_t>(nblk * 2 * M * D));
    at::parallel_for(0, nblk, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> dm(static_cast<size_t>(M));
      for (int64_t k = lo; k < hi; ++k) {
        T* pg = part.data() + k * 2 * M * D;
        if (!emb_backward_rows<T>(geom, gop, tp, ip, gp, bp, ap, glp, pg, pg + M * D, vals,
                                  k * kRows, std::min(B, (k + 1) * kRows), dm.data()))
          ok.store(false, std::memory_order_relaxed);
      }
    });
    // grad_gamma, grad_beta: the block partials added in block order, parallel over elements
    T* ggp = grad_gamma.data_ptr<T>();
    T* gbp = grad_beta.data_ptr<T>();
    const int64_t MD = M * D;
    at::parallel_for(0, MD, 2048, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        T sg = part[e], sb = part[MD + e];
        for (int64_t k = 1; k < nblk; ++k) {
          sg += part[k * 2 * MD + e];
          sb += part[k * 2 * MD + MD + e];
        }
        ggp[e] = sg;
        gbp[e] = sb;
      }
    });
    if (!sparse && ok.load()) {
      // positions sorted by (id, position): each id's segment is reduced in position order
      std::vector<std::pair<int64_t, int64_t>> key(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) key[b] = {ip[b], b};
      std::sort(key.begin(), key.end());
      std::vector<int64_t> order(static_cast<size_t>(B));
      std::vector<int64_t> seg;
      seg.reserve(static_cast<size_t>(B) + 1);
      for (int64_t p = 0; p < B; ++p) {
        order[p] = key[p].second;
        if (p == 0 || key[p].first != key[p - 1].first) seg.push_back(p);
      }
      seg.push_back(B);
      const int64_t nseg = static_cast<int64_t>(seg.size()) - 1;
      T* gtp = grad_tables.data_ptr<T>();
      at::parallel_for(0, nseg, 16, [&](int64_t lo, int64_t hi) {
        emb_scatter_segments<T>(geom, gop, ip, gp, ap, order.data(), seg.data(), gtp, lo, hi);
      });
    }
  });
  TORCH_CHECK(ok.load(), "mmcl_fast: index holds an id outside [0, ", N, ")");
  return {grad_tables, grad_gamma, grad_beta, grad_logits};
}

// ==============================================================================================
// Multi-tensor ops: interpolation and anchor penalty
// ==============================================================================================

constexpr int64_t kChunk = 1 << 16;  // elements per work item

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t)
    for (int64_t b = 0; b < numels[t]; b += kChunk)
      chunks.push_back({t, b, std::min(numels[t], b + kChunk)});
  return chunks;
}

// Per-tensor totals of per-chunk partials, added in chunk order.
std::vector<double> per_tensor_sums(const std::vector<Chunk>& chunks,
                                    const std::vector<double>& part, size_t K) {
  std::vector<double> tot(K, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) tot[chunks[c].tensor] += part[c];
  return tot;
}

// sum_i x_i y_i over [0, n) in double, 8 independent lanes (vectorisable without reassociating
// one sum), lanes added in a fixed order.
template <typename T>
MMCL_CPU_CLONES double chunk_dot(const T* x, const T* y, int64_t n) {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j)
      l[j] += static_cast<double>(x[i + j]) * static_cast<double>(y[i + j]);
  double s = 0.0;
  for (; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])) + s;
}

// sum_i w (p_i - a_i)^2 with w one value (ws = 0) or per element (ws = 1), in double
template <typename T>
MMCL_CPU_CLONES double chunk_wsq(const T* p, const T* a, const T* w, int64_t ws, int64_t n) {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double s = 0.0;
  int64_t i = 0;
  if (ws == 0) {
    for (; i + 8 <= n; i += 8)
      for (int j = 0; j < 8; ++j) {
        const double d = static_cast<double>(p[i + j]) - static_cast<double>(a[i + j]);
        l[j] += d * d;
      }
    for (; i < n; ++i) {
      const double d = static_cast<double>(p[i]) - static_cast<double>(a[i]);
      s += d * d;
    }
    const double t = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])) + s;
    return static_cast<double>(w[0]) * t;
  }
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const double d = static_cast<double>(p[i + j]) - static_cast<double>(a[i + j]);
      l[j] += static_cast<double>(w[i + j]) * (d * d);
    }
  for (; i < n; ++i) {
    const double d = static_cast<double>(p[i]) - static_cast<double>(a[i]);
    s += static_cast<double>(w[i]) * (d * d);
  }
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])) + s;
}

// out = c1 x + c2 y over [0, n)
template <typename T>
MMCL_CPU_CLONES void chunk_axpby(T* __restrict__ out, const T* __restrict__ x,
                                 const T* __restrict__ y, T c1, T c2, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = c1 * x[i] + c2 * y[i];
}

// out = c (g - k y) over [0, n)
template <typename T>
MMCL_CPU_CLONES void chunk_proj(T* __restrict__ out, const T* __restrict__ g,
                                const T* __restrict__ y, T c, T k, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = c * (g[i] - k * y[i]);
}

// out = c w (p - a), w one value (ws = 0) or per element (ws = 1)
template <typename T>
MMCL_CPU_CLONES void chunk_wdiff(T* __restrict__ out, const T* __restrict__ p,
                                 const T* __restrict__ a, const T* __restrict__ w, int64_t ws, T c,
                                 int64_t n) {
  if (ws == 0) {
    const T cw = c * w[0];
    for (int64_t i = 0; i < n; ++i) out[i] = cw * (p[i] - a[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = c * w[i] * (p[i] - a[i]);
  }
}

void check_list(const at::TensorList ref, const at::TensorList other, const char* ref_name,
                const char* name) {
  TORCH_CHECK(other.size() == ref.size(), "mmcl_fast: ", name, " has ", other.size(),
              " tensors, ", ref_name, " has ", ref.size());
  for (size_t t = 0; t < ref.size(); ++t) {
    check_cpu(ref[t], ref_name);
    check_cpu(other[t], name);
    TORCH_CHECK(other[t].sizes() == ref[t].sizes(), "mmcl_fast: ", name, "[", t, "] has shape ",
                other[t].sizes(), ", ", ref_name, "[", t, "] has ", ref[t].sizes());
    TORCH_CHECK(ref[t].scalar_type() == ref[0].scalar_type() &&
                    other[t].scalar_type() == ref[0].scalar_type(),
                "mmcl_fast: ", ref_name, " and ", name, " must share one dtype");
    TORCH_CHECK(ref[t].scalar_type() == at::kFloat || ref[t].scalar_type() == at::kDouble,
                "mmcl_fast: ", ref_name, " must be float32 or float64 on the CPU");
  }
}

std::vector<int64_t> numels_of(const at::TensorList ts) {
  std::vector<int64_t> n(ts.size());
  for (size_t t = 0; t < ts.size(); ++t) n[t] = ts[t].numel();
  return n;
}

// sigma / norms / grad vectors: [K] of the accumulation dtype, read as double
std::vector<double> read_acc_vector(const at::Tensor& v, size_t K, at::ScalarType acc,
                                    const char* name) {
  check_cpu(v, name);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == static_cast<int64_t>(K), "mmcl_fast: ", name,
              " must be [K] with K = ", K, ", got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc, "mmcl_fast: ", name, " must be ", acc, ", got ",
              v.scalar_type());
  std::vector<double> r(K);
  AT_DISPATCH_FLOATING_TYPES(acc, "read_acc_vector", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    for (size_t k = 0; k < K; ++k) r[k] = static_cast<double>(p[k]);
  });
  return r;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> interpolate_weights_forward_cpu(
    at::TensorList prev, at::TensorList new_, const at::Tensor& sigma, double i, double eps) {
  check_list(prev, new_, "prev", "new");
  const size_t K = prev.size();
  TORCH_CHECK(i >= 1.0, "mmcl_fast: the snapshot number i must be >= 1, got ", i);
  const at::ScalarType acc = K > 0 ? prev[0].scalar_type() : sigma.scalar_type();
  const std::vector<double> sg = read_acc_vector(sigma, K, acc, "sigma");
  std::vector<at::Tensor> outs(K);
  for (size_t k = 0; k < K; ++k) outs[k] = at::empty_like(prev[k]);
  at::Tensor norms = at::empty({static_cast<int64_t>(K)}, sigma.options().dtype(acc));
  if (K == 0) return {outs, norms};
  const std::vector<Chunk> chunks = make_chunks(numels_of(prev));
  const int64_t nc = static_cast<int64_t>(chunks.size());
  AT_DISPATCH_FLOATING_TYPES(acc, "interpolate_weights_forward_cpu", [&] {
    using T = scalar_t;
    std::vector<double> part(chunks.size());
    at::parallel_for(0, nc, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const T* y = new_[chunks[c].tensor].const_data_ptr<T>() + chunks[c].begin;
        part[c] = chunk_dot<T>(y, y, chunks[c].end - chunks[c].begin);
      }
    });
    const std::vector<double> sq = per_tensor_sums(chunks, part, K);
    std::vector<T> c2(K);
    T* np = norms.data_ptr<T>();
    const T inv_i = static_cast<T>(1.0 / i);
    const T c1 = static_cast<T>(1.0 - 1.0 / i);
    for (size_t k = 0; k < K; ++k) {
      const T n = static_cast<T>(std::sqrt(sq[k]));
      np[k] = n;
      const T nn = std::max(n, static_cast<T>(eps));
      c2[k] = inv_i * static_cast<T>(sg[k]) / nn;
    }
    at::parallel_for(0, nc, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Chunk& ch = chunks[c];
        chunk_axpby<T>(outs[ch.tensor].data_ptr<T>() + ch.begin,
                       prev[ch.tensor].const_data_ptr<T>() + ch.begin,
                       new_[ch.tensor].const_data_ptr<T>() + ch.begin, c1, c2[ch.tensor],
                       ch.end - ch.begin);
      }
    });
  });
  return {outs, norms};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> interpolate_weights_backward_cpu(
    at::TensorList grad_out, at::TensorList new_, const at::Tensor& sigma, const at::Tensor& norms,
    double i, double eps) {
  check_list(new_, grad_out, "new", "grad_out");
  const size_t K = new_.size();
  TORCH_CHECK(i >= 1.0, "mmcl_fast: the snapshot number i must be >= 1, got ", i);
  const at::ScalarType acc = K > 0 ? new_[0].scalar_type() : sigma.scalar_type();
  const std::vector<double> sg = read_acc_vector(sigma, K, acc, "sigma");
  const std::vector<double> nr = read_acc_vector(norms, K, acc, "norms");
  std::vector<at::Tensor> grad_new(K);
  for (size_t k = 0; k < K; ++k) grad_new[k] = at::empty_like(new_[k]);
  at::Tensor grad_sigma = at::empty({static_cast<int64_t>(K)}, sigma.options().dtype(acc));
  if (K == 0) return {grad_new, grad_sigma};
  const std::vector<Chunk> chunks = make_chunks(numels_of(new_));
  const int64_t nc = static_cast<int64_t>(chunks.size());
  AT_DISPATCH_FLOATING_TYPES(acc, "interpolate_weights_backward_cpu", [&] {
    using T = scalar_t;
    std::vector<double> part(chunks.size());
    at::parallel_for(0, nc, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Chunk& ch = chunks[c];
        part[c] = chunk_dot<T>(grad_out[ch.tensor].const_data_ptr<T>() + ch.begin,
                               new_[ch.tensor].const_data_ptr<T>() + ch.begin, ch.end - ch.begin);
      }
    });
    const std::vector<double> dots = per_tensor_sums(chunks, part, K);
    std::vector<T> cc(K), kk(K);
    T* gsp = grad_sigma.data_ptr<T>();
    const T inv_i = static_cast<T>(1.0 / i);
    const T e = static_cast<T>(eps);
    for (size_t k = 0; k < K; ++k) {
      const T n = static_cast<T>(nr[k]);
      const T nn = std::max(n, e);
      const T dot = static_cast<T>(dots[k]);
      gsp[k] = inv_i * dot / nn;
      cc[k] = static_cast<T>(sg[k]) / (static_cast<T>(i) * nn);
      kk[k] = n > e ? dot / (nn * nn) : T(0);
    }
    at::parallel_for(0, nc, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Chunk& ch = chunks[c];
        chunk_proj<T>(grad_new[ch.tensor].data_ptr<T>() + ch.begin,
                      grad_out[ch.tensor].const_data_ptr<T>() + ch.begin,
                      new_[ch.tensor].const_data_ptr<T>() + ch.begin, cc[ch.tensor], kk[ch.tensor],
                      ch.end - ch.begin);
      }
    });
  });
  return {grad_new, grad_sigma};
}

// How one weight tensor applies to its parameter: absent (null), one value (kind 0), one per row
// of rs elements (kind 1), one per element (kind 2).
struct WeightForm {
  const void* w;
  int kind;
  int64_t rs;
};

std::vector<WeightForm> classify_weights(const at::TensorList params,
                                         const c10::List<std::optional<at::Tensor>>& weights) {
  const size_t K = params.size();
  TORCH_CHECK(weights.size() == K, "mmcl_fast: weights has ", weights.size(),
              " entries, params has ", K);
  std::vector<WeightForm> f(K, WeightForm{nullptr, 0, 0});
  for (size_t k = 0; k < K; ++k) {
    const std::optional<at::Tensor> w = weights.get(k);
    if (!w.has_value()) continue;
    const at::Tensor& p = params[k];
    check_cpu(*w, "weights");
    TORCH_CHECK(w->scalar_type() == p.scalar_type(), "mmcl_fast: weights[", k,
                "] must have the params' dtype");
    if (w->numel() == 1) {
      f[k] = {w->const_data_ptr(), 0, 0};
    } else if (w->dim() == 1 && p.dim() > 1 && w->numel() == p.size(0)) {
      f[k] = {w->const_data_ptr(), 1, p.size(0) > 0 ? p.numel() / p.size(0) : 0};
    } else {
      TORCH_CHECK(w->numel() == p.numel(), "mmcl_fast: weights[", k, "] of shape ", w->sizes(),
                  " is neither one value, one per row nor one per element of params[", k,
                  "] of shape ", p.sizes());
      f[k] = {w->const_data_ptr(), 2, 0};
    }
  }
  return f;
}

at::Tensor anchor_penalty_forward_cpu(at::TensorList params, at::TensorList anchors,
                                      const c10::List<std::optional<at::Tensor>>& weights) {
  check_list(params, anchors, "params", "anchors");
  const size_t K = params.size();
  const std::vector<WeightForm> wf = classify_weights(params, weights);
  const at::ScalarType acc = K > 0 ? params[0].scalar_type() : at::kFloat;
  at::Tensor sums = at::empty({static_cast<int64_t>(K)}, at::TensorOptions().dtype(acc));
  if (K == 0) return sums;
  const std::vector<Chunk> chunks = make_chunks(numels_of(params));
  const int64_t nc = static_cast<int64_t>(chunks.size());
  AT_DISPATCH_FLOATING_TYPES(acc, "anchor_penalty_forward_cpu", [&] {
    using T = scalar_t;
    const T one = T(1);
    std::vector<double> part(chunks.size());
    at::parallel_for(0, nc, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Chunk& ch = chunks[c];
        const T* p = params[ch.tensor].const_data_ptr<T>();
        const T* a = anchors[ch.tensor].const_data_ptr<T>();
        const WeightForm& f = wf[ch.tensor];
        const T* w = static_cast<const T*>(f.w);
        if (w == nullptr) {
          part[c] = chunk_wsq<T>(p + ch.begin, a + ch.begin, &one, 0, ch.end - ch.begin);
        } else if (f.kind == 0) {
          part[c] = chunk_wsq<T>(p + ch.begin, a + ch.begin, w, 0, ch.end - ch.begin);
        } else if (f.kind == 2) {
          part[c] = chunk_wsq<T>(p + ch.begin, a + ch.begin, w + ch.begin, 1, ch.end - ch.begin);
        } else {  // per row: runs of rs elements share one weight
          double s = 0.0;
          for (int64_t e = ch.begin; e < ch.end;) {
            const int64_t r = e / f.rs;
            const int64_t stop = std::min(ch.end, (r + 1) * f.rs);
            s += chunk_wsq<T>(p + e, a + e, w + r, 0, stop - e);
            e = stop;
          }
          part[c] = s;
        }
      }
    });
    const std::vector<double> tot = per_tensor_sums(chunks, part, K);
    T* sp = sums.data_ptr<T>();
    for (size_t k = 0; k < K; ++k) sp[k] = static_cast<T>(tot[k]);
  });
  return sums;
}

std::vector<at::Tensor> anchor_penalty_backward_cpu(
    const at::Tensor& grad, at::TensorList params, at::TensorList anchors,
    const c10::List<std::optional<at::Tensor>>& weights) {
  check_list(params, anchors, "params", "anchors");
  const size_t K = params.size();
  const std::vector<WeightForm> wf = classify_weights(params, weights);
  std::vector<at::Tensor> grads(K);
  if (K == 0) return grads;
  const at::ScalarType acc = params[0].scalar_type();
  const std::vector<double> gk = read_acc_vector(grad, K, acc, "grad");
  for (size_t k = 0; k < K; ++k) grads[k] = at::empty_like(params[k]);
  const std::vector<Chunk> chunks = make_chunks(numels_of(params));
  const int64_t nc = static_cast<int64_t>(chunks.size());
  AT_DISPATCH_FLOATING_TYPES(acc, "anchor_penalty_backward_cpu", [&] {
    using T = scalar_t;
    const T one = T(1);
    at::parallel_for(0, nc, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const Chunk& ch = chunks[c];
        const T* p = params[ch.tensor].const_data_ptr<T>();
        const T* a = anchors[ch.tensor].const_data_ptr<T>();
        T* o = grads[ch.tensor].data_ptr<T>();
        const T cf = T(2) * static_cast<T>(gk[ch.tensor]);
        const WeightForm& f = wf[ch.tensor];
        const T* w = static_cast<const T*>(f.w);
        const int64_t n = ch.end - ch.begin;
        if (w == nullptr) {
          chunk_wdiff<T>(o + ch.begin, p + ch.begin, a + ch.begin, &one, 0, cf, n);
        } else if (f.kind == 0) {
          chunk_wdiff<T>(o + ch.begin, p + ch.begin, a + ch.begin, w, 0, cf, n);
        } else if (f.kind == 2) {
          chunk_wdiff<T>(o + ch.begin, p + ch.begin, a + ch.begin, w + ch.begin, 1, cf, n);
        } else {
          for (int64_t e = ch.begin; e < ch.end;) {
            const int64_t r = e / f.rs;
            const int64_t stop = std::min(ch.end, (r + 1) * f.rs);
            chunk_wdiff<T>(o + e, p + e, a + e, w + r, 0, cf, stop - e);
            e = stop;
          }
        }
      }
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CPU, m) {
  m.impl("modulated_embedding_forward", &modulated_embedding_forward_cpu);
  m.impl("modulated_embedding_backward", &modulated_embedding_backward_cpu);
  m.impl("interpolate_weights_forward", &interpolate_weights_forward_cpu);
  m.impl("interpolate_weights_backward", &interpolate_weights_backward_cpu);
  m.impl("anchor_penalty_forward", &anchor_penalty_forward_cpu);
  m.impl("anchor_penalty_backward", &anchor_penalty_backward_cpu);
}

}  // namespace mmcl_fast

// Op family A on the CPU: the fused, multi-tensor, per-modality gradient-modulated AdamW and SGD
// steps. The maths is in ../modality_step.h; the noise in ../philox.h.
//
// Work is split into chunks of kChunk elements across all tensors of the call, run with
// at::parallel_for; inside a chunk, blocks of kBlock elements first build the modulated gradient
// (noise and anchor included) in a small L1-resident buffer, then apply the optimizer update in
// one branch-free loop. With noise on, a first parallel pass computes each tensor's unbiased
// gradient std from per-chunk (count, mean, M2) partials merged with Chan's formula, in double.
//
// The row-sparse step (modality_adamw_rows_) runs the same block loop (adamw_chunk) over each listed
// row of one parameter, rows split across threads; everything else in the tables is left alone.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../modality_step.h"

#include "cpu/cpu_clones.h"

namespace mmcl_fast {
namespace {

constexpr int64_t kBlock = 1024;      // elements whose noise is drawn at once (multiple of 4)
constexpr int64_t kChunk = 64 * kBlock;  // elements per parallel work item

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const at::TensorList params) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// log(x) for x > 0, branch-free so that the loop around it vectorises: x = 2^e * m with m folded
// into [sqrt(1/2), sqrt(2)) by offsetting the bits (musl's logf trick), then
// log(m) = 2 atanh(t), t = (m-1)/(m+1), by its odd series to t^9; |error| < 2e-7.
MMCL_INLINE float log_unit(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t shifted = bits - 0x3f3504f3u;  // bits of sqrt(1/2)
  const int32_t e = static_cast<int32_t>(shifted) >> 23;
  const uint32_t mbits = (shifted & 0x7fffffu) + 0x3f3504f3u;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  const float series =
      t * (2.0f + t2 * (0.666666667f + t2 * (0.4f + t2 * (0.285714286f + t2 * 0.222222222f))));
  return static_cast<float>(e) * 0.693147181f + series;
}

// sin and cos of 2*pi*u for u in (0, 1): quadrant q = round(4u), remainder r in [-pi/4, pi/4],
// Taylor polynomials to r^9 / r^8 (|error| < 3e-8), then the quadrant's swap and signs written as
// arithmetic (no selects), so that the loop around it vectorises.
MMCL_INLINE void sincos_2pi(float u, float& s, float& c) {
  const int32_t q = static_cast<int32_t>(4.0f * u + 0.5f);  // u > 0: truncation rounds
  const float r = (u - 0.25f * static_cast<float>(q)) * 6.28318531f;
  const float r2 = r * r;
  const float sr =
      r * (1.0f + r2 * (-1.6666667e-1f + r2 * (8.3333333e-3f + r2 * (-1.9841270e-4f + r2 * 2.7557319e-6f))));
  const float cr =
      1.0f + r2 * (-0.5f + r2 * (4.1666667e-2f + r2 * (-1.3888889e-3f + r2 * 2.4801587e-5f)));
  const float odd = static_cast<float>(q & 1);
  const float sin_sign = 1.0f - 2.0f * static_cast<float>((q >> 1) & 1);
  const float cos_sign = 1.0f - 2.0f * static_cast<float>(((q + 1) >> 1) & 1);
  s = sin_sign * (sr + odd * (cr - sr));
  c = cos_sign * (cr + odd * (sr - cr));
}

struct NoiseKey {
  uint32_t seed_lo, seed_hi, tensor_id, step;
};

// Standard normals for elements [begin, begin + kBlock) of one tensor; begin is a multiple of 4.
// Group i's words (x0, x1) give elements 4i (cos) and 4i+1 (sin), (x2, x3) give 4i+2 and 4i+3:
// the lane order of philox.h. Separate flat loops (Philox, Box-Muller, interleave), each of which
// the compiler vectorises; a fused loop with strided stores does not.
MMCL_INLINE void fill_normal_block(float* __restrict__ out, int64_t begin, const NoiseKey& key) {
  constexpr int64_t kGroups = kBlock / 4;
  uint32_t x[4][kGroups];
  const uint64_t g0 = static_cast<uint64_t>(begin) / 4;
  for (int64_t i = 0; i < kGroups; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
                                    key.tensor_id, key.step, key.seed_lo, key.seed_hi);
    x[0][i] = r.x[0];
    x[1][i] = r.x[1];
    x[2][i] = r.x[2];
    x[3][i] = r.x[3];
  }
  float z[4][kGroups];
  for (int64_t i = 0; i < kGroups; ++i) {
    const float rad01 = std::sqrt(-2.0f * log_unit(philox_uniform24(x[0][i])));
    const float rad23 = std::sqrt(-2.0f * log_unit(philox_uniform24(x[2][i])));
    float s01, c01, s23, c23;
    sincos_2pi(philox_uniform24(x[1][i]), s01, c01);
    sincos_2pi(philox_uniform24(x[3][i]), s23, c23);
    z[0][i] = rad01 * c01;
    z[1][i] = rad01 * s01;
    z[2][i] = rad23 * c23;
    z[3][i] = rad23 * s23;
  }
  for (int64_t i = 0; i < kGroups; ++i) {
    out[4 * i] = z[0][i];
    out[4 * i + 1] = z[1][i];
    out[4 * i + 2] = z[2][i];
    out[4 * i + 3] = z[3][i];
  }
}

// What one tensor of the call needs besides its own storage.
template <typename scalar_t>
struct TensorJob {
  scalar_t* p;
  const scalar_t* g;
  scalar_t* s0;  // AdamW: exp_avg; SGD: momentum buffer (or null)
  scalar_t* s1;  // AdamW: exp_avg_sq
  scalar_t* s2;  // AdamW: max_exp_avg_sq (or null)
  const scalar_t* anchor;  // null when the tensor has none
  const scalar_t* anchor_w;  // null: weight 1
  int64_t anchor_numel;
  int64_t anchor_w_stride;  // elements per weight entry: anchor_numel / numel(weight)
  float sigma;
  AdamWScalars adam;
  bool first_step;
  NoiseKey key;
};

// g' for elements [b0, b0 + n) of one tensor into gbuf (the modulated gradient of the header).
template <typename scalar_t, bool NOISE, bool ANCHOR>
MMCL_INLINE void modulated_grad_block(scalar_t* gbuf, const TensorJob<scalar_t>& j, int64_t b0,
                                      int64_t n, scalar_t k, double lambda2) {
  const scalar_t* g = j.g + b0;
  if (NOISE) {
    float noise[kBlock];
    fill_normal_block(noise, b0, j.key);
    const scalar_t sigma = static_cast<scalar_t>(j.sigma);
    for (int64_t i = 0; i < n; ++i) gbuf[i] = k * g[i] + sigma * static_cast<scalar_t>(noise[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) gbuf[i] = k * g[i];
  }
  if (ANCHOR && b0 < j.anchor_numel) {
    const int64_t na = std::min(n, j.anchor_numel - b0);
    const scalar_t* p = j.p + b0;
    const scalar_t* a = j.anchor + b0;
    const scalar_t l2 = static_cast<scalar_t>(lambda2);
    if (j.anchor_w == nullptr) {
      for (int64_t i = 0; i < na; ++i) gbuf[i] += l2 * (p[i] - a[i]);
    } else if (j.anchor_w_stride == 1) {
      const scalar_t* w = j.anchor_w + b0;
      for (int64_t i = 0; i < na; ++i) gbuf[i] += l2 * w[i] * (p[i] - a[i]);
    } else {
      for (int64_t i = 0; i < na; ++i)
        gbuf[i] += l2 * j.anchor_w[(b0 + i) / j.anchor_w_stride] * (p[i] - a[i]);
    }
  }
}

template <typename scalar_t, bool NOISE, bool ANCHOR, bool AMSGRAD>
MMCL_INLINE void adamw_chunk(const TensorJob<scalar_t>& j, int64_t begin, int64_t end, scalar_t k,
                             double lambda2) {
  // The update of modality_step.h, with its constants hoisted into locals: the compiler then
  // knows that the stores cannot change them and vectorises the loop without alias checks.
  using T = scalar_t;
  const T decay = T(1) - T(j.adam.lr) * T(j.adam.weight_decay);
  const T b1 = T(j.adam.beta1), b2 = T(j.adam.beta2), one_b1 = T(1) - b1, one_b2 = T(1) - b2;
  const T step_size = T(j.adam.step_size), inv_bc2 = T(1) / T(j.adam.bias_correction2_sqrt);
  const T eps = T(j.adam.eps);
  T gbuf[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t n = std::min(kBlock, end - b0);
    modulated_grad_block<scalar_t, NOISE, ANCHOR>(gbuf, j, b0, n, k, lambda2);
    T* __restrict__ p = j.p + b0;
    T* __restrict__ m = j.s0 + b0;
    T* __restrict__ v = j.s1 + b0;
    T* __restrict__ vmax = AMSGRAD ? j.s2 + b0 : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      const T g = gbuf[i];
      const T mi = m[i] + one_b1 * (g - m[i]);
      const T vi = b2 * v[i] + one_b2 * g * g;
      m[i] = mi;
      v[i] = vi;
      T vv = vi;
      if (AMSGRAD) {
        vv = vmax[i] > vi ? vmax[i] : vi;
        vmax[i] = vv;
      }
      p[i] = p[i] * decay - step_size * mi / (std::sqrt(vv) * inv_bc2 + eps);
    }
  }
}

template <typename scalar_t, bool NOISE, bool ANCHOR, bool MOMENTUM>
MMCL_INLINE void sgd_chunk(const TensorJob<scalar_t>& j, int64_t begin, int64_t end, scalar_t k,
                           double lambda2, const SGDScalars& s) {
  scalar_t gbuf[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t n = std::min(kBlock, end - b0);
    modulated_grad_block<scalar_t, NOISE, ANCHOR>(gbuf, j, b0, n, k, lambda2);
    scalar_t* __restrict__ p = j.p + b0;
    scalar_t* __restrict__ buf = MOMENTUM ? j.s0 + b0 : nullptr;
    scalar_t unused = 0;
    const bool first = j.first_step;
    for (int64_t i = 0; i < n; ++i)
      p[i] = sgd_element<MOMENTUM, scalar_t>(p[i], gbuf[i], MOMENTUM ? buf[i] : unused, first, s);
  }
}

// One entry point per dtype and optimizer, cloned per instruction set; the flags pick one of the
// fully specialised, branch-free loops inlined into it.
template <typename scalar_t>
MMCL_CPU_CLONES void adamw_chunk_dispatch(const TensorJob<scalar_t>& j, int64_t begin,
                                          int64_t end, scalar_t k, double lambda2, bool noise,
                                          bool anchor, bool amsgrad) {
#define MMCL_ADAMW_CASE(N, A, S)                                                 \
  if (noise == N && anchor == A && amsgrad == S) {                               \
    adamw_chunk<scalar_t, N, A, S>(j, begin, end, k, lambda2);                   \
    return;                                                                      \
  }
  MMCL_ADAMW_CASE(false, false, false)
  MMCL_ADAMW_CASE(false, false, true)
  MMCL_ADAMW_CASE(false, true, false)
  MMCL_ADAMW_CASE(false, true, true)
  MMCL_ADAMW_CASE(true, false, false)
  MMCL_ADAMW_CASE(true, false, true)
  MMCL_ADAMW_CASE(true, true, false)
  MMCL_ADAMW_CASE(true, true, true)
#undef MMCL_ADAMW_CASE
}

template <typename scalar_t>
MMCL_CPU_CLONES void sgd_chunk_dispatch(const TensorJob<scalar_t>& j, int64_t begin, int64_t end,
                                        scalar_t k, double lambda2, const SGDScalars& s, bool noise,
                                        bool anchor, bool momentum) {
#define MMCL_SGD_CASE(N, A, M)                                                   \
  if (noise == N && anchor == A && momentum == M) {                              \
    sgd_chunk<scalar_t, N, A, M>(j, begin, end, k, lambda2, s);                  \
    return;                                                                      \
  }
  MMCL_SGD_CASE(false, false, false)
  MMCL_SGD_CASE(false, false, true)
  MMCL_SGD_CASE(false, true, false)
  MMCL_SGD_CASE(false, true, true)
  MMCL_SGD_CASE(true, false, false)
  MMCL_SGD_CASE(true, false, true)
  MMCL_SGD_CASE(true, true, false)
  MMCL_SGD_CASE(true, true, true)
#undef MMCL_SGD_CASE
}

// The row-sparse step: rows[lo, hi) of one parameter, each row through adamw_chunk (no noise,
// no amsgrad).
template <typename scalar_t>
struct RowsJob {
  scalar_t* p;
  scalar_t* m;
  scalar_t* v;
  const scalar_t* g;  // [U, R]: row i is the gradient of row rows[i]
  const int64_t* rows;
  const scalar_t* anchor;    // first anchor_rows rows, or null
  const scalar_t* anchor_w;  // see RowsWeight; null: weight 1
  RowsGeometry geo;
  AdamWScalars adam;
};

template <typename scalar_t, bool ANCHOR>
MMCL_INLINE void adamw_rows(const RowsJob<scalar_t>& rj, int64_t lo, int64_t hi, scalar_t k,
                            double lambda2) {
  const int64_t R = rj.geo.row_size;
  TensorJob<scalar_t> j{};
  j.adam = rj.adam;
  j.anchor_w_stride = 1;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t r = rj.rows[i];
    const int64_t off = r * R;
    j.p = rj.p + off;
    j.g = rj.g + i * R;
    j.s0 = rj.m + off;
    j.s1 = rj.v + off;
    if (ANCHOR && r < rj.geo.anchor_rows) {
      j.anchor = rj.anchor + off;
      j.anchor_numel = R;
      double l2 = lambda2;
      // a weight constant along the row scales lambda, so that the loop stays the unweighted one
      const int kind = rj.geo.weight_kind;
      j.anchor_w = kind == kElementWeight ? rj.anchor_w + off : nullptr;
      if (kind == kScalarWeight) l2 *= static_cast<double>(rj.anchor_w[0]);
      if (kind == kRowWeight) l2 *= static_cast<double>(rj.anchor_w[r]);
      adamw_chunk<scalar_t, false, true, false>(j, 0, R, k, l2);
    } else {
      adamw_chunk<scalar_t, false, false, false>(j, 0, R, k, lambda2);
    }
  }
}

template <typename scalar_t>
MMCL_CPU_CLONES void adamw_rows_dispatch(const RowsJob<scalar_t>& rj, int64_t lo, int64_t hi,
                                         scalar_t k, double lambda2) {
  if (rj.anchor != nullptr)
    adamw_rows<scalar_t, true>(rj, lo, hi, k, lambda2);
  else
    adamw_rows<scalar_t, false>(rj, lo, hi, k, lambda2);
}

// Mean and M2 (sum of squared deviations) of g[begin, end), cloned per instruction set.
template <typename scalar_t>
MMCL_CPU_CLONES void chunk_moments(const scalar_t* g, int64_t begin, int64_t end, double& mean,
                                   double& m2) {
  // one pass of shifted sums (shift = the chunk's first value, so a large mean costs no
  // precision), in double, over 8 independent lanes so that the compiler may vectorise
  // without reassociating a single sum
  const double shift = static_cast<double>(g[begin]);
  double l1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, l2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const double d = static_cast<double>(g[i + j]) - shift;
      l1[j] += d;
      l2[j] += d * d;
    }
  }
  double s1 = 0.0, s2 = 0.0;
  for (; i < end; ++i) {
    const double d = static_cast<double>(g[i]) - shift;
    s1 += d;
    s2 += d * d;
  }
  for (int j = 0; j < 8; ++j) {
    s1 += l1[j];
    s2 += l2[j];
  }
  const double n = static_cast<double>(end - begin);
  mean = shift + s1 / n;
  m2 = std::max(0.0, s2 - s1 * s1 / n);
}

// Unbiased std of each gradient (0 for fewer than two elements), from per-chunk partials.
template <typename scalar_t>
std::vector<float> gradient_sigmas(const at::TensorList grads, const std::vector<Chunk>& chunks) {
  struct Partial {
    double n, mean, m2;
  };
  std::vector<Partial> part(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const scalar_t* g = grads[ch.tensor].const_data_ptr<scalar_t>();
      double mean, m2;
      chunk_moments<scalar_t>(g, ch.begin, ch.end, mean, m2);
      const double n = static_cast<double>(ch.end - ch.begin);
      part[c] = {n, mean, m2};
    }
  });
  std::vector<Partial> total(grads.size(), Partial{0.0, 0.0, 0.0});
  for (size_t c = 0; c < chunks.size(); ++c) {
    Partial& a = total[chunks[c].tensor];
    const Partial& b = part[c];
    const double n = a.n + b.n;
    const double delta = b.mean - a.mean;
    a.m2 += b.m2 + delta * delta * a.n * b.n / n;
    a.mean += delta * b.n / n;
    a.n = n;
  }
  std::vector<float> sigma(grads.size(), 0.0f);
  for (size_t t = 0; t < grads.size(); ++t)
    if (total[t].n > 1.0) sigma[t] = static_cast<float>(std::sqrt(total[t].m2 / (total[t].n - 1.0)));
  return sigma;
}

float read_coefficient(const at::Tensor& coefficients, int64_t modality) {
  if (modality < 0) return 1.0f;
  TORCH_CHECK(modality < coefficients.numel(), "mmcl_fast: modality index ", modality,
              " out of range for ", coefficients.numel(), " coefficients");
  TORCH_CHECK(coefficients.scalar_type() == at::kFloat, "mmcl_fast: coefficients must be float32");
  return coefficients.contiguous().const_data_ptr<float>()[modality];
}

void check_list(const at::TensorList ref, const at::TensorList other, const char* name) {
  TORCH_CHECK(other.size() == ref.size(), "mmcl_fast: ", name, " has ", other.size(),
              " tensors, params has ", ref.size());
  for (size_t t = 0; t < ref.size(); ++t) {
    TORCH_CHECK(other[t].sizes() == ref[t].sizes(), "mmcl_fast: ", name, "[", t,
                "] has the wrong shape");
    TORCH_CHECK(other[t].scalar_type() == ref[t].scalar_type(), "mmcl_fast: ", name, "[", t,
                "] has the wrong dtype");
    TORCH_CHECK(other[t].is_contiguous(), "mmcl_fast: ", name, "[", t, "] must be contiguous");
    TORCH_CHECK(other[t].device().is_cpu(), "mmcl_fast: ", name, "[", t, "] must be on the CPU");
  }
}

template <typename scalar_t>
void fill_anchor(TensorJob<scalar_t>& j, const at::Tensor& p,
                 const c10::List<std::optional<at::Tensor>>& anchors,
                 const c10::List<std::optional<at::Tensor>>& weights, size_t t) {
  j.anchor = nullptr;
  j.anchor_w = nullptr;
  j.anchor_numel = 0;
  j.anchor_w_stride = 1;
  if (anchors.size() == 0) return;
  const std::optional<at::Tensor> a = anchors.get(t);
  if (!a.has_value()) return;
  TORCH_CHECK(a->scalar_type() == p.scalar_type() && a->is_contiguous() && a->device().is_cpu() &&
                  a->numel() <= p.numel(),
              "mmcl_fast: anchors[", t, "] must be a contiguous CPU tensor of the parameter's "
              "dtype covering at most its elements");
  j.anchor = a->const_data_ptr<scalar_t>();
  j.anchor_numel = a->numel();
  if (weights.size() == 0) return;
  const std::optional<at::Tensor> w = weights.get(t);
  if (!w.has_value()) return;
  TORCH_CHECK(w->scalar_type() == p.scalar_type() && w->is_contiguous() && w->device().is_cpu() &&
                  w->numel() > 0 && j.anchor_numel % w->numel() == 0,
              "mmcl_fast: anchor_weights[", t, "] must hold 1, one per anchor row, or one per "
              "anchor element values");
  j.anchor_w = w->const_data_ptr<scalar_t>();
  j.anchor_w_stride = j.anchor_numel / w->numel();
}

struct NoiseArgs {
  bool on;
  int64_t seed, step;
  at::IntArrayRef tensor_ids;
};

template <typename scalar_t>
std::vector<TensorJob<scalar_t>> make_jobs(const at::TensorList params, const at::TensorList grads,
                                           const std::vector<Chunk>& chunks, const NoiseArgs& noise,
                                           const c10::List<std::optional<at::Tensor>>& anchors,
                                           const c10::List<std::optional<at::Tensor>>& weights) {
  TORCH_CHECK(!noise.on || noise.tensor_ids.size() == params.size(),
              "mmcl_fast: tensor_ids must have one id per parameter");
  TORCH_CHECK(anchors.size() == 0 || anchors.size() == params.size(),
              "mmcl_fast: anchors must be empty or have one entry per parameter");
  TORCH_CHECK(weights.size() == 0 || weights.size() == params.size(),
              "mmcl_fast: anchor_weights must be empty or have one entry per parameter");
  std::vector<float> sigma =
      noise.on ? gradient_sigmas<scalar_t>(grads, chunks) : std::vector<float>(params.size(), 0.f);
  std::vector<TensorJob<scalar_t>> jobs(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    TensorJob<scalar_t>& j = jobs[t];
    j.p = params[t].data_ptr<scalar_t>();
    j.g = grads[t].const_data_ptr<scalar_t>();
    j.s0 = j.s1 = j.s2 = nullptr;
    j.sigma = sigma[t];
    j.first_step = false;
    const uint64_t seed = static_cast<uint64_t>(noise.seed);
    j.key = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
             noise.on ? static_cast<uint32_t>(noise.tensor_ids[t]) : 0u,
             static_cast<uint32_t>(noise.step)};
    fill_anchor(j, params[t], anchors, weights, t);
  }
  return jobs;
}

void check_params(const at::TensorList params) {
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].device().is_cpu(), "mmcl_fast: params[", t, "] must be on the CPU");
    TORCH_CHECK(params[t].is_contiguous(), "mmcl_fast: params[", t, "] must be contiguous");
    TORCH_CHECK(params[t].scalar_type() == params[0].scalar_type(),
                "mmcl_fast: params must share one dtype");
  }
}

void modality_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
  const float k = read_coefficient(coefficients, modality);
  const std::vector<Chunk> chunks = make_chunks(params);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "modality_adamw_cpu", [&] {
    auto jobs = make_jobs<scalar_t>(params, grads, chunks, {noise_on, seed, noise_step, tensor_ids},
                                    anchors, anchor_weights);
    for (size_t t = 0; t < params.size(); ++t) {
      TensorJob<scalar_t>& j = jobs[t];
      j.s0 = exp_avgs[t].data_ptr<scalar_t>();
      j.s1 = exp_avg_sqs[t].data_ptr<scalar_t>();
      j.s2 = amsgrad ? max_exp_avg_sqs[t].data_ptr<scalar_t>() : nullptr;
      const double bc1 = 1.0 - std::pow(beta1, steps[t]);
      const double bc2 = 1.0 - std::pow(beta2, steps[t]);
      j.adam = {lr, beta1, beta2, eps, weight_decay, lr / bc1, std::sqrt(bc2)};
    }
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const TensorJob<scalar_t>& j = jobs[chunks[c].tensor];
        adamw_chunk_dispatch<scalar_t>(j, chunks[c].begin, chunks[c].end,
                                       static_cast<scalar_t>(k),
                                       2.0 * anchor_lambda, noise_on,
                                       any_anchor && j.anchor != nullptr, amsgrad);
      }
    });
  });
}

void modality_sgd_cpu(at::TensorList params, at::TensorList grads,
                      at::TensorList momentum_buffers, at::IntArrayRef first_step,
                      const at::Tensor& coefficients, int64_t modality, double lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool noise,
                      int64_t seed, int64_t noise_step, at::IntArrayRef tensor_ids,
                      const c10::List<std::optional<at::Tensor>>& anchors,
                      const c10::List<std::optional<at::Tensor>>& anchor_weights,
                      double anchor_lambda) {
  if (params.empty()) return;
  check_params(params);
  check_list(params, grads, "grads");
  const bool use_momentum = !momentum_buffers.empty();
  if (use_momentum) {
    check_list(params, momentum_buffers, "momentum_buffers");
    TORCH_CHECK(first_step.size() == params.size(),
                "mmcl_fast: first_step must have one entry per parameter");
  }
  const bool noise_on = noise && modality >= 0;
  const bool any_anchor = anchors.size() > 0 && anchor_lambda != 0.0;
  const float k = read_coefficient(coefficients, modality);
  const std::vector<Chunk> chunks = make_chunks(params);
  const SGDScalars s{lr, momentum, dampening, weight_decay, nesterov};
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "modality_sgd_cpu", [&] {
    auto jobs = make_jobs<scalar_t>(params, grads, chunks, {noise_on, seed, noise_step, tensor_ids},
                                    anchors, anchor_weights);
    for (size_t t = 0; t < params.size(); ++t) {
      jobs[t].s0 = use_momentum ? momentum_buffers[t].data_ptr<scalar_t>() : nullptr;
      jobs[t].first_step = use_momentum && first_step[t] != 0;
    }
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const TensorJob<scalar_t>& j = jobs[chunks[c].tensor];
        sgd_chunk_dispatch<scalar_t>(j, chunks[c].begin, chunks[c].end, static_cast<scalar_t>(k),
                                     2.0 * anchor_lambda, s, noise_on,
                                     any_anchor && j.anchor != nullptr, use_momentum);
      }
    });
  });
}

void modality_adamw_rows_cpu(const at::Tensor& param, const at::Tensor& rows,
                             const at::Tensor& grad_rows, const at::Tensor& exp_avg,
                             const at::Tensor& exp_avg_sq, double step,
                             const at::Tensor& coefficients, int64_t modality, double lr,
                             double beta1, double beta2, double eps, double weight_decay,
                             const std::optional<at::Tensor>& anchor,
                             const std::optional<at::Tensor>& anchor_weight,
                             double anchor_lambda) {
  TORCH_CHECK(param.device().is_cpu(), "mmcl_fast: param must be on the CPU");
  const RowsGeometry geo = check_rows_args(param, rows, grad_rows, exp_avg, exp_avg_sq, step,
                                           anchor, anchor_weight, anchor_lambda);
  const float k = read_coefficient(coefficients, modality);
  if (geo.num_rows == 0 || geo.row_size == 0) return;
  // the whole range first, so that a bad id leaves every row untouched
  const int64_t* ids = rows.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < geo.num_rows; ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < geo.table_rows, "mmcl_fast: rows[", i, "] = ", ids[i],
                " is out of range for a parameter of ", geo.table_rows, " rows");
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  const AdamWScalars adam{lr, beta1, beta2, eps, weight_decay, lr / bc1, std::sqrt(bc2)};
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "modality_adamw_rows_cpu", [&] {
    RowsJob<scalar_t> rj;
    rj.p = param.data_ptr<scalar_t>();
    rj.m = exp_avg.data_ptr<scalar_t>();
    rj.v = exp_avg_sq.data_ptr<scalar_t>();
    rj.g = grad_rows.const_data_ptr<scalar_t>();
    rj.rows = ids;
    rj.anchor = geo.anchor_rows > 0 ? anchor->const_data_ptr<scalar_t>() : nullptr;
    rj.anchor_w = geo.weight_kind != kNoWeight ? anchor_weight->const_data_ptr<scalar_t>() : nullptr;
    rj.geo = geo;
    rj.adam = adam;
    // about kChunk elements per work item, as the dense step
    const int64_t grain = std::max<int64_t>(1, kChunk / geo.row_size);
    at::parallel_for(0, geo.num_rows, grain, [&](int64_t lo, int64_t hi) {
      adamw_rows_dispatch<scalar_t>(rj, lo, hi, static_cast<scalar_t>(k), 2.0 * anchor_lambda);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmcl_fast, CPU, m) {
  m.impl("modality_adamw_", &modality_adamw_cpu);
  m.impl("modality_sgd_", &modality_sgd_cpu);
  m.impl("modality_adamw_rows_", &modality_adamw_rows_cpu);
}

}  // namespace mmcl_fast

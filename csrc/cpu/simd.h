// 256-bit vectors for the CPU kernels, as GCC vector extensions: the x86-64-v3 clone compiles them
// to AVX2 registers, the generic clone to pairs of SSE registers (plain loops over a register
// block were vectorised badly by GCC 12: along k, with shuffles). may_alias and element alignment
// make the loads and stores below plain unaligned moves. Horizontal reductions go lane by lane in
// a fixed order, so results are reproducible.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/cpu_clones.h"

namespace mmcl_fast {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float v __attribute__((vector_size(32), __may_alias__, aligned(4)));
  typedef int32_t vi __attribute__((vector_size(32), __may_alias__, aligned(4)));
};
template <>
struct Vec<double> {
  typedef double v __attribute__((vector_size(32), __may_alias__, aligned(8)));
  typedef int64_t vi __attribute__((vector_size(32), __may_alias__, aligned(8)));
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
template <typename T>
MMCL_INLINE vec_t<T> vsqrt(vec_t<T> x) {
  vec_t<T> r;
  for (int64_t l = 0; l < kW<T>; ++l) r[l] = std::sqrt(x[l]);
  return r;
}
template <typename T>
MMCL_INLINE T hsum(vec_t<T> x) {
  T r = x[0];
  for (int64_t l = 1; l < kW<T>; ++l) r += x[l];
  return r;
}
template <typename T>
MMCL_INLINE T hmax(vec_t<T> x) {
  T r = x[0];
  for (int64_t l = 1; l < kW<T>; ++l) r = x[l] > r ? x[l] : r;
  return r;
}

}  // namespace mmcl_fast

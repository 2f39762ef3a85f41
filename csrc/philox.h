// Counter-based Gaussian noise shared by the CPU and CUDA kernels.
//
// Philox4x32-10 (Salmon et al., SC'11; the Random123 constants), keyed by the user's 64-bit seed
// and counted by (element group, tensor id, step):
//     key     = (seed_lo, seed_hi)
//     counter = (g_lo, g_hi, tensor_id, step),   g = element_offset / 4
// One call yields four uint32 words x0..x3 for the four elements 4g .. 4g+3. Each pair goes through
// Box-Muller with 24-bit uniforms u = ((x >> 8) + 0.5) / 2^24 in (0, 1):
//     r = sqrt(-2 ln u_a),  z_a = r cos(2 pi u_b),  z_b = r sin(2 pi u_b)
// so lanes (0, 1) come from (x0, x1) and lanes (2, 3) from (x2, x3). The same words are produced by
// the PyTorch reference (mmcl_fast/ops/modality_step.py) and Triton's tl.philox, so all backends
// draw the same noise up to the rounding of log / sin / cos. No state: the noise of a (seed, step,
// tensor) triple is the same on every rank and every re-run.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MMCL_HD __host__ __device__ __forceinline__
#else
#define MMCL_HD inline
#endif

namespace mmcl_fast {

struct Philox4 {
  uint32_t x[4];
};

MMCL_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

MMCL_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                              uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Philox4 out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// 24-bit uniform strictly inside (0, 1): exact in float32, so every backend sees the same value.
MMCL_HD float philox_uniform24(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace mmcl_fast

// Dtype dispatch shared by the CUDA kernels of families B and C: float32, float16 and bfloat16
// (fp32 accumulation). float64 is the C++ CPU kernels' business: on a GPU it would need float64
// statistics (lse, column sums, gates) and gives no speed.
#pragma once
#include <ATen/Dispatch.h>

#define MMCL_DISPATCH_FHB(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

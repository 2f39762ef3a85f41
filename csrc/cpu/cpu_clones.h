// What the CPU kernels share about code generation: function multi-versioning and inlining.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// Built once for x86-64-v3 (AVX2, FMA) and once generic; the loader picks the clone the CPU can
// run. (Not "arch=haswell": that clone is chosen by CPU model, so AMD CPUs would never get it.)
#define MMCL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define MMCL_INLINE inline __attribute__((always_inline))
#define MMCL_NOINLINE __attribute__((noinline))
// Every function that takes or returns a 256-bit vector is always inlined, so the note that such
// arguments are passed differently with and without AVX concerns no real call.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define MMCL_CPU_CLONES
#define MMCL_INLINE inline
#define MMCL_NOINLINE
#endif

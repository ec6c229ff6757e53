// Hot loops are compiled twice, for AVX2 and for the baseline ISA, and picked at load time.
// Floating-point contraction is off in the whole build, so both clones round identically.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(PPML_NO_CLONES)
#define PPML_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PPML_TARGET_CLONES
#endif

// Bodies called from a cloned function must be inlined into it to get the clone's ISA.
#if defined(__GNUC__)
#define PPML_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PPML_ALWAYS_INLINE inline
#endif

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

#include <cstdlib>

namespace ppml::cpu {

// Whether the CPU running this has AVX2, for kernels that choose their AVX2 path explicitly
// (the noise and the secure-aggregation masks; each keeps its own switch for the tests).
inline bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// The initial state of such a switch: on where the CPU has AVX2, unless PPML_FAST_DISABLE_AVX2
// is set in the environment.
inline bool avx2_on_by_default() { return cpu_has_avx2() && !std::getenv("PPML_FAST_DISABLE_AVX2"); }

}  // namespace ppml::cpu

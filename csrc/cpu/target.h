// Run-time choice between an AVX2 and a portable build of a hot loop.
//
// A kernel with an AVX2 path compiles it as explicit functions marked PPML_TARGET_AVX2, next to
// portable functions built for the baseline ISA, and picks one set per call by a switch that
// starts as avx2_on_by_default() (each kernel keeps its own switch, flipped by the tests).
// No target_clones: GNU IFUNC resolvers run while the shared object is being relocated, and
// clones of functions from a header under LTO and -fvisibility=hidden were the main suspect of
// a crash of the clipping kernel on a g++ 13 / AVX-512 host (bench/RESULTS.md, Vectorisation).
// The library must contain no IFUNC symbol (tests/ops/test_clip_simd.py checks the .so).
// Floating-point contraction is off in the whole build, and neither "avx2" nor "avx2,f16c"
// enables FMA, so both builds of a loop round identically.
#pragma once

#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__)
#define PPML_HAVE_AVX2_TARGET 1
#define PPML_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define PPML_HAVE_AVX2_TARGET 0
#define PPML_TARGET_AVX2
#endif

// Bodies shared by both builds: always inlined into the function that carries the target, so
// that they are compiled for its ISA (a function's own target decides its code, never the
// caller's), and no out-of-line copy with one ISA is shared between the two.
#if defined(__GNUC__)
#define PPML_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PPML_ALWAYS_INLINE inline
#endif

namespace ppml::cpu {

// Whether the CPU running this has AVX2 (libgcc's CPU model, filled in by its constructor when
// the library is loaded; called from ordinary code, after relocation, never from a resolver).
inline bool cpu_has_avx2() {
#if PPML_HAVE_AVX2_TARGET
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// The initial state of a kernel's switch: on where the CPU has AVX2, unless
// PPML_FAST_DISABLE_AVX2 is set in the environment.
inline bool avx2_on_by_default() { return cpu_has_avx2() && !std::getenv("PPML_FAST_DISABLE_AVX2"); }

// Whether the CPU has AVX2 and F16C (the float16 <-> float conversions, a CPUID bit of its own;
// every AVX2 CPU shipped has it, but a hypervisor may mask it). The float16 loops compiled for
// "avx2,f16c" (f16c.h) run only where this holds; elsewhere the AVX2 build without F16C does.
inline bool cpu_has_f16c() {
#if PPML_HAVE_AVX2_TARGET
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The initial state of a kernel's F16C switch (used only while its AVX2 switch is on): on where
// the CPU has AVX2 and F16C, unless PPML_FAST_DISABLE_F16C is set in the environment.
inline bool f16c_on_by_default() { return cpu_has_f16c() && !std::getenv("PPML_FAST_DISABLE_F16C"); }

}  // namespace ppml::cpu

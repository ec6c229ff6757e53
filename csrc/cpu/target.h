// Run-time choice between the AVX-512, AVX2 and portable builds of a hot loop.
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

// AVX-512 builds (F, BW, DQ, VL: Skylake-SP and later Xeons, Zen 4 and later EPYCs). Neither
// these nor "avx2" enable FMA, and contraction is off in the whole build: the AVX-512 build of a
// loop performs the same IEEE operations in the same order as the others, so the same bits.
// Only functions that carry this attribute (or are always_inline into one) hold AVX-512
// instructions, and they run only after isa() (isa.cpp, plain code) said the CPU has them.
#if PPML_HAVE_AVX2_TARGET && (defined(__clang__) || __GNUC__ >= 9)
#define PPML_HAVE_AVX512_TARGET 1
#define PPML_AVX512_ISA "avx512f,avx512bw,avx512dq,avx512vl"
#define PPML_TARGET_AVX512 __attribute__((target(PPML_AVX512_ISA)))
#else
#define PPML_HAVE_AVX512_TARGET 0
#define PPML_TARGET_AVX512
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

// The instruction sets the kernels choose from, in order.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Whether the CPU (and the OS: libgcc checks XCR0 for the ZMM state) has AVX-512 F, BW, DQ
// and VL.
inline bool cpu_has_avx512() {
#if PPML_HAVE_AVX512_TARGET
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// The best instruction set of this CPU that the library has builds for.
inline Isa cpu_isa() {
  if (cpu_has_avx512()) return Isa::kAvx512;
  if (cpu_has_avx2()) return Isa::kAvx2;
  return Isa::kPortable;
}

// The highest instruction set the kernels may use (isa.cpp): the CPU's, lowered by
// PPML_FAST_CPU_ISA=portable|avx2|avx512|auto (read once; a set above the CPU's means the
// CPU's) and by set_isa_limit (ops-level switch and test hook). Each kernel also keeps its own
// AVX2 switch (set_*_simd, initially on unless PPML_FAST_DISABLE_AVX2 is set); a kernel uses
// its AVX-512 build when its switch is on and isa_limit() is kAvx512, its AVX2 build when its
// switch is on and isa_limit() is kAvx2, else its portable build.
Isa isa_limit();
// Sets the limit to min(isa, cpu_isa()); returns the previous limit.
Isa set_isa_limit(Isa isa);
// The clipping kernel's AVX-512 row loops (on by default, PPML_FAST_CLIP_AVX512=0 turns them
// off; they run only where isa_limit() is kAvx512); returns the previous setting.
bool set_clip_avx512(bool enabled);
// Parses a PPML_FAST_CPU_ISA value ("portable" or "scalar", "avx2", "avx512", "auto" or
// empty); false for anything else.
bool parse_isa(const char* text, Isa* isa, bool* automatic);
// A message when PPML_FAST_CPU_ISA holds something parse_isa rejects (then it was ignored),
// else an empty string; the bindings turn it into a warning at import.
const char* isa_env_problem();
const char* isa_name(Isa isa);

// The initial state of a kernel's switch: on where the CPU has AVX2, unless
// PPML_FAST_DISABLE_AVX2 is set in the environment.
inline bool avx2_on_by_default() { return cpu_has_avx2() && !std::getenv("PPML_FAST_DISABLE_AVX2"); }

// Whether a kernel whose AVX2 switch is `simd` may run its AVX-512 build now (the clipping
// kernel's row loops also need their own switch, set_clip_avx512: see clip_accumulate.cpp).
inline bool use_avx512(bool simd) { return simd && isa_limit() == Isa::kAvx512; }
// Whether a kernel whose AVX2 switch is `simd` runs its AVX2 (or AVX-512) build now.
inline bool use_avx2(bool simd) { return simd && isa_limit() >= Isa::kAvx2; }

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

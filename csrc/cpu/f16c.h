// Vector conversions between float16 / bfloat16 storage and float for the AVX2 paths of the CPU
// kernels (row_loops.h: clipping / aggregation of float16; noise_avx2.h: 16-bit noise updates),
// each giving exactly what the portable integer conversions of include/ppml/common.h give.
//
// float16 -> float, F16C's vcvtph2ps: exact for every half (subnormals become normal floats, also
// with MXCSR.DAZ set), infinities kept; the one difference from half_to_float is that it quiets
// a signalling NaN (sets the quiet bit, payload kept). Every use in the kernels is an arithmetic
// operation or a float -> double conversion, which quiets the NaN anyway and keeps its payload,
// so their results are the same bits (and for two NaN operands x86 returns the first source
// operand, quieted, whichever it was: quieting one earlier does not change which one).
// float -> float16, vcvtps2ph with the rounding given in the instruction (round to nearest even,
// not MXCSR's): the same as float_to_half for every non-NaN float (overflow to infinity,
// subnormal results, also with MXCSR.FTZ|DAZ: a denormal float rounds to a signed zero either
// way); a NaN keeps its truncated payload there, while float_to_half returns sign | 0x7e00, so
// to_half8 writes that for NaN lanes.
// float -> bfloat16: float_to_bf16's integer rounding, lane by lane.
// Checked for all 2^16 half patterns and all 2^32 float patterns, with the default MXCSR and
// with FTZ|DAZ, by tests/ops/f16c_exhaustive.cpp (tests/ops/test_f16c.py builds and runs it).
//
// F16C is a separate CPUID bit: a function using the float16 conversions is compiled for
// "avx2,f16c" (PPML_TARGET_AVX2_F16C) and is called only where cpu_has_f16c() (target.h).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>

#include "../include/ppml/common.h"

#define PPML_HAVE_F16C_TARGET 1
#define PPML_TARGET_AVX2_F16C __attribute__((target("avx2,f16c")))
#define PPML_F16C_INLINE inline __attribute__((target("avx2,f16c"), always_inline))
#define PPML_AVX2_ONLY_INLINE inline __attribute__((target("avx2"), always_inline))

namespace ppml::cpu::f16c {

// 8 float16 at p -> 8 floats (unaligned)
PPML_F16C_INLINE __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 8 floats -> 8 float16 bit patterns, as float_to_half: round to nearest even (the
// instruction's own rounding control, not MXCSR), NaN -> sign | 0x7e00.
PPML_F16C_INLINE __m128i to_half8(__m256 f) {
  const __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  const __m128i nan16 =
      _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
  const __m128i quiet = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))),
                                     _mm_set1_epi16(0x7e00));
  return _mm_blendv_epi8(h, quiet, nan16);
}

// 8 bfloat16 at p -> 8 floats (exact: the bits shifted up)
PPML_AVX2_ONLY_INLINE __m256 bf16_load8(const BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// 8 floats -> 8 bfloat16 bit patterns, as float_to_bf16: NaN -> (bits >> 16) | 0x40, else
// (bits + 0x7fff + ((bits >> 16) & 1)) >> 16 (no 32-bit overflow: the largest non-NaN pattern
// is 0xff800000).
PPML_AVX2_ONLY_INLINE __m128i to_bf16_8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  // |f|'s pattern > 0x7f800000 (both sides < 2^31: the signed compare is the unsigned one)
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i rounding =
      _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, rounding), 16);
  const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);  // each lane <= 0xffff
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

}  // namespace ppml::cpu::f16c

#else
#define PPML_HAVE_F16C_TARGET 0
#endif

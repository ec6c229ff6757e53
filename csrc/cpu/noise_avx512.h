// AVX-512 version of the reproducible noise stream for the CPU kernel: noise_avx2.h's Philox4x32-10
// and Box-Muller on eight blocks per vector (zmm registers of 8 doubles) instead of four.
//
// Bit-identical to the AVX2 and portable paths for the same reasons as noise_avx2.h (read its
// header first): the same integer maths for the words, and the same IEEE operations (+, -, *,
// /, sqrt, double<->float conversion) on the same operands in the same order, one lane per
// block. What changes is only how a lane is selected: AVX2's blendv (on a sign bit) becomes a
// mask register (a compare's mask, or a test of bit 0 of the quarter-turn count) and
// mask_blend, which keeps the same operand. No FMA: compiled for PPML_AVX512_ISA only (F, BW, DQ,
// VL; none of them enables FMA) in a build with -ffp-contract=off. tests/ops/test_isa_dispatch.py
// compares this path with the AVX2 and the portable ones, bit for bit.
//
// Layout: one block per 64-bit lane, lanes holding blocks 0, 4, 1, 5, 2, 6, 3, 7 of eight, so that
// the in-lane unpacks of normals() put the sixteen samples in element order (unpacklo takes the
// even lanes, blocks 0-3; unpackhi the odd ones, blocks 4-7).
//
// Only float32 and float64 tensors take this path; 16-bit storage keeps the AVX2 + F16C update
// (the samples are the same numbers either way), and so do the ranges' partial groups.
#pragma once

#include "noise_avx2.h"
#include "target.h"

#if defined(PPML_HAVE_NOISE_AVX2) && PPML_HAVE_AVX512_TARGET
#include <immintrin.h>

#include <cstdint>

#include "../include/ppml/gaussian.h"  // kTwo52, kRoundMagic
#include "../include/ppml/philox.h"

#define PPML_HAVE_NOISE_AVX512 1
#define PPML_AVX512_INLINE inline __attribute__((target(PPML_AVX512_ISA), always_inline))

namespace ppml::cpu::avx512 {

// The 2 x 10 round keys of one seed, as 64-bit lanes.
struct PhiloxKeys {
  __m512i k0[10];
  __m512i k1[10];
};

__attribute__((target(PPML_AVX512_ISA))) inline void philox_keys(uint64_t seed,
                                                                PhiloxKeys* keys) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    keys->k0[r] = _mm512_set1_epi64(k0);
    keys->k1[r] = _mm512_set1_epi64(k1);
    k0 += Philox4x32::kW0;
    k1 += Philox4x32::kW1;
  }
}

// Independent groups of eight blocks computed together (see noise_avx2.h's kN). 5 groups hold
// 30 of the 32 zmm registers in the Philox rounds. Measured on one Zen 4 core (AMD EPYC, 2 vCPUs
// shared with other jobs; 2026-12-07): see bench/RESULTS.md.
#ifndef PPML_NOISE_AVX512_GROUPS
#define PPML_NOISE_AVX512_GROUPS 5
#endif
constexpr int kN = PPML_NOISE_AVX512_GROUPS;
#define PPML_FOR_N for (int i = 0; i < kN; ++i)

PPML_AVX512_INLINE __m512d bits_pd(__m512i v) { return _mm512_castsi512_pd(v); }
PPML_AVX512_INLINE __m512i pd_bits(__m512d v) { return _mm512_castpd_si512(v); }
PPML_AVX512_INLINE __m512d cst(double v) { return _mm512_set1_pd(v); }
PPML_AVX512_INLINE __m512i cst64(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
PPML_AVX512_INLINE __m512d add(__m512d a, __m512d b) { return _mm512_add_pd(a, b); }
PPML_AVX512_INLINE __m512d sub(__m512d a, __m512d b) { return _mm512_sub_pd(a, b); }
PPML_AVX512_INLINE __m512d mul(__m512d a, __m512d b) { return _mm512_mul_pd(a, b); }

// Words w0, w1, w2 of Philox blocks index[i] + 0, 4, 1, 5, 2, 6, 3, 7 in lanes 0..7, each in the
// low half of a 64-bit lane with a zero high half (noise_avx2.h's philox, eight lanes).
PPML_AVX512_INLINE void philox(const PhiloxKeys& keys, const uint64_t index[kN], __m512i w0[kN],
                               __m512i w1[kN], __m512i w2[kN]) {
  const __m512i m0 = cst64(Philox4x32::kM0);
  const __m512i m1 = cst64(Philox4x32::kM1);
  __m512i c0[kN], c1[kN], c2[kN], c3[kN], p0[kN], p1[kN];
  PPML_FOR_N {
    const __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(index[i])),
                                         _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0));
    p0[i] = _mm512_mul_epu32(idx, m0);
    c0[i] = _mm512_xor_si512(_mm512_srli_epi64(idx, 32), keys.k0[0]);
    c1[i] = _mm512_setzero_si512();
    c2[i] = _mm512_xor_si512(_mm512_srli_epi64(p0[i], 32), keys.k1[0]);
    c3[i] = p0[i];
  }
PPML_UNROLL
  for (int r = 1; r < 10; ++r) {
    PPML_FOR_N {
      p0[i] = _mm512_mul_epu32(c0[i], m0);
      p1[i] = _mm512_mul_epu32(c2[i], m1);
    }
    PPML_FOR_N {
      c0[i] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1[i], 32), c1[i]), keys.k0[r]);
      c1[i] = p1[i];
      c2[i] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0[i], 32), c3[i]), keys.k1[r]);
      c3[i] = p0[i];
    }
  }
  const __m512i low32 = cst64(0xffffffffull);
  PPML_FOR_N {
    w0[i] = _mm512_and_si512(c0[i], low32);
    w1[i] = _mm512_and_si512(c1[i], low32);
    w2[i] = _mm512_and_si512(c2[i], low32);
  }
}

// u52_to_double of v < 2^52 (one per lane)
PPML_AVX512_INLINE __m512d u52_to_double(__m512i v) {
  return sub(bits_pd(_mm512_or_si512(cst64(0x4330000000000000ull), v)), cst(kTwo52));
}

// log_positive of gaussian.h, lane by lane (x in (0, 1], positive and normal).
PPML_AVX512_INLINE void log_positive(const __m512d x[kN], __m512d out[kN]) {
  __m512d de[kN], t[kN], z[kN], p[kN], q[kN], y[kN];
  PPML_FOR_N {
    const __m512i bits = pd_bits(x[i]);
    const __m512d biased = u52_to_double(_mm512_srli_epi64(bits, 52));
    const __m512d m = bits_pd(_mm512_or_si512(
        _mm512_and_si512(bits, cst64(0x000fffffffffffffull)), cst64(0x3fe0000000000000ull)));
    const __mmask8 low = _mm512_cmp_pd_mask(m, cst(0.70710678118654752440), _CMP_LT_OQ);
    de[i] = sub(biased, _mm512_mask_blend_pd(low, cst(1022.0), cst(1023.0)));
    // low ? (m + m) - 1 : m - 1
    t[i] = sub(_mm512_mask_blend_pd(low, m, add(m, m)), cst(1.0));
  }
  PPML_FOR_N z[i] = mul(t[i], t[i]);
  PPML_FOR_N p[i] = add(mul(cst(1.01875663804580931796e-4), t[i]), cst(4.97494994976747001425e-1));
  PPML_FOR_N q[i] = add(t[i], cst(1.12873587189167450590e1));
  PPML_FOR_N p[i] = add(mul(p[i], t[i]), cst(4.70579119878881725854e0));
  PPML_FOR_N q[i] = add(mul(q[i], t[i]), cst(4.52279145837532221105e1));
  PPML_FOR_N p[i] = add(mul(p[i], t[i]), cst(1.44989225341610930846e1));
  PPML_FOR_N q[i] = add(mul(q[i], t[i]), cst(8.29875266912776603211e1));
  PPML_FOR_N p[i] = add(mul(p[i], t[i]), cst(1.79368678507819816313e1));
  PPML_FOR_N q[i] = add(mul(q[i], t[i]), cst(7.11544750618563894466e1));
  PPML_FOR_N p[i] = add(mul(p[i], t[i]), cst(7.70838733755885391666e0));
  PPML_FOR_N q[i] = add(mul(q[i], t[i]), cst(2.31251620126765340583e1));
  PPML_FOR_N y[i] = mul(t[i], _mm512_div_pd(mul(z[i], p[i]), q[i]));
  PPML_FOR_N {
    y[i] = sub(y[i], mul(de[i], cst(2.121944400546905827679e-4)));
    y[i] = sub(y[i], mul(cst(0.5), z[i]));
    const __m512d r = add(t[i], y[i]);
    out[i] = add(r, mul(de[i], cst(0.693359375)));
  }
}

// sincos_turns of gaussian.h for y = 4 + 4 a, exactly as noise_avx2.h's sincos_turns (the same
// exact reduction, the same polynomial operations); the quarter-turn rotation selects with masks.
PPML_AVX512_INLINE void sincos_turns(const __m512d y[kN], __m512d s[kN], __m512d c[kN]) {
  __m512i q[kN];
  __m512d x[kN], z[kN], ps[kN], pc[kN];
  PPML_FOR_N {
    const __m512d shifted = add(y[i], cst(kRoundMagic));
    const __m512d qf = sub(shifted, cst(kRoundMagic));  // round(y) = round(4 a) + 4
    q[i] = pd_bits(shifted);  // quarter turns (mod 4) in the low 2 bits
    x[i] = mul(sub(y[i], qf), cst(6.28318530717958647692 * 0.25));
    z[i] = mul(x[i], x[i]);
  }
  PPML_FOR_N ps[i] = sub(mul(cst(1.58962301576546568060e-10), z[i]), cst(2.50507477628578072866e-8));
  PPML_FOR_N pc[i] = add(mul(cst(-1.13585365213876817300e-11), z[i]), cst(2.08757008419747316778e-9));
  PPML_FOR_N ps[i] = add(mul(ps[i], z[i]), cst(2.75573136213857245213e-6));
  PPML_FOR_N pc[i] = sub(mul(pc[i], z[i]), cst(2.75573141792967388112e-7));
  PPML_FOR_N ps[i] = sub(mul(ps[i], z[i]), cst(1.98412698295895385996e-4));
  PPML_FOR_N pc[i] = add(mul(pc[i], z[i]), cst(2.48015872888517045348e-5));
  PPML_FOR_N ps[i] = add(mul(ps[i], z[i]), cst(8.33333333332211858878e-3));
  PPML_FOR_N pc[i] = sub(mul(pc[i], z[i]), cst(1.38888888888730564116e-3));
  PPML_FOR_N ps[i] = sub(mul(ps[i], z[i]), cst(1.66666666666666307295e-1));
  PPML_FOR_N pc[i] = add(mul(pc[i], z[i]), cst(4.16666666666665929218e-2));
  PPML_FOR_N {
    const __m512d sn = add(x[i], mul(mul(x[i], z[i]), ps[i]));
    const __m512d cs = add(sub(cst(1.0), mul(cst(0.5), z[i])), mul(mul(z[i], z[i]), pc[i]));
    // odd q swaps sin and cos; sin is negated for q = 2, 3 (bit 1), cos for q = 1, 2 (bit 0 xor
    // bit 1); negation = flipping the sign bit
    const __mmask8 odd = _mm512_test_epi64_mask(q[i], cst64(1));
    const __m512i bit0 = _mm512_slli_epi64(q[i], 63);
    const __m512i bit1 = _mm512_slli_epi64(_mm512_srli_epi64(q[i], 1), 63);
    const __m512d sv = _mm512_mask_blend_pd(odd, sn, cs);
    const __m512d cv = _mm512_mask_blend_pd(odd, cs, sn);
    s[i] = bits_pd(_mm512_xor_si512(pd_bits(sv), bit1));
    c[i] = bits_pd(_mm512_xor_si512(pd_bits(cv), _mm512_xor_si512(bit0, bit1)));
  }
}

// box_muller of gaussian.h on the words of 8 * kN blocks: z0 (cos) and z1 (sin) of each block.
PPML_AVX512_INLINE void box_muller(const __m512i w0[kN], const __m512i w1[kN],
                                   const __m512i w2[kN], __m512d z0[kN], __m512d z1[kN]) {
  __m512d u1[kN], y[kN], lg[kN], s[kN], c[kN];
  PPML_FOR_N {
    const __m512i k = _mm512_xor_si512(_mm512_slli_epi64(w0[i], 20), _mm512_srli_epi64(w1[i], 12));
    u1[i] = add(sub(bits_pd(_mm512_or_si512(cst64(0x3ff0000000000000ull), k)), cst(1.0)),
                cst(1.1102230246251565e-16));
    y[i] = bits_pd(_mm512_or_si512(cst64(0x4010000000000000ull), _mm512_slli_epi64(w2[i], 20)));
  }
  log_positive(u1, lg);
  sincos_turns(y, s, c);
  PPML_FOR_N {
    const __m512d radius = _mm512_sqrt_pd(mul(cst(-2.0), lg[i]));
    z0[i] = mul(radius, c[i]);
    z1[i] = mul(radius, s[i]);
  }
}

// The samples of blocks index + 8 i .. index + 8 i + 7 in element order: e[2 i] = (z0, z1) of
// the first four blocks, e[2 i + 1] those of the last four.
PPML_AVX512_INLINE void normals(const PhiloxKeys& keys, uint64_t index, __m512d e[2 * kN]) {
  uint64_t idx[kN];
  PPML_FOR_N idx[i] = index + 8 * static_cast<uint64_t>(i);
  __m512i w0[kN], w1[kN], w2[kN];
  philox(keys, idx, w0, w1, w2);
  __m512d z0[kN], z1[kN];
  box_muller(w0, w1, w2, z0, z1);
  PPML_FOR_N {
    e[2 * i] = _mm512_unpacklo_pd(z0[i], z1[i]);      // even lanes: blocks 0-3
    e[2 * i + 1] = _mm512_unpackhi_pd(z0[i], z1[i]);  // odd lanes: blocks 4-7
  }
}

using avx2::Scale;

// apply_noise of noise.h on eight doubles: (x + std * z) [/ den]; f is den or 1 / den (kScale).
template <Scale kScale>
PPML_AVX512_INLINE __m512d update(__m512d x, __m512d z, __m512d stddev, __m512d f) {
  __m512d v = add(x, mul(stddev, z));
  if (kScale == Scale::kDivide) v = _mm512_div_pd(v, f);
  if (kScale == Scale::kMulReciprocal) v = mul(v, f);
  return v;
}

constexpr int kGroupBlocks = 8 * kN;  // blocks per iteration

// x[0 .. 2 * kGroupBlocks * groups), all of whose elements exist, from Philox blocks index ...
template <Scale kScale>
PPML_AVX512_INLINE void update_groups(float* x, uint64_t index, int64_t groups,
                                      const PhiloxKeys& keys, double stddev, double f) {
  const __m512d sd = cst(stddev), fv = cst(f);
  for (int64_t j = 0; j < groups; ++j) {
    __m512d e[2 * kN];
    normals(keys, index + kGroupBlocks * static_cast<uint64_t>(j), e);
    float* p = x + 2 * kGroupBlocks * j;
    for (int v = 0; v < 2 * kN; ++v) {
      const __m512d xv = _mm512_cvtps_pd(_mm256_loadu_ps(p + 8 * v));
      _mm256_storeu_ps(p + 8 * v, _mm512_cvtpd_ps(update<kScale>(xv, e[v], sd, fv)));
    }
  }
}

template <Scale kScale>
PPML_AVX512_INLINE void update_groups(double* x, uint64_t index, int64_t groups,
                                      const PhiloxKeys& keys, double stddev, double f) {
  const __m512d sd = cst(stddev), fv = cst(f);
  for (int64_t j = 0; j < groups; ++j) {
    __m512d e[2 * kN];
    normals(keys, index + kGroupBlocks * static_cast<uint64_t>(j), e);
    double* p = x + 2 * kGroupBlocks * j;
    for (int v = 0; v < 2 * kN; ++v)
      _mm512_storeu_pd(p + 8 * v, update<kScale>(_mm512_loadu_pd(p + 8 * v), e[v], sd, fv));
  }
}

#undef PPML_FOR_N

}  // namespace ppml::cpu::avx512

#endif

// AVX2 version of the reproducible noise stream for the CPU kernel: Philox4x32-10 and the
// Box-Muller transform of include/ppml/{philox,gaussian}.h on four blocks per vector.
//
// Bit-identical to the portable code by construction: the words are the same integer maths, and
// every floating-point operation of log_positive and box_muller is the same IEEE operation
// (+, -, *, /, sqrt, double<->float conversion) on the same operands in the same order, one lane
// per block. Selections become blends (both sides are computed, one is kept), and a negation
// becomes a flip of the sign bit, which is what the scalar code's unary minus is. Two places
// compute the same numbers with fewer operations, each argued where it is: the angle reduction
// of sincos_turns (exact steps only; also checked for all 2^32 angle words), and the division
// by a power-of-two denominator (Scale::kMulReciprocal).
// No FMA: these functions are compiled for "avx2" only (not "fma"), and the build has
// -ffp-contract=off, so no multiply-add is ever fused. tests/ops/test_noise_simd.py compares
// this path with the portable one (PPML_FAST_DISABLE_AVX2=1 or _C._set_noise_simd(False)).
//
// Layout: one block per 64-bit lane. Philox's 32-bit words live in the low halves of the lanes,
// which is what vpmuludq multiplies (no odd-lane shuffles, unlike philox_x8.h); the high halves
// hold garbage that never reaches a low half (products read the low halves only, xors are
// lane-wise, and the high word of a product is taken by a 64-bit shift of the full product),
// and it is masked off once at the end. The 64-bit lanes are also what Box-Muller's 52-bit
// uniform and the magic-number conversions need.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "../include/ppml/gaussian.h"  // kTwo52, kRoundMagic
#include "../include/ppml/philox.h"
#include "f16c.h"

#define PPML_HAVE_NOISE_AVX2 1
#define PPML_AVX2_INLINE inline __attribute__((target("avx2"), always_inline))

namespace ppml::cpu::avx2 {

// The 2 x 10 round keys of one seed (the same for every block), as 64-bit lanes.
struct PhiloxKeys {
  __m256i k0[10];
  __m256i k1[10];
};

__attribute__((target("avx2"))) inline void philox_keys(uint64_t seed, PhiloxKeys* keys) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    keys->k0[r] = _mm256_set1_epi64x(k0);
    keys->k1[r] = _mm256_set1_epi64x(k1);
    k0 += Philox4x32::kW0;
    k1 += Philox4x32::kW1;
  }
}

// kN independent groups of four blocks are computed together, statement by statement: one
// group's dependency chain (10 Philox rounds, then log's polynomials, a division and a square
// root: ~170 cycles on Zen 3) is longer than the out-of-order window covers, so a single group
// per iteration runs at the latency of the chain, not at the throughput of the units. Measured
// on one Zen 3 core, 535,818 float32 elements, fastest of 100-200 calls: 2.61 ms with 1 group,
// 2.05 with 2, 1.89 with 3, 1.78 with 4, 1.70 with 5, 1.74 with 6, 1.90 with 8 (spills);
// 3.57 ms before this file (AVX2 Philox, compiler-vectorised Box-Muller).
#ifndef PPML_NOISE_AVX2_GROUPS
#define PPML_NOISE_AVX2_GROUPS 5
#endif
constexpr int kN = PPML_NOISE_AVX2_GROUPS;
#define PPML_FOR_N for (int i = 0; i < kN; ++i)

PPML_AVX2_INLINE __m256d bits_pd(__m256i v) { return _mm256_castsi256_pd(v); }
PPML_AVX2_INLINE __m256i pd_bits(__m256d v) { return _mm256_castpd_si256(v); }
PPML_AVX2_INLINE __m256d cst(double v) { return _mm256_set1_pd(v); }
PPML_AVX2_INLINE __m256i cst64(uint64_t v) { return _mm256_set1_epi64x(static_cast<long long>(v)); }
PPML_AVX2_INLINE __m256d add(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }
PPML_AVX2_INLINE __m256d sub(__m256d a, __m256d b) { return _mm256_sub_pd(a, b); }
PPML_AVX2_INLINE __m256d mul(__m256d a, __m256d b) { return _mm256_mul_pd(a, b); }

// Words w0, w1, w2 (w3 is not used by Box-Muller) of Philox blocks index[i] + 0, 2, 1, 3 in
// lanes 0, 1, 2, 3 (this order lets normals() put the samples in element order with two in-lane
// unpacks), each in the low half of a 64-bit lane with a zero high half.
PPML_AVX2_INLINE void philox(const PhiloxKeys& keys, const uint64_t index[kN], __m256i w0[kN],
                             __m256i w1[kN], __m256i w2[kN]) {
  const __m256i m0 = cst64(Philox4x32::kM0);
  const __m256i m1 = cst64(Philox4x32::kM1);
  __m256i c0[kN], c1[kN], c2[kN], c3[kN], p0[kN], p1[kN];
  // counter = (low word of the block index, high word, 0, 0); round 0 has c2 = c3 = 0, so the
  // product of c2 is 0
  PPML_FOR_N {
    const __m256i idx = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(index[i])),
                                         _mm256_set_epi64x(3, 1, 2, 0));
    p0[i] = _mm256_mul_epu32(idx, m0);
    c0[i] = _mm256_xor_si256(_mm256_srli_epi64(idx, 32), keys.k0[0]);
    c1[i] = _mm256_setzero_si256();
    c2[i] = _mm256_xor_si256(_mm256_srli_epi64(p0[i], 32), keys.k1[0]);
    c3[i] = p0[i];
  }
PPML_UNROLL
  for (int r = 1; r < 10; ++r) {
    PPML_FOR_N {
      p0[i] = _mm256_mul_epu32(c0[i], m0);
      p1[i] = _mm256_mul_epu32(c2[i], m1);
    }
    PPML_FOR_N {
      c0[i] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1[i], 32), c1[i]), keys.k0[r]);
      c1[i] = p1[i];
      c2[i] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0[i], 32), c3[i]), keys.k1[r]);
      c3[i] = p0[i];
    }
  }
  const __m256i low32 = cst64(0xffffffffull);
  PPML_FOR_N {
    w0[i] = _mm256_and_si256(c0[i], low32);
    w1[i] = _mm256_and_si256(c1[i], low32);
    w2[i] = _mm256_and_si256(c2[i], low32);
  }
}

// u52_to_double of v < 2^52 (one per lane)
PPML_AVX2_INLINE __m256d u52_to_double(__m256i v) {
  return sub(bits_pd(_mm256_or_si256(cst64(0x4330000000000000ull), v)), cst(kTwo52));
}

// log_positive of gaussian.h, lane by lane (x in (0, 1], positive and normal).
PPML_AVX2_INLINE void log_positive(const __m256d x[kN], __m256d out[kN]) {
  __m256d de[kN], t[kN], z[kN], p[kN], q[kN], y[kN];
  PPML_FOR_N {
    const __m256i bits = pd_bits(x[i]);
    // the sign bit is 0, so (bits >> 52) is the biased exponent (the scalar code's & 0x7ff)
    const __m256d biased = u52_to_double(_mm256_srli_epi64(bits, 52));
    const __m256d m = bits_pd(_mm256_or_si256(
        _mm256_and_si256(bits, cst64(0x000fffffffffffffull)), cst64(0x3fe0000000000000ull)));
    const __m256d low = _mm256_cmp_pd(m, cst(0.70710678118654752440), _CMP_LT_OQ);
    de[i] = sub(biased, _mm256_blendv_pd(cst(1022.0), cst(1023.0), low));
    // low ? (m + m) - 1 : m - 1
    t[i] = sub(_mm256_blendv_pd(m, add(m, m), low), cst(1.0));
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
  PPML_FOR_N y[i] = mul(t[i], _mm256_div_pd(mul(z[i], p[i]), q[i]));
  PPML_FOR_N {
    y[i] = sub(y[i], mul(de[i], cst(2.121944400546905827679e-4)));
    y[i] = sub(y[i], mul(cst(0.5), z[i]));
    const __m256d r = add(t[i], y[i]);
    out[i] = add(r, mul(de[i], cst(0.693359375)));
  }
}

// sincos_turns of gaussian.h, lane by lane, for a = w2 * 2^-32, given as y = 4 + 4 a (exact:
// y's bits are those of 4.0 with w2 << 20 as mantissa). The scalar code computes, exactly,
// qf = round(4 a) (ties to even, by the magic constant), q = qf mod 4 and r = a - qf / 4, then
// x = r * 2pi rounded. Here round(y) = qf + 4 (4 is even: the same ties) gives the same q,
// d = y - round(y) = 4 r exactly, and x = d * (2pi / 4) is the same real product as r * 2pi
// (2pi / 4 is the double constant 2pi scaled by a power of two, exactly), so the same rounding:
// three multiplications fewer, the same bits.
PPML_AVX2_INLINE void sincos_turns(const __m256d y[kN], __m256d s[kN], __m256d c[kN]) {
  __m256i q[kN];
  __m256d x[kN], z[kN], ps[kN], pc[kN];
  PPML_FOR_N {
    const __m256d shifted = add(y[i], cst(kRoundMagic));
    const __m256d qf = sub(shifted, cst(kRoundMagic));  // round(y) = round(4 a) + 4
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
    const __m256d sn = add(x[i], mul(mul(x[i], z[i]), ps[i]));
    const __m256d cs = add(sub(cst(1.0), mul(cst(0.5), z[i])), mul(mul(z[i], z[i]), pc[i]));
    // rotate by q quarter turns. Bit 0 of q moved to the sign bit selects (blendv reads the
    // sign bit): odd q swaps sin and cos. sin is negated for q = 2, 3 (bit 1), cos for q = 1, 2
    // (bit 0 xor bit 1); negation = flipping the sign bit.
    const __m256i bit0 = _mm256_slli_epi64(q[i], 63);
    const __m256i bit1 = _mm256_slli_epi64(_mm256_srli_epi64(q[i], 1), 63);
    const __m256d sv = _mm256_blendv_pd(sn, cs, bits_pd(bit0));
    const __m256d cv = _mm256_blendv_pd(cs, sn, bits_pd(bit0));
    s[i] = _mm256_xor_pd(sv, bits_pd(bit1));
    c[i] = _mm256_xor_pd(cv, bits_pd(_mm256_xor_si256(bit0, bit1)));
  }
}

// box_muller of gaussian.h on the words of 4 * kN blocks: z0 (cos) and z1 (sin) of each block.
PPML_AVX2_INLINE void box_muller(const __m256i w0[kN], const __m256i w1[kN], const __m256i w2[kN],
                                 __m256d z0[kN], __m256d z1[kN]) {
  __m256d u1[kN], y[kN], lg[kN], s[kN], c[kN];
  PPML_FOR_N {
    const __m256i k = _mm256_xor_si256(_mm256_slli_epi64(w0[i], 20), _mm256_srli_epi64(w1[i], 12));
    u1[i] = add(sub(bits_pd(_mm256_or_si256(cst64(0x3ff0000000000000ull), k)), cst(1.0)),
                cst(1.1102230246251565e-16));
    // y = 4 + 4 a with a = w2 * 2^-32 (gaussian.h's angle in turns), see sincos_turns
    y[i] = bits_pd(_mm256_or_si256(cst64(0x4010000000000000ull), _mm256_slli_epi64(w2[i], 20)));
  }
  log_positive(u1, lg);
  sincos_turns(y, s, c);
  PPML_FOR_N {
    const __m256d radius = _mm256_sqrt_pd(mul(cst(-2.0), lg[i]));
    z0[i] = mul(radius, c[i]);
    z1[i] = mul(radius, s[i]);
  }
}

// The samples of blocks index + 4 i .. index + 4 i + 3 in element order: e[2 i] = (z0, z1) of
// the first two blocks, e[2 i + 1] those of the last two. The lanes hold blocks 0, 2, 1, 3
// (philox), so each is one in-lane unpack.
PPML_AVX2_INLINE void normals(const PhiloxKeys& keys, uint64_t index, __m256d e[2 * kN]) {
  uint64_t idx[kN];
  PPML_FOR_N idx[i] = index + 4 * static_cast<uint64_t>(i);
  __m256i w0[kN], w1[kN], w2[kN];
  philox(keys, idx, w0, w1, w2);
  __m256d z0[kN], z1[kN];
  box_muller(w0, w1, w2, z0, z1);
  PPML_FOR_N {
    e[2 * i] = _mm256_unpacklo_pd(z0[i], z1[i]);      // lanes 0, 2 of each: blocks 0, 1
    e[2 * i + 1] = _mm256_unpackhi_pd(z0[i], z1[i]);  // lanes 1, 3: blocks 2, 3
  }
}

// How the update scales x + std * z: not at all (add_gaussian_noise_), by dividing by the
// denominator (noisy_scale_), or by multiplying by its reciprocal when the denominator is a power
// of two (exact_reciprocal): then 1 / den is exact, and v * (1 / den) is the same real number
// as v / den, rounded once, so the same bits (subnormal results, zeros' signs, infinities and
// NaNs included), without a division (one vdivpd per four elements, the divider also serving
// log's division and the square root).
enum class Scale { kNone, kDivide, kMulReciprocal };

// apply_noise of noise.h on four doubles: (x + std * z) [/ den]; f is den or 1 / den (kScale).
template <Scale kScale>
PPML_AVX2_INLINE __m256d update(__m256d x, __m256d z, __m256d stddev, __m256d f) {
  __m256d v = add(x, mul(stddev, z));
  if (kScale == Scale::kDivide) v = _mm256_div_pd(v, f);
  if (kScale == Scale::kMulReciprocal) v = mul(v, f);
  return v;
}

constexpr int kGroupBlocks = 4 * kN;  // blocks per iteration

// x[0 .. 2 * kGroupBlocks * groups), all of whose elements exist, from Philox blocks index ...
// Each vector of samples covers four elements: they are converted straight from memory (the
// load folds into vcvtps2pd) and stored back as four floats, no 256-bit shuffles.
template <Scale kScale>
PPML_AVX2_INLINE void update_groups(float* x, uint64_t index, int64_t groups,
                                    const PhiloxKeys& keys, double stddev, double f) {
  const __m256d sd = cst(stddev), fv = cst(f);
  for (int64_t j = 0; j < groups; ++j) {
    __m256d e[2 * kN];
    normals(keys, index + kGroupBlocks * static_cast<uint64_t>(j), e);
    float* p = x + 2 * kGroupBlocks * j;
    for (int v = 0; v < 2 * kN; ++v) {
      const __m256d xv = _mm256_cvtps_pd(_mm_loadu_ps(p + 4 * v));
      _mm_storeu_ps(p + 4 * v, _mm256_cvtpd_ps(update<kScale>(xv, e[v], sd, fv)));
    }
  }
}

template <Scale kScale>
PPML_AVX2_INLINE void update_groups(double* x, uint64_t index, int64_t groups,
                                    const PhiloxKeys& keys, double stddev, double f) {
  const __m256d sd = cst(stddev), fv = cst(f);
  for (int64_t j = 0; j < groups; ++j) {
    __m256d e[2 * kN];
    normals(keys, index + kGroupBlocks * static_cast<uint64_t>(j), e);
    double* p = x + 2 * kGroupBlocks * j;
    for (int v = 0; v < 2 * kN; ++v)
      _mm256_storeu_pd(p + 4 * v, update<kScale>(_mm256_loadu_pd(p + 4 * v), e[v], sd, fv));
  }
}

// 16-bit storage: each pair of sample vectors covers 8 elements, loaded as 8 floats (exact), then
// as in apply_noise: float -> double (exact), the double update, double -> float (vcvtpd2ps,
// MXCSR's rounding like the scalar cvtsd2ss), float -> 16 bits by the same rounding as
// float_to_half / float_to_bf16 (f16c.h): the portable path also rounds twice, through float.
// kGroupBlocks is even (4 * kN), so a group is whole pairs of vectors.
template <Scale kScale, typename T>
PPML_F16C_INLINE void update_groups_16(T* x, uint64_t index, int64_t groups,
                                       const PhiloxKeys& keys, double stddev, double f) {
  const __m256d sd = cst(stddev), fv = cst(f);
  for (int64_t j = 0; j < groups; ++j) {
    __m256d e[2 * kN];
    normals(keys, index + kGroupBlocks * static_cast<uint64_t>(j), e);
    T* p = x + 2 * kGroupBlocks * j;
    for (int v = 0; v < 2 * kN; v += 2) {
      T* q = p + 4 * v;
      __m256 xf;
      if constexpr (std::is_same_v<T, Half>) {
        xf = f16c::load8(q);
      } else {
        xf = f16c::bf16_load8(q);
      }
      const __m256d lo = update<kScale>(_mm256_cvtps_pd(_mm256_castps256_ps128(xf)), e[v], sd, fv);
      const __m256d hi =
          update<kScale>(_mm256_cvtps_pd(_mm256_extractf128_ps(xf, 1)), e[v + 1], sd, fv);
      const __m256 r = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
      __m128i bits;
      if constexpr (std::is_same_v<T, Half>) {
        bits = f16c::to_half8(r);
      } else {
        bits = f16c::to_bf16_8(r);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), bits);
    }
  }
}
static_assert(kGroupBlocks % 2 == 0, "16-bit updates take pairs of sample vectors");

#undef PPML_FOR_N

}  // namespace ppml::cpu::avx2

#endif

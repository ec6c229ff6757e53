// Standard normal samples from uniform 32-bit words by the Box-Muller transform
// (Box & Muller, "A note on the generation of random normal deviates", Ann. Math. Stat. 1958),
// with log and sin/cos written here as polynomials (Cephes, S. Moshier) on +, -, *, / only.
//
// Why not libm: the noise ops promise bit-identical numbers on CPU and CUDA. IEEE +, -, *, /
// and the conversions are correctly rounded on both, while libm and CUDA's log/sincos differ
// in the last bits. The build disables floating-point contraction (-ffp-contract=off, nvcc
// --fmad=false) so that no FMA changes a rounding on either side.
//
// Precision: uniforms carry 52 bits (u1) and 32 bits (angle); all maths is in double, so the
// samples are exact to about 2 ulp of double. The radius sqrt(-2 ln u1) is bounded by
// sqrt(2 * 53 * ln 2) = 8.57: a probability mass of 2^-53 per pair (radii beyond it, over all
// angles) is cut, the price of any finite-precision sampler.
#pragma once

#include <cmath>

#include "common.h"

namespace ppml {

// The helpers below avoid int64 <-> double conversions and data-dependent branches, so that
// the CPU compiler vectorises them (AVX2 has neither packed int64 conversion); the magic-number
// conversions are exact.
constexpr double kTwo52 = 4503599627370496.0;            // 2^52
constexpr double kRoundMagic = 6755399441055744.0;       // 1.5 * 2^52: x + it rounds x to an int

// An integer 0 <= v < 2^52 as a double, exactly.
PPML_HD double u52_to_double(uint64_t v) {
  return bits_to_double(0x4330000000000000ull | v) - kTwo52;
}

// Natural log for x in [2^-53, 1] (Cephes log.c, the rational P/Q branch for all exponents;
// accurate to ~1 ulp over the whole range used here).
PPML_HD double log_positive(double x) {
  const double kSqrtHalf = 0.70710678118654752440;
  uint64_t bits = double_to_bits(x);
  // frexp: x = m * 2^e with m in [0.5, 1) (x is normal and positive here)
  double biased = u52_to_double((bits >> 52) & 0x7ff);
  double m = bits_to_double((bits & 0x000fffffffffffffull) | 0x3fe0000000000000ull);
  bool low = m < kSqrtHalf;
  double de = biased - (low ? 1023.0 : 1022.0);
  double t = low ? ((m + m) - 1.0) : (m - 1.0);
  double z = t * t;
  double p = 1.01875663804580931796e-4;
  p = p * t + 4.97494994976747001425e-1;
  p = p * t + 4.70579119878881725854e0;
  p = p * t + 1.44989225341610930846e1;
  p = p * t + 1.79368678507819816313e1;
  p = p * t + 7.70838733755885391666e0;
  double q = t + 1.12873587189167450590e1;
  q = q * t + 4.52279145837532221105e1;
  q = q * t + 8.29875266912776603211e1;
  q = q * t + 7.11544750618563894466e1;
  q = q * t + 2.31251620126765340583e1;
  double y = t * (z * p / q);
  y = y - de * 2.121944400546905827679e-4;
  y = y - 0.5 * z;
  double r = t + y;
  return r + de * 0.693359375;
}

// sin and cos of 2*pi*a for a in [0, 1) given with at most 32 fractional bits: the reduction
// to a quarter turn is exact in "turns", then Cephes sin.c / cos.c polynomials on |x| <= pi/4.
PPML_HD void sincos_turns(double a, double* s, double* c) {
  const double kTwoPi = 6.28318530717958647692;
  double shifted = a * 4.0 + kRoundMagic;               // a*4 exact; rounds to the nearest int
  double qf = shifted - kRoundMagic;                    // nearest quarter turn, 0..4
  uint64_t q = double_to_bits(shifted) & 3u;            // its low bits
  double r = a - qf * 0.25;                             // exact, in [-1/8, 1/8]
  double x = r * kTwoPi;
  double z = x * x;
  double ps = 1.58962301576546568060e-10;
  ps = ps * z - 2.50507477628578072866e-8;
  ps = ps * z + 2.75573136213857245213e-6;
  ps = ps * z - 1.98412698295895385996e-4;
  ps = ps * z + 8.33333333332211858878e-3;
  ps = ps * z - 1.66666666666666307295e-1;
  double sn = x + x * z * ps;
  double pc = -1.13585365213876817300e-11;
  pc = pc * z + 2.08757008419747316778e-9;
  pc = pc * z - 2.75573141792967388112e-7;
  pc = pc * z + 2.48015872888517045348e-5;
  pc = pc * z - 1.38888888888730564116e-3;
  pc = pc * z + 4.16666666666665929218e-2;
  double cs = (1.0 - 0.5 * z) + z * z * pc;
  // rotate by q quarter turns: (sin, cos)(x + q*pi/2)
  bool odd = (q & 1u) != 0;
  double sv = odd ? cs : sn;
  double cv = odd ? sn : cs;
  *s = (q == 2u || q == 3u) ? -sv : sv;
  *c = (q == 1u || q == 2u) ? -cv : cv;
}

// Two independent N(0, 1) samples from four 32-bit words.
PPML_HD void box_muller(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t /*w3*/, double* z0,
                        double* z1) {
  // u1 = (k + 0.5) * 2^-52 with k a 52-bit integer: exact, in (0, 1), never 0
  uint64_t k = (static_cast<uint64_t>(w0) << 20) ^ (static_cast<uint64_t>(w1) >> 12);
  double u1 = (bits_to_double(0x3ff0000000000000ull | k) - 1.0) + 1.1102230246251565e-16;
  double a = u52_to_double(w2) * 2.3283064365386963e-10;  // w2 * 2^-32, exact
  double radius = sqrt(-2.0 * log_positive(u1));
  double s, c;
  sincos_turns(a, &s, &c);
  *z0 = radius * c;
  *z1 = radius * s;
}

}  // namespace ppml

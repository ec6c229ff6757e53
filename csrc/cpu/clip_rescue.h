// Rows of extreme magnitude in the CPU clipping kernel (clip_accumulate.cpp): norms that overflow
// and clip factors too small for the accumulation type, computed by scaling the row by a power
// of two first, so that a finite, nonzero gradient never gets a factor of exactly zero.
//
// The usual path computes ||g||^2 in double and factor = scale * C / (||g|| + eps), rounded to
// the accumulation type A (float for 16/32-bit inputs). Two cases broke it:
// - float64 rows with entries near 1e155 or more: ||g||^2 overflows to inf, and the row was
//   dropped as if it held an inf or a NaN;
// - rows whose factor falls below A's smallest normal number (float32 rows of norm ~1e38 and
//   more with C = 1: factor ~1e-38): as a float the factor became a subnormal with few bits
//   left, or 0, and exactly 0 with flush-to-zero / denormals-are-zero on (MXCSR FTZ|DAZ, which
//   code built with -ffast-math turns on process-wide), so such a sample counted for nothing.
// For those rows only ("rescued" rows, rare), the kernel scans the row once more: 2^E, the power
// of two of its largest |entry|, gives g' = g * 2^-E with entries in (-2, 2), whose sum of
// squares cannot overflow; ||g|| = ||g'|| * 2^E, and the factor in the same scale,
//   fs = factor * 2^E = scale * C / (||g'|| + eps * 2^-E)     (eq. (1) of clip.h's rules, scaled),
// so the row adds fs * g'[j] to the outputs (axpy_scaled): the same real number as
// factor * g[j], with fs and g' both of ordinary magnitude. This is the scaling that LAPACK's
// dnrm2 uses against overflow (Blue, "A portable Fortran program to find the Euclidean norm of a
// vector", ACM TOMS 4(1), 1978). Rows whose norm is too large for a double (float64 only) report
// an infinite norm and still get their (finite, nonzero) factor.
// Everything here is plain code of the baseline ISA, so every build of the row loops and every
// thread count gives the same bits for rescued rows too.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../include/ppml/clip.h"
#include "../include/ppml/common.h"

namespace ppml::cpu {
namespace {

constexpr int kNotRescued = std::numeric_limits<int>::min();

// Sum of squares of x[0..n) scaled by 2^-2E, E the power of two of max |x| (0 when all are
// zero): false when an entry is infinite or NaN.
template <typename T>
bool scaled_sumsq(const T* x, int64_t n, int* e, double* s) {
  double m = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = std::fabs(static_cast<double>(Storage<T>::load(x, j)));
    if (!(v <= std::numeric_limits<double>::max())) return false;
    m = v > m ? v : m;
  }
  *e = 0;
  *s = 0.0;
  if (m == 0.0) return true;
  const int E = std::ilogb(m);
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = std::ldexp(static_cast<double>(Storage<T>::load(x, j)), -E);
    acc += v * v;
  }
  *e = E;
  *s = acc;
  return true;
}

// The scaled clip factor fs = f * 2^E of clip_factor(norm' * 2^E, ...), norm' = sqrt(s) >= 1.
inline double scaled_clip_factor(double norm_scaled, int E, double max_norm, ClipMode mode,
                                 double eps, double gamma) {
  if (mode == ClipMode::kNone) return std::ldexp(1.0, E);
  if (mode == ClipMode::kAutomatic) return max_norm / (norm_scaled + std::ldexp(gamma, -E));
  const double f = max_norm / (norm_scaled + std::ldexp(eps, -E));
  const double one = std::ldexp(1.0, E);  // the cap min(1, .) in the same scale
  return f < one ? f : one;
}

// Whether a factor d = scale * f, rounded to A, would lose the row: 0 or below A's normal range
// (as a subnormal it keeps few bits, and flush-to-zero makes it 0).
template <typename A>
bool factor_needs_rescue(double d) {
  return std::fabs(d) < static_cast<double>(std::numeric_limits<A>::min());
}

// out[j] (+)= a * (g[j] * 2^-e), j < n: a rescued row's contribution (a = fs, e = E).
template <typename T, typename A>
void axpy_scaled(A* out, const T* g, A a, int e, int64_t n, bool init) {
  const bool simple = e >= -1021 && e <= 1021;  // 2^-e is a normal double
  const double sc = simple ? std::ldexp(1.0, -e) : 1.0;
  for (int64_t j = 0; j < n; ++j) {
    const double x = static_cast<double>(Storage<T>::load(g, j));
    const A v = static_cast<A>(simple ? x * sc : std::ldexp(x, -e));
    const A prod = a * v;
    out[j] = init ? prod : out[j] + prod;
  }
}

}  // namespace
}  // namespace ppml::cpu

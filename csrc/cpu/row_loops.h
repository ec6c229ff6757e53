// The vectorised inner loops of the clipping / aggregation kernel (clip_accumulate.cpp): sums
// of squares of a row chunk, and clipped rows added into an output chunk. Each is compiled
// twice per dtype, as explicit functions for AVX2 (PPML_TARGET_AVX2) and for the baseline ISA,
// and the kernel takes one set per call as a RowLoops table (row_loops<T>(avx2)). Both sets run
// the same operations in the same order (no reassociation, no contraction: target.h), so they
// give the same bits; tests/ops/test_clip_simd.py compares them.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../include/ppml/common.h"
#include "target.h"

namespace ppml::cpu {
namespace {

// Sums of squares in double, two variants with the same accuracy contract (norms within a few
// float32 ulps for 16/32-bit inputs, a few double ulps for float64) and a fixed combination
// order, so each gives the same result on every thread count and in both builds:
// - sumsq_stream, for data read from memory (pass 1 of the clipping kernel): 8 chains. Measured
//   faster there than the wider variant (bench/RESULTS.md), the loop pacing the stream.
// - sumsq_cached, for data already in L1/L2 (the one-pass kernel): 32 chains, and for 16/32-bit
//   inputs the squares of 4 elements 32 apart are added in float first (relative error
//   <= 4 * 2^-24) because one double conversion per element costs as much as the rest.
template <typename T, int kAcc, bool kFloatStage>
PPML_ALWAYS_INLINE double sumsq(const T* x, int64_t n) {
  using A = typename Storage<T>::acc;
  double acc[kAcc];
  for (int k = 0; k < kAcc; ++k) acc[k] = 0.0;
  int64_t i = 0;
  if (kFloatStage && sizeof(A) == sizeof(float)) {
    constexpr int kWide = 4 * kAcc;
    for (; i + kWide <= n; i += kWide) {
      for (int k = 0; k < kAcc; ++k) {
        A v0 = Storage<T>::load(x, i + k), v1 = Storage<T>::load(x, i + k + kAcc);
        A v2 = Storage<T>::load(x, i + k + 2 * kAcc), v3 = Storage<T>::load(x, i + k + 3 * kAcc);
        A s = (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
        acc[k] += static_cast<double>(s);
      }
    }
  }
  for (; i + kAcc <= n; i += kAcc) {
    for (int k = 0; k < kAcc; ++k) {
      double v = static_cast<double>(Storage<T>::load(x, i + k));
      acc[k] += v * v;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    double v = static_cast<double>(Storage<T>::load(x, i));
    acc[k] += v * v;
  }
  for (int w = kAcc / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  }
  return acc[0];
}

// sumsq_cached: the float stage overflows for |x| >~ 1.8e19 and loses tiny squares to
// underflow: a chunk whose float-stage result is non-finite or below 2^-60 is recomputed in
// double only (then the loss from flushed squares is < 4096 * 2^-126 / 2^-60, negligible).
template <typename T>
PPML_ALWAYS_INLINE double sumsq_cached_body(const T* x, int64_t n) {
  double r = sumsq<T, 32, true>(x, n);
  if (!(r >= 8.673617379884035e-19 && r <= 1.0e300)) r = sumsq<T, 8, false>(x, n);
  return r;
}

// out[j] (+)= sum over the given rows, in order, of a[r] * g_r[j]. Up to 4 rows per sweep; the
// additions stay in row order for every j.
template <typename T, typename A>
PPML_ALWAYS_INLINE void axpy_rows(A* out, const T* const* g, const A* a, int nrows, int64_t n, bool init) {
  int r = 0;
  if (init) {
    if (nrows == 0) {
      std::fill(out, out + n, A(0));
      return;
    }
    const T* g0 = g[0];
    A a0 = a[0];
    for (int64_t j = 0; j < n; ++j) out[j] = a0 * static_cast<A>(Storage<T>::load(g0, j));
    r = 1;
  }
  for (; r + 4 <= nrows; r += 4) {
    const T *g0 = g[r], *g1 = g[r + 1], *g2 = g[r + 2], *g3 = g[r + 3];
    A a0 = a[r], a1 = a[r + 1], a2 = a[r + 2], a3 = a[r + 3];
    for (int64_t j = 0; j < n; ++j) {
      A o = out[j];
      o += a0 * static_cast<A>(Storage<T>::load(g0, j));
      o += a1 * static_cast<A>(Storage<T>::load(g1, j));
      o += a2 * static_cast<A>(Storage<T>::load(g2, j));
      o += a3 * static_cast<A>(Storage<T>::load(g3, j));
      out[j] = o;
    }
  }
  for (; r < nrows; ++r) {
    const T* g0 = g[r];
    A a0 = a[r];
    for (int64_t j = 0; j < n; ++j) out[j] += a0 * static_cast<A>(Storage<T>::load(g0, j));
  }
}

// The two builds of the three loops. Templates in an unnamed namespace: every instance is local
// to clip_accumulate.cpp, so no other translation unit can hold a copy built for another ISA.
template <typename T>
double sumsq_stream_portable(const T* x, int64_t n) { return sumsq<T, 8, false>(x, n); }
template <typename T>
double sumsq_cached_portable(const T* x, int64_t n) { return sumsq_cached_body(x, n); }
template <typename T, typename A>
void axpy_portable(A* out, const T* const* g, const A* a, int nrows, int64_t n, bool init) {
  axpy_rows(out, g, a, nrows, n, init);
}

#if PPML_HAVE_AVX2_TARGET
template <typename T>
PPML_TARGET_AVX2 double sumsq_stream_avx2(const T* x, int64_t n) { return sumsq<T, 8, false>(x, n); }
template <typename T>
PPML_TARGET_AVX2 double sumsq_cached_avx2(const T* x, int64_t n) { return sumsq_cached_body(x, n); }
template <typename T, typename A>
PPML_TARGET_AVX2 void axpy_avx2(A* out, const T* const* g, const A* a, int nrows, int64_t n,
                                bool init) {
  axpy_rows(out, g, a, nrows, n, init);
}
#endif

// One build of the loops for storage type T (plain function pointers: an indirect call per
// chunk of kChunk elements costs nothing measurable).
template <typename T>
struct RowLoops {
  using A = typename Storage<T>::acc;
  double (*sumsq_stream)(const T*, int64_t);   // pass 1 of the two-pass kernel
  double (*sumsq_cached)(const T*, int64_t);   // rows already in L1/L2 (one-pass kernel)
  void (*axpy)(A*, const T* const*, const A*, int, int64_t, bool);  // axpy_rows
};

// The AVX2 build when avx2 is true (the caller checked the CPU), else the portable one.
template <typename T>
RowLoops<T> row_loops(bool avx2) {
  using A = typename Storage<T>::acc;
#if PPML_HAVE_AVX2_TARGET
  if (avx2) return {&sumsq_stream_avx2<T>, &sumsq_cached_avx2<T>, &axpy_avx2<T, A>};
#endif
  return {&sumsq_stream_portable<T>, &sumsq_cached_portable<T>, &axpy_portable<T, A>};
}

}  // namespace
}  // namespace ppml::cpu

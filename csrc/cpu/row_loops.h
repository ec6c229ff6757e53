// The vectorised inner loops of the clipping / aggregation kernel (clip_accumulate.cpp): sums
// of squares of a row chunk, and clipped rows added into an output chunk. Each is compiled
// three times per dtype, as explicit functions for AVX-512 (PPML_TARGET_AVX512), AVX2
// (PPML_TARGET_AVX2) and the baseline ISA, float16 a fourth time with F16C intrinsics
// ("avx2,f16c", also used on AVX-512 CPUs), and the kernel takes one set per call as a RowLoops
// table (row_loops<T>(isa, f16c)). All sets run the same operations in the same
// order (no reassociation, no contraction: target.h), so they give the same bits;
// tests/ops/test_clip_simd.py compares them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../include/ppml/common.h"
#include "f16c.h"
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
//
// sumsq_from continues a sum whose accumulators acc[0..kAcc) hold elements [0, i) (the float16
// F16C build does the whole steps with intrinsics first, then the rest here); sumsq starts it.
template <typename T, int kAcc, bool kFloatStage>
PPML_ALWAYS_INLINE double sumsq_from(const T* x, int64_t n, double* acc, int64_t i) {
  using A = typename Storage<T>::acc;
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

template <typename T, int kAcc, bool kFloatStage>
PPML_ALWAYS_INLINE double sumsq(const T* x, int64_t n) {
  double acc[kAcc];
  for (int k = 0; k < kAcc; ++k) acc[k] = 0.0;
  return sumsq_from<T, kAcc, kFloatStage>(x, n, acc, 0);
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

#if PPML_HAVE_AVX512_TARGET
// The same loops compiled for AVX-512 (zmm vectors of 8 doubles / 16 floats): the compiler
// vectorises the same operations in the same order as in the other builds.
template <typename T>
PPML_TARGET_AVX512 double sumsq_stream_avx512(const T* x, int64_t n) {
  return sumsq<T, 8, false>(x, n);
}
template <typename T>
PPML_TARGET_AVX512 double sumsq_cached_avx512(const T* x, int64_t n) {
  return sumsq_cached_body(x, n);
}
template <typename T, typename A>
PPML_TARGET_AVX512 void axpy_avx512(A* out, const T* const* g, const A* a, int nrows, int64_t n,
                                    bool init) {
  axpy_rows(out, g, a, nrows, n, init);
}
#endif

#if PPML_HAVE_F16C_TARGET
// The float16 loops with F16C's vcvtph2ps (f16c.h; the integer half_to_float of the other builds
// barely vectorises: float16 clipping took 5x as long as bfloat16). Each does the same
// operations in the same order as the template it replaces, lane k of the vectors being
// accumulator k (sums of squares) or element j (axpy); the elements left after the whole vector
// steps go through the template's own scalar code.

// sumsq<Half, kAcc, kFloatStage>'s vector steps: accumulators acc[0..kAcc) (kAcc a multiple of
// 8; acc[k] takes elements k, k + kAcc, ...), returns the first element left.
template <int kAcc, bool kFloatStage>
PPML_F16C_INLINE int64_t sumsq_steps_f16c(const Half* x, int64_t n, double* acc) {
  static_assert(kAcc % 8 == 0, "8 accumulators per vector of 8 floats");
  constexpr int kV = kAcc / 8;  // vectors of 8 elements per step of kAcc
  __m256d a[2 * kV];            // a[2 v] = acc[8 v .. 8 v + 3], a[2 v + 1] = acc[8 v + 4 ..]
  for (int v = 0; v < 2 * kV; ++v) a[v] = _mm256_setzero_pd();
  int64_t i = 0;
  if (kFloatStage) {
    // s = (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3) in float, elements k + {0, 1, 2, 3} kAcc
    for (; i + 4 * kAcc <= n; i += 4 * kAcc) {
      for (int v = 0; v < kV; ++v) {
        const Half* p = x + i + 8 * v;
        const __m256 v0 = f16c::load8(p), v1 = f16c::load8(p + kAcc);
        const __m256 v2 = f16c::load8(p + 2 * kAcc), v3 = f16c::load8(p + 3 * kAcc);
        const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(v0, v0), _mm256_mul_ps(v1, v1)),
                                       _mm256_add_ps(_mm256_mul_ps(v2, v2), _mm256_mul_ps(v3, v3)));
        a[2 * v] = _mm256_add_pd(a[2 * v], _mm256_cvtps_pd(_mm256_castps256_ps128(s)));
        a[2 * v + 1] = _mm256_add_pd(a[2 * v + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1)));
      }
    }
  }
  for (; i + kAcc <= n; i += kAcc) {
    for (int v = 0; v < kV; ++v) {
      const __m256 f = f16c::load8(x + i + 8 * v);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
      a[2 * v] = _mm256_add_pd(a[2 * v], _mm256_mul_pd(lo, lo));
      a[2 * v + 1] = _mm256_add_pd(a[2 * v + 1], _mm256_mul_pd(hi, hi));
    }
  }
  for (int v = 0; v < 2 * kV; ++v) _mm256_storeu_pd(acc + 4 * v, a[v]);
  return i;
}

template <int kAcc, bool kFloatStage>
PPML_F16C_INLINE double sumsq_f16c(const Half* x, int64_t n) {
  double acc[kAcc];
  const int64_t i = sumsq_steps_f16c<kAcc, kFloatStage>(x, n, acc);
  return sumsq_from<Half, kAcc, kFloatStage>(x, n, acc, i);
}

PPML_TARGET_AVX2_F16C double sumsq_stream_f16c(const Half* x, int64_t n) {
  return sumsq_f16c<8, false>(x, n);
}

// sumsq_cached_body<Half>
PPML_TARGET_AVX2_F16C double sumsq_cached_f16c(const Half* x, int64_t n) {
  double r = sumsq_f16c<32, true>(x, n);
  if (!(r >= 8.673617379884035e-19 && r <= 1.0e300)) r = sumsq_f16c<8, false>(x, n);
  return r;
}

// axpy_rows<Half, float>: elements [0, n - n % 8) in vectors, the rest as the template does.
PPML_TARGET_AVX2_F16C void axpy_f16c(float* out, const Half* const* g, const float* a, int nrows,
                                     int64_t n, bool init) {
  using S = Storage<Half>;
  const int64_t nv = n - n % 8;
  int r = 0;
  if (init) {
    if (nrows == 0) {
      std::fill(out, out + n, 0.0f);
      return;
    }
    const Half* g0 = g[0];
    const float a0 = a[0];
    const __m256 va0 = _mm256_set1_ps(a0);
    int64_t j = 0;
    for (; j < nv; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(va0, f16c::load8(g0 + j)));
    for (; j < n; ++j) out[j] = a0 * S::load(g0, j);
    r = 1;
  }
  for (; r + 4 <= nrows; r += 4) {
    const Half *g0 = g[r], *g1 = g[r + 1], *g2 = g[r + 2], *g3 = g[r + 3];
    const float a0 = a[r], a1 = a[r + 1], a2 = a[r + 2], a3 = a[r + 3];
    const __m256 va0 = _mm256_set1_ps(a0), va1 = _mm256_set1_ps(a1);
    const __m256 va2 = _mm256_set1_ps(a2), va3 = _mm256_set1_ps(a3);
    int64_t j = 0;
    for (; j < nv; j += 8) {
      __m256 o = _mm256_loadu_ps(out + j);
      o = _mm256_add_ps(o, _mm256_mul_ps(va0, f16c::load8(g0 + j)));
      o = _mm256_add_ps(o, _mm256_mul_ps(va1, f16c::load8(g1 + j)));
      o = _mm256_add_ps(o, _mm256_mul_ps(va2, f16c::load8(g2 + j)));
      o = _mm256_add_ps(o, _mm256_mul_ps(va3, f16c::load8(g3 + j)));
      _mm256_storeu_ps(out + j, o);
    }
    for (; j < n; ++j) {
      float o = out[j];
      o += a0 * S::load(g0, j);
      o += a1 * S::load(g1, j);
      o += a2 * S::load(g2, j);
      o += a3 * S::load(g3, j);
      out[j] = o;
    }
  }
  for (; r < nrows; ++r) {
    const Half* g0 = g[r];
    const float a0 = a[r];
    const __m256 va0 = _mm256_set1_ps(a0);
    int64_t j = 0;
    for (; j < nv; j += 8)
      _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_loadu_ps(out + j),
                                              _mm256_mul_ps(va0, f16c::load8(g0 + j))));
    for (; j < n; ++j) out[j] += a0 * S::load(g0, j);
  }
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

// The build of isa (the caller checked the CPU): for float16 the F16C build when isa is AVX2 or
// AVX-512 and f16c is true (the caller checked that too), else the AVX-512, AVX2 or portable one.
template <typename T>
RowLoops<T> row_loops(Isa isa, bool f16c) {
  using A = typename Storage<T>::acc;
#if PPML_HAVE_F16C_TARGET
  if constexpr (std::is_same_v<T, Half>) {
    if (isa != Isa::kPortable && f16c) return {&sumsq_stream_f16c, &sumsq_cached_f16c, &axpy_f16c};
  }
#endif
#if PPML_HAVE_AVX512_TARGET
  if (isa == Isa::kAvx512)
    return {&sumsq_stream_avx512<T>, &sumsq_cached_avx512<T>, &axpy_avx512<T, A>};
#endif
#if PPML_HAVE_AVX2_TARGET
  if (isa != Isa::kPortable) return {&sumsq_stream_avx2<T>, &sumsq_cached_avx2<T>, &axpy_avx2<T, A>};
#endif
  return {&sumsq_stream_portable<T>, &sumsq_cached_portable<T>, &axpy_portable<T, A>};
}

}  // namespace
}  // namespace ppml::cpu

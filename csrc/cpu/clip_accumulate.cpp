// CPU kernel of clip_and_accumulate and weighted_aggregate:
//   out_l = sum_b scale_b * factor_b * g_{b,l},  factor_b from the L2 norm of row b.
//
// Two passes, blocked so that the second reads from cache: rows are processed in blocks that
// fit in half the last-level cache; pass 1 computes each row's sum of squares per column chunk
// (read from memory), a barrier, then pass 2 adds the clipped rows into the outputs chunk by
// chunk (read again, now from cache). Threads own fixed column chunks in both passes, and every
// output element adds the rows in row order, so the result does not depend on the thread
// count or the block size. Sums of squares accumulate in double per chunk (a float accumulator
// over 1e6 elements loses ~1e-4 relative, DESIGN.md).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../include/ppml/kernels.h"
#include "parallel.h"
#include "target.h"

namespace ppml::cpu {
namespace {

struct Chunk {
  int seg;
  int64_t start;
  int64_t len;
};

template <typename T>
PPML_ALWAYS_INLINE double sumsq(const T* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      double v = static_cast<double>(Storage<T>::load(x, i + k));
      acc[k] += v * v;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    double v = static_cast<double>(Storage<T>::load(x, i));
    acc[k] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

PPML_TARGET_CLONES double sumsq_f32(const float* x, int64_t n) { return sumsq(x, n); }
PPML_TARGET_CLONES double sumsq_f64(const double* x, int64_t n) { return sumsq(x, n); }
PPML_TARGET_CLONES double sumsq_f16(const Half* x, int64_t n) { return sumsq(x, n); }
PPML_TARGET_CLONES double sumsq_bf16(const BFloat16* x, int64_t n) { return sumsq(x, n); }

double sumsq_any(const float* x, int64_t n) { return sumsq_f32(x, n); }
double sumsq_any(const double* x, int64_t n) { return sumsq_f64(x, n); }
double sumsq_any(const Half* x, int64_t n) { return sumsq_f16(x, n); }
double sumsq_any(const BFloat16* x, int64_t n) { return sumsq_bf16(x, n); }

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

PPML_TARGET_CLONES void axpy_f32(float* o, const float* const* g, const float* a, int r,
                                 int64_t n, bool init) {
  axpy_rows(o, g, a, r, n, init);
}
PPML_TARGET_CLONES void axpy_f64(double* o, const double* const* g, const double* a, int r,
                                 int64_t n, bool init) {
  axpy_rows(o, g, a, r, n, init);
}
PPML_TARGET_CLONES void axpy_f16(float* o, const Half* const* g, const float* a, int r,
                                 int64_t n, bool init) {
  axpy_rows(o, g, a, r, n, init);
}
PPML_TARGET_CLONES void axpy_bf16(float* o, const BFloat16* const* g, const float* a, int r,
                                  int64_t n, bool init) {
  axpy_rows(o, g, a, r, n, init);
}

void axpy_any(float* o, const float* const* g, const float* a, int r, int64_t n, bool i) {
  axpy_f32(o, g, a, r, n, i);
}
void axpy_any(double* o, const double* const* g, const double* a, int r, int64_t n, bool i) {
  axpy_f64(o, g, a, r, n, i);
}
void axpy_any(float* o, const Half* const* g, const float* a, int r, int64_t n, bool i) {
  axpy_f16(o, g, a, r, n, i);
}
void axpy_any(float* o, const BFloat16* const* g, const float* a, int r, int64_t n, bool i) {
  axpy_bf16(o, g, a, r, n, i);
}

int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    long v = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (v <= 0) v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<int64_t>(v) : int64_t(8) << 20;
  }();
  return bytes;
}

template <typename T>
void run(const ClipProblem& p) {
  using A = typename Storage<T>::acc;
  const int64_t B = p.rows;
  const int L = static_cast<int>(p.seg_widths.size());
  const bool row_list = !p.row_ptrs.empty();

  std::vector<Chunk> chunks;
  std::vector<int64_t> chunk_begin_elems;  // cumulative element count before each chunk
  std::vector<int> seg_first_chunk(L + 1, 0);
  int64_t total = 0;
  for (int l = 0; l < L; ++l) {
    seg_first_chunk[l] = static_cast<int>(chunks.size());
    for (int64_t s = 0; s < p.seg_widths[l]; s += kChunk) {
      chunks.push_back({l, s, std::min(kChunk, p.seg_widths[l] - s)});
      chunk_begin_elems.push_back(total);
      total += chunks.back().len;
    }
  }
  seg_first_chunk[L] = static_cast<int>(chunks.size());
  const int64_t C = static_cast<int64_t>(chunks.size());

  auto row_seg = [&](int64_t b, int l) -> const T* {
    if (row_list) return static_cast<const T*>(p.row_ptrs[b]);
    return static_cast<const T*>(p.seg_ptrs[l]) + b * p.seg_widths[l];
  };

  // Rows per block: half the last-level cache, at least one row.
  const int64_t row_bytes = std::max<int64_t>(1, total * static_cast<int64_t>(sizeof(T)));
  const int64_t block_rows = std::max<int64_t>(
      1, std::min<int64_t>(B, (last_level_cache_bytes() / 2) / row_bytes));

  int nthreads = p.num_threads;
  if (B * total < (int64_t(1) << 16)) nthreads = 1;
  nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, C)));

  std::vector<double> partial(static_cast<size_t>(B * C));

  Barrier barrier(nthreads);
  auto job = [&](int t, int nt) {
    // chunk range of this thread, balanced by elements
    int64_t e0 = total * t / nt, e1 = total * (t + 1) / nt;
    int64_t c0 = std::lower_bound(chunk_begin_elems.begin(), chunk_begin_elems.end(), e0) -
                 chunk_begin_elems.begin();
    int64_t c1 = std::lower_bound(chunk_begin_elems.begin(), chunk_begin_elems.end(), e1) -
                 chunk_begin_elems.begin();
    if (t == nt - 1) c1 = C;
    std::vector<double> seg_norm(L);
    std::vector<A> factor(static_cast<size_t>(block_rows) * L);
    std::vector<const T*> gptr(block_rows);
    std::vector<A> aval(block_rows);
    for (int64_t r0 = 0; r0 < B; r0 += block_rows) {
      const int64_t r1 = std::min(B, r0 + block_rows);
      // pass 1: sums of squares of my chunks of rows [r0, r1)
      for (int64_t b = r0; b < r1; ++b) {
        for (int64_t c = c0; c < c1; ++c) {
          const Chunk& ch = chunks[c];
          partial[b * C + c] = sumsq_any(row_seg(b, ch.seg) + ch.start, ch.len);
        }
      }
      if (nt > 1) barrier.wait();
      // factors of rows [r0, r1): every thread computes the same numbers
      for (int64_t b = r0; b < r1; ++b) {
        const double* pb = &partial[b * C];
        double flat = 0.0;
        bool finite = true;
        for (int l = 0; l < L; ++l) {
          double s = 0.0;
          for (int c = seg_first_chunk[l]; c < seg_first_chunk[l + 1]; ++c) s += pb[c];
          seg_norm[l] = std::sqrt(s);
          finite = finite && is_finite_double(seg_norm[l]);
        }
        for (int64_t c = 0; c < C; ++c) flat += pb[c];
        double flat_norm = std::sqrt(flat);
        double scale = p.row_scale ? p.row_scale[b] : 1.0;
        if (t == 0) {
          if (p.per_layer) {
            for (int l = 0; l < L; ++l) p.norms[l * B + b] = seg_norm[l];
          } else {
            p.norms[b] = flat_norm;
          }
        }
        for (int l = 0; l < L; ++l) {
          double f;
          if (!finite || !is_finite_double(flat_norm)) {
            f = 0.0;
          } else if (p.per_layer) {
            f = clip_factor(seg_norm[l], p.max_norms[l], p.mode, p.eps, p.gamma);
          } else {
            f = clip_factor(flat_norm, p.max_norms[0], p.mode, p.eps, p.gamma);
          }
          factor[(b - r0) * L + l] = static_cast<A>(scale * f);
        }
      }
      // pass 2: add the block's rows into my chunks of the outputs (rows now in cache)
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        int n = 0;
        for (int64_t b = r0; b < r1; ++b) {
          A a = factor[(b - r0) * L + ch.seg];
          if (a == A(0)) continue;
          gptr[n] = row_seg(b, ch.seg) + ch.start;
          aval[n] = a;
          ++n;
        }
        A* out = static_cast<A*>(p.out_ptrs[ch.seg]) + ch.start;
        axpy_any(out, gptr.data(), aval.data(), n, ch.len, r0 == 0);
      }
    }
  };
  parallel_run(nthreads, job);
}

}  // namespace

void clip_accumulate(const ClipProblem& p) {
  if (p.rows == 0) return;  // the Python layer returns zeros without calling the kernel
  switch (p.dtype) {
    case DType::kFloat32: return run<float>(p);
    case DType::kFloat64: return run<double>(p);
    case DType::kFloat16: return run<Half>(p);
    case DType::kBFloat16: return run<BFloat16>(p);
  }
}

}  // namespace ppml::cpu

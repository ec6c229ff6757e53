// CPU kernel of clip_and_accumulate and weighted_aggregate:
//   out_l = sum_b scale_b * factor_b * g_{b,l},  factor_b from the L2 norm of row b.
//
// Two passes, blocked so that the second reads from cache: rows are processed in blocks that
// fit a cache budget (block_budget_bytes); pass 1 computes each row's sum of squares per column chunk
// (read from memory), a barrier, then pass 2 adds the clipped rows into the outputs chunk by
// chunk (read again, now from cache). Threads own fixed column chunks in both passes, and every
// output element adds the rows in row order, so the result does not depend on the thread
// count or the block size. Without clipping (weighted_aggregate, no clip_norm) one pass does
// it all (run_one_pass). Sums of squares accumulate in double per chunk (a float accumulator
// over 1e6 elements loses ~1e-4 relative, DESIGN.md). The row loops come in AVX-512, AVX2 and
// portable builds (row_loops.h) giving the same bits; rows of extreme magnitude (norms that
// overflow, factors below the accumulation type's normal range) are rescued by scaling
// (clip_rescue.h), so a finite nonzero gradient never gets a zero factor.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "../include/ppml/kernels.h"
#include "clip_layout.h"
#include "clip_rescue.h"
#include "parallel.h"
#include "row_loops.h"

namespace ppml::cpu {
namespace {

template <typename T>
struct Rows {
  const ClipProblem& p;
  bool row_list;
  const T* at(int64_t b, int l) const {
    if (row_list) return static_cast<const T*>(p.row_ptrs[b]);
    return static_cast<const T*>(p.seg_ptrs[l]) + b * p.seg_widths[l];
  }
};

// Norms of row b from its chunk sums (written to p.norms when write_norms), and its factor for
// each segment into factor[0..L). Returns false when the row is dropped (an entry is infinite or
// NaN). A row whose sums overflowed, or (when rexp is given) whose factor is too small for A, is
// rescued (clip_rescue.h): then rexp[l] = E and factor[l] = fs, the factor in the scale of
// g * 2^-E (axpy_scaled); else rexp[l] = kNotRescued.
template <typename T, typename A>
bool row_factors(const ClipProblem& p, const Layout& lay, const Rows<T>& rows,
                 const double* partial_b, int64_t b, bool write_norms, A* factor, int* rexp,
                 double* seg_norm) {
  const int L = static_cast<int>(p.seg_widths.size());
  bool finite = true;
  for (int l = 0; l < L; ++l) {
    double s = 0.0;
    for (int c = lay.seg_first_chunk[l]; c < lay.seg_first_chunk[l + 1]; ++c) s += partial_b[c];
    seg_norm[l] = std::sqrt(s);
    finite = finite && is_finite_double(seg_norm[l]);
  }
  double flat = 0.0;
  for (int64_t c = 0; c < lay.C; ++c) flat += partial_b[c];
  double flat_norm = std::sqrt(flat);
  finite = finite && is_finite_double(flat_norm);
  // The scaled sums of the rescue (clip_rescue.h), computed at most once, when needed.
  std::vector<int> E;
  std::vector<double> S;
  int flat_e = 0;
  double flat_s = 0.0;
  auto scan = [&]() -> bool {
    E.assign(L, 0);
    S.assign(L, 0.0);
    for (int l = 0; l < L; ++l)
      if (!scaled_sumsq(rows.at(b, l), p.seg_widths[l], &E[l], &S[l])) return false;
    flat_e = kNotRescued;
    for (int l = 0; l < L; ++l)
      if (S[l] > 0.0 && E[l] > flat_e) flat_e = E[l];
    if (flat_e == kNotRescued) flat_e = 0;
    flat_s = 0.0;
    for (int l = 0; l < L; ++l)
      if (S[l] > 0.0) flat_s += std::ldexp(S[l], 2 * (E[l] - flat_e));
    return true;
  };
  // A sum of squares that overflowed (float64 entries beyond ~1e154) with finite entries: the
  // norms from the scaled sums (infinite only where the norm exceeds the largest double).
  if (!finite && p.dtype == DType::kFloat64 && scan()) {
    finite = true;
    for (int l = 0; l < L; ++l) seg_norm[l] = std::ldexp(std::sqrt(S[l]), E[l]);
    flat_norm = std::ldexp(std::sqrt(flat_s), flat_e);
  }
  if (write_norms) {
    if (p.per_layer) {
      for (int l = 0; l < L; ++l) p.norms[l * p.rows + b] = seg_norm[l];
    } else {
      p.norms[b] = flat_norm;
    }
  }
  const double scale = p.row_scale ? p.row_scale[b] : 1.0;
  for (int l = 0; l < L; ++l) {
    if (rexp) rexp[l] = kNotRescued;
    double f = 0.0;
    if (finite) {
      // an infinite norm here is an overflow of finite entries: rescued below
      f = p.mode == ClipMode::kNone
              ? 1.0
              : (p.per_layer ? clip_factor(seg_norm[l], p.max_norms[l], p.mode, p.eps, p.gamma)
                             : clip_factor(flat_norm, p.max_norms[0], p.mode, p.eps, p.gamma));
    }
    const double d = scale * f;
    if (finite && rexp && p.mode != ClipMode::kNone && scale != 0.0 &&
        factor_needs_rescue<A>(d) && (!S.empty() || scan())) {
      const int e = p.per_layer ? E[l] : flat_e;
      const double s = p.per_layer ? S[l] : flat_s;
      const double max_norm = p.per_layer ? p.max_norms[l] : p.max_norms[0];
      const double fs = scale * scaled_clip_factor(std::sqrt(s), e, max_norm, p.mode, p.eps, p.gamma);
      if (s > 0.0 && !factor_needs_rescue<A>(fs)) {
        factor[l] = static_cast<A>(fs);
        rexp[l] = e;
        continue;
      }
    }
    factor[l] = static_cast<A>(d);
  }
  return finite;
}

int pick_threads(const ClipProblem& p, const Layout& lay) {
  int nthreads = p.num_threads;
  if (p.rows * lay.total < (int64_t(1) << 16)) nthreads = 1;  // dispatch would cost more
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, lay.C)));
}

// Clipping: the factors need the norms first. Rows in cache-sized blocks, two passes each.
template <typename T>
void run_two_pass(const ClipProblem& p, const Layout& lay, const RowLoops<T>& loops) {
  using A = typename Storage<T>::acc;
  const int64_t B = p.rows, C = lay.C;
  const int L = static_cast<int>(p.seg_widths.size());
  const Rows<T> rows{p, !p.row_ptrs.empty()};
  // Rows per block. Memory traffic per row, in row sizes: pass 1 reads it (1), pass 2 reads
  // it again (0 if the block fits the cache budget, else 1), and every block reads and writes
  // the outputs once (2 * out / (rows per block * row)). Blocks that fit the budget win unless
  // the outputs are as large as the rows (few, huge rows): then 16-row blocks from memory.
  const double row_bytes = std::max<double>(1.0, double(lay.total) * double(sizeof(T)));
  const double out_bytes = double(lay.total) * double(sizeof(A));
  const int64_t fit_rows = std::max<int64_t>(1, block_budget_bytes() / int64_t(row_bytes));
  const int64_t big_rows = 16;
  const double fit_cost = 1.0 + 2.0 * out_bytes / (double(fit_rows) * row_bytes);
  const double big_cost = 2.0 + 2.0 * out_bytes / (double(big_rows) * row_bytes);
  const int64_t block_rows = std::min<int64_t>(B, fit_cost <= big_cost ? fit_rows : big_rows);
  const int nthreads = pick_threads(p, lay);
  // B * C doubles; empty when every segment has width 0 (C == 0), so rows are addressed with
  // data() + offset, never operator[] (out of range on an empty vector: UB, and an assertion
  // failure under _GLIBCXX_ASSERTIONS).
  std::vector<double> partial(static_cast<size_t>(B * C));
  Barrier barrier;

  parallel_run(nthreads, [&](int t, int nt) {
    int64_t c0, c1;
    lay.share(t, nt, &c0, &c1);
    std::vector<double> seg_norm(L);
    std::vector<A> factor(static_cast<size_t>(block_rows) * L);
    std::vector<int> rexp(static_cast<size_t>(block_rows) * L);
    std::vector<const T*> gptr(block_rows);
    std::vector<A> aval(block_rows);
    for (int64_t r0 = 0; r0 < B; r0 += block_rows) {
      const int64_t r1 = std::min(B, r0 + block_rows);
      // pass 1: sums of squares of my chunks of rows [r0, r1), read from memory
      for (int64_t b = r0; b < r1; ++b) {
        for (int64_t c = c0; c < c1; ++c) {
          const Chunk& ch = lay.chunks[c];
          partial[b * C + c] = loops.sumsq_stream(rows.at(b, ch.seg) + ch.start, ch.len);
        }
      }
      if (nt > 1) barrier.wait();
      // factors of the block's rows: every thread computes the same numbers
      for (int64_t b = r0; b < r1; ++b)
        row_factors(p, lay, rows, partial.data() + b * C, b, t == 0,
                    factor.data() + (b - r0) * L, rexp.data() + (b - r0) * L, seg_norm.data());
      // pass 2: add the block's rows into my chunks of the outputs, read from cache. A rescued
      // row (rare) goes through axpy_scaled in its place: out[j] takes the rows in row order
      // either way, so splitting the list there changes no bit of the other rows' sums.
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = lay.chunks[c];
        A* out = static_cast<A*>(p.out_ptrs[ch.seg]) + ch.start;
        bool init = r0 == 0;
        int n = 0;
        for (int64_t b = r0; b < r1; ++b) {
          const A a = factor[(b - r0) * L + ch.seg];
          if (a == A(0)) continue;
          const int e = rexp[(b - r0) * L + ch.seg];
          if (e != kNotRescued) {
            if (n > 0) loops.axpy(out, gptr.data(), aval.data(), n, ch.len, init);
            if (n > 0) init = false;
            n = 0;
            axpy_scaled(out, rows.at(b, ch.seg) + ch.start, a, e, ch.len, init);
            init = false;
            continue;
          }
          gptr[n] = rows.at(b, ch.seg) + ch.start;
          aval[n] = a;
          ++n;
        }
        if (n > 0 || init) loops.axpy(out, gptr.data(), aval.data(), n, ch.len, init);
      }
    }
  }, &barrier);
}

// No clipping (weighted_aggregate without clip_norm): the factors are the weights, known
// before the norms, so one pass computes both, chunk by chunk over all rows (as a matrix-vector
// product does). A row found non-finite afterwards must not count: then the outputs are
// recomputed without it (a second pass, only in that rare case). The additions happen in the
// same order as run_two_pass, so both give identical results.
template <typename T>
void run_one_pass(const ClipProblem& p, const Layout& lay, const RowLoops<T>& loops) {
  using A = typename Storage<T>::acc;
  const int64_t B = p.rows, C = lay.C;
  const Rows<T> rows{p, !p.row_ptrs.empty()};
  constexpr int kGroup = 4;  // rows whose chunks stay in L1/L2 between the two loops
  const int nthreads = pick_threads(p, lay);
  std::vector<double> partial(static_cast<size_t>(B * C));
  std::vector<A> weight(B);
  std::vector<char> keep(B);
  for (int64_t b = 0; b < B; ++b) {
    weight[b] = static_cast<A>(p.row_scale ? p.row_scale[b] : 1.0);
    keep[b] = weight[b] != A(0);
  }
  std::atomic<bool> dropped{false};
  Barrier barrier;

  parallel_run(nthreads, [&](int t, int nt) {
    int64_t c0, c1;
    lay.share(t, nt, &c0, &c1);
    const T* gptr[kGroup];
    A aval[kGroup];
    // Super-tiles: runs of my chunks whose outputs fit in half of L2. Rows stream through a
    // super-tile in order (contiguous reads, few pages), its outputs stay in L2, and each
    // row group's chunks are read from memory once (the sum) and again from L1/L2 (the sums
    // of squares).
    auto accumulate = [&](int64_t cs, int64_t ce, bool with_norms) {
      bool first = true;
      for (int64_t r0 = 0; r0 < B; r0 += kGroup) {
        const int64_t r1 = std::min(B, r0 + kGroup);
        bool any = false;
        for (int64_t b = r0; b < r1; ++b) any = any || keep[b];
        if (!any && !first && !with_norms) continue;
        for (int64_t c = cs; c < ce; ++c) {
          const Chunk& ch = lay.chunks[c];
          int n = 0;
          for (int64_t b = r0; b < r1; ++b) {
            if (!keep[b]) continue;
            gptr[n] = rows.at(b, ch.seg) + ch.start;
            aval[n] = weight[b];
            ++n;
          }
          // the sum first: it reads kGroup rows at once (more memory parallelism than one
          // row's sum of squares), and leaves them in L1/L2 for the sums of squares
          if (n > 0 || first)
            loops.axpy(static_cast<A*>(p.out_ptrs[ch.seg]) + ch.start, gptr, aval, n, ch.len,
                       first);
          if (with_norms) {
            for (int64_t b = r0; b < r1; ++b)
              partial[b * C + c] = loops.sumsq_cached(rows.at(b, ch.seg) + ch.start, ch.len);
          }
        }
        if (any) first = false;
      }
      if (first) {  // no row contributed: the outputs still need their zeros
        for (int64_t c = cs; c < ce; ++c) {
          const Chunk& ch = lay.chunks[c];
          loops.axpy(static_cast<A*>(p.out_ptrs[ch.seg]) + ch.start, gptr, aval, 0, ch.len, true);
        }
      }
    };
    const int64_t super_elems = std::max<int64_t>(kChunk, (int64_t(256) << 10) / sizeof(A));
    auto for_super_tiles = [&](bool with_norms) {
      for (int64_t cs = c0; cs < c1;) {
        int64_t ce = cs, elems = 0;
        while (ce < c1 && (ce == cs || elems + lay.chunks[ce].len <= super_elems)) {
          elems += lay.chunks[ce].len;
          ++ce;
        }
        accumulate(cs, ce, with_norms);
        cs = ce;
      }
    };
    for_super_tiles(true);
    if (nt > 1) barrier.wait();
    if (t == 0) {
      const int L = static_cast<int>(p.seg_widths.size());
      std::vector<A> factor(L);
      std::vector<double> seg_norm(L);
      for (int64_t b = 0; b < B; ++b) {
        if (!row_factors(p, lay, rows, partial.data() + b * C, b, true, factor.data(), nullptr,
                         seg_norm.data()) &&
            keep[b]) {
          keep[b] = 0;
          dropped.store(true, std::memory_order_relaxed);
        }
      }
    }
    if (nt > 1) barrier.wait();
    if (dropped.load(std::memory_order_relaxed)) for_super_tiles(false);
  }, &barrier);
}

// The AVX2 build of the row loops is used when the CPU has AVX2, unless PPML_FAST_DISABLE_AVX2
// is set or the test hook (set_clip_simd) turned it off. Both builds give the same bits.
std::atomic<bool>& simd_flag() {
  static std::atomic<bool> on{avx2_on_by_default()};
  return on;
}

// Within the AVX2 build, float16 takes the F16C loops where the CPU has F16C, unless
// PPML_FAST_DISABLE_F16C is set or set_clip_f16c turned them off (the AVX2 build without F16C
// then runs). All builds give the same bits.
std::atomic<bool>& f16c_flag() {
  static std::atomic<bool> on{f16c_on_by_default()};
  return on;
}

// Whether the AVX-512 build of the row loops runs where isa_limit() allows AVX-512: on unless
// PPML_FAST_CLIP_AVX512=0 or set_clip_avx512 turned it off (all builds give the same bits). On
// this project's Zen 4 EPYC (double-pumped 512-bit units; 2026-12-07, one thread, same process,
// the second of two calls, builds alternating, 31 rounds, a busy host) it was as fast as the AVX2
// build: clipping (16, 65536) float32 min 0.247 vs 0.256 ms, float64 0.506 vs 0.407, bfloat16
// 0.405 vs 0.421; aggregation 0.216 vs 0.229 (float32), 0.435 vs 0.615 (float64). The sums of
// squares keep their 8 accumulators (the order that makes every build give the same bits): one
// zmm dependency chain where AVX2 has two ymm chains.
std::atomic<bool>& avx512_rows_flag() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("PPML_FAST_CLIP_AVX512");
    return !(env != nullptr && env[0] == '0');
  }()};
  return on;
}

template <typename T>
void run(const ClipProblem& p) {
  const Layout lay(p.seg_widths);
  const bool simd = simd_flag().load(std::memory_order_relaxed);
  const bool wide = use_avx512(simd) && avx512_rows_flag().load(std::memory_order_relaxed);
  const Isa isa = wide ? Isa::kAvx512 : (use_avx2(simd) ? Isa::kAvx2 : Isa::kPortable);
  const RowLoops<T> loops = row_loops<T>(isa, f16c_flag().load(std::memory_order_relaxed));
  if (p.mode == ClipMode::kNone && !p.per_layer) {
    run_one_pass<T>(p, lay, loops);
  } else {
    run_two_pass<T>(p, lay, loops);
  }
}

}  // namespace

bool set_clip_simd(bool enabled) { return simd_flag().exchange(enabled && cpu_has_avx2()); }
bool set_clip_avx512(bool enabled) { return avx512_rows_flag().exchange(enabled); }
bool set_clip_f16c(bool enabled) { return f16c_flag().exchange(enabled && cpu_has_f16c()); }

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

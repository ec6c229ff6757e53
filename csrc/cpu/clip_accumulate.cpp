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
// over 1e6 elements loses ~1e-4 relative, DESIGN.md).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>
#include <cmath>
#include <vector>

#include "../include/ppml/kernels.h"
#include "parallel.h"
#include "row_loops.h"

namespace ppml::cpu {
namespace {

struct Chunk {
  int seg;
  int64_t start;
  int64_t len;
};

// Bytes of rows per block of the two-pass kernel: PPML_FAST_BLOCK_BYTES when set (tests use it
// to force many blocks), else a quarter of the last-level cache read from sysfs (sysconf's
// _SC_LEVEL3_CACHE_SIZE reported 256 MiB for this VM's 32 MiB L3), else 8 MiB.
int64_t block_budget_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("PPML_FAST_BLOCK_BYTES")) {
      long long v = std::atoll(env);
      if (v > 0) return static_cast<int64_t>(v);
    }
    int64_t llc = 0;
    for (int index = 0; index < 8; ++index) {
      std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
      std::ifstream level_file(dir + "/level"), size_file(dir + "/size");
      int level = 0;
      std::string size;
      if (!(level_file >> level) || !(size_file >> size) || size.empty()) continue;
      int64_t v = std::atoll(size.c_str());
      const char unit = size.back();
      if (unit == 'K') v <<= 10;
      if (unit == 'M') v <<= 20;
      if (level >= 2 && v > llc) llc = v;
    }
    if (llc <= 0) llc = int64_t(32) << 20;
    return std::max<int64_t>(int64_t(1) << 20, llc / 4);
  }();
  return bytes;
}

// Column chunks of all segments, and the share of them that each thread owns.
struct Layout {
  std::vector<Chunk> chunks;
  std::vector<int64_t> chunk_begin_elems;  // elements before each chunk
  std::vector<int> seg_first_chunk;        // L + 1 entries
  int64_t total = 0;                       // elements per row
  int64_t C = 0;

  explicit Layout(const std::vector<int64_t>& widths) : seg_first_chunk(widths.size() + 1, 0) {
    for (size_t l = 0; l < widths.size(); ++l) {
      seg_first_chunk[l] = static_cast<int>(chunks.size());
      for (int64_t s = 0; s < widths[l]; s += kChunk) {
        chunks.push_back({static_cast<int>(l), s, std::min(kChunk, widths[l] - s)});
        chunk_begin_elems.push_back(total);
        total += chunks.back().len;
      }
    }
    seg_first_chunk[widths.size()] = static_cast<int>(chunks.size());
    C = static_cast<int64_t>(chunks.size());
  }

  // chunks [*c0, *c1) of thread t of nt, balanced by elements
  void share(int t, int nt, int64_t* c0, int64_t* c1) const {
    const int64_t e0 = total * t / nt, e1 = total * (t + 1) / nt;
    *c0 = std::lower_bound(chunk_begin_elems.begin(), chunk_begin_elems.end(), e0) -
          chunk_begin_elems.begin();
    *c1 = (t == nt - 1) ? C
                        : std::lower_bound(chunk_begin_elems.begin(), chunk_begin_elems.end(), e1) -
                              chunk_begin_elems.begin();
  }
};

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
// each segment into factor[0..L). Returns false when the row is dropped (a non-finite norm).
template <typename A>
bool row_factors(const ClipProblem& p, const Layout& lay, const double* partial_b, int64_t b,
                 bool write_norms, A* factor, double* seg_norm) {
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
  const double flat_norm = std::sqrt(flat);
  finite = finite && is_finite_double(flat_norm);
  if (write_norms) {
    if (p.per_layer) {
      for (int l = 0; l < L; ++l) p.norms[l * p.rows + b] = seg_norm[l];
    } else {
      p.norms[b] = flat_norm;
    }
  }
  const double scale = p.row_scale ? p.row_scale[b] : 1.0;
  for (int l = 0; l < L; ++l) {
    double f = 0.0;
    if (finite) {
      f = p.per_layer ? clip_factor(seg_norm[l], p.max_norms[l], p.mode, p.eps, p.gamma)
                      : clip_factor(flat_norm, p.max_norms[0], p.mode, p.eps, p.gamma);
    }
    factor[l] = static_cast<A>(scale * f);
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
        row_factors(p, lay, partial.data() + b * C, b, t == 0, factor.data() + (b - r0) * L,
                    seg_norm.data());
      // pass 2: add the block's rows into my chunks of the outputs, read from cache
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = lay.chunks[c];
        int n = 0;
        for (int64_t b = r0; b < r1; ++b) {
          const A a = factor[(b - r0) * L + ch.seg];
          if (a == A(0)) continue;
          gptr[n] = rows.at(b, ch.seg) + ch.start;
          aval[n] = a;
          ++n;
        }
        A* out = static_cast<A*>(p.out_ptrs[ch.seg]) + ch.start;
        loops.axpy(out, gptr.data(), aval.data(), n, ch.len, r0 == 0);
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
        if (!row_factors(p, lay, partial.data() + b * C, b, true, factor.data(), seg_norm.data()) &&
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

template <typename T>
void run(const ClipProblem& p) {
  const Layout lay(p.seg_widths);
  const RowLoops<T> loops = row_loops<T>(simd_flag().load(std::memory_order_relaxed),
                                         f16c_flag().load(std::memory_order_relaxed));
  if (p.mode == ClipMode::kNone && !p.per_layer) {
    run_one_pass<T>(p, lay, loops);
  } else {
    run_two_pass<T>(p, lay, loops);
  }
}

}  // namespace

bool set_clip_simd(bool enabled) { return simd_flag().exchange(enabled && cpu_has_avx2()); }
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

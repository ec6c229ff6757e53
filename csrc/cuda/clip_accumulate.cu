// CUDA kernel of clip_and_accumulate and weighted_aggregate:
//   out_l = sum_b scale_b * factor_b * g_{b,l},  factor_b from the L2 norm of row b.
//
// Same semantics as csrc/cpu/clip_accumulate.cpp, in four launches on the caller's stream:
//   1. chunk_sumsq_kernel: one block per (row b, column chunk c), sum of squares in double,
//      reduced in a fixed tree -> scratch[b * C + c];
//   2. row_norm_kernel: one thread per row, the flat norm sqrt(sum_c in order) -> norms[b]
//      (flat mode), copied into the row's L factor slots scratch[rows * C + b * L + l];
//   3. factor_kernel: one thread per (row, segment), the segment norm (-> norms[l * rows + b] in
//      per-layer mode) and the factor scale_b * clip_factor(...) -> its slot (0 for a row with a
//      non-finite norm);
//   4. accumulate_kernel: one thread per output column, adding rows b = 0..B-1 in order with
//      zero factors skipped, in float (float64 for float64 input).
// No floating-point atomics, so results are deterministic. Step 4 does exactly the CPU's
// arithmetic given the same factors; the sums of squares of step 1 are added in another order
// than the CPU's, so norms may differ from the CPU's in the last bits of a double.
//
// Segments (one per parameter tensor, possibly hundreds) travel in groups of kGroup by value,
// as a __grid_constant__ kernel parameter; the host loops over groups. Nothing is allocated on
// the device: outputs, norms and scratch come from Python.
#include <cuda_runtime.h>

#include <stdexcept>
#include <vector>

#include "../include/ppml/clip.h"
#include "../include/ppml/kernels.h"
#include "launch.h"

namespace ppml::cuda {
namespace {

constexpr int kGroup = 64;  // segments per launch (the table is ~3 KiB of kernel parameters)
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTile = kThreads;  // output columns per block in accumulate_kernel

// Segments first_seg .. first_seg + n - 1 of the problem.
struct SegGroup {
  int n = 0;
  int first_seg = 0;
  const void* in[kGroup];      // (rows, width) contiguous input of segment s
  void* out[kGroup];           // width outputs of the accumulation type
  int64_t width[kGroup];
  double max_norm[kGroup];     // the clipping norm that applies to segment s
  int64_t chunk0[kGroup + 1];  // global index of segment s's first chunk; chunk0[n] = end
  int64_t tile0[kGroup + 1];   // first column tile of segment s within the group; tile0[n] = total
};

// Per-problem values, the same for every launch.
struct RowArgs {
  int64_t rows;
  int64_t chunks;   // C, chunks of all segments
  int L;            // segments
  double* partial;  // scratch: rows * C sums of squares, row-major
  double* slots;    // scratch + rows * C: rows * L doubles, norm then factor of (b, l)
  double* norms;
  const double* row_scale;  // may be null (then 1)
  ClipMode mode;
  bool per_layer;
  double eps;
  double gamma;
};

// Sum of v over the block, valid in thread 0. The tree is fixed (warp shuffles, then one warp
// over the warp sums), so the result does not depend on timing.
__device__ __forceinline__ double block_sum(double v, double* warp_sums) {
PPML_UNROLL
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : 0.0;
PPML_UNROLL
    for (int o = kWarps / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // warp_sums is reused by the block's next item
  return v;
}

// 1. Block per (row, chunk) of this group, b-major so that consecutive blocks read consecutive
// memory; threads stride the chunk (coalesced), each squaring in double.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_sumsq_kernel(const __grid_constant__ SegGroup g, int64_t rows, int64_t C,
                       double* partial) {
  __shared__ double warp_sums[kWarps];
  const int64_t c_begin = g.chunk0[0];
  const int64_t nck = g.chunk0[g.n] - c_begin;
  PPML_BLOCK_STRIDE(item, rows * nck) {
    const int64_t b = item / nck;
    const int64_t c = c_begin + item % nck;
    const int s = find_owner(g.chunk0, g.n, c);
    const int64_t start = (c - g.chunk0[s]) * kChunk;
    const int64_t len = min(kChunk, g.width[s] - start);
    const T* x = static_cast<const T*>(g.in[s]) + b * g.width[s] + start;
    double acc = 0.0;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const double v = static_cast<double>(Storage<T>::load(x, i));
      acc += v * v;
    }
    acc = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) partial[b * C + c] = acc;
  }
}

// 2. Thread per row: the flat norm over all chunks, in chunk order (as the CPU).
__global__ void __launch_bounds__(kThreads) row_norm_kernel(const RowArgs r) {
  PPML_GRID_STRIDE(b, r.rows) {
    const double* pb = r.partial + b * r.chunks;
    double sum = 0.0;
    for (int64_t c = 0; c < r.chunks; ++c) sum += pb[c];
    const double norm = sqrt(sum);
    if (!r.per_layer) r.norms[b] = norm;
    double* slot = r.slots + b * r.L;
    for (int l = 0; l < r.L; ++l) slot[l] = norm;  // read back by factor_kernel
  }
}

// 3. Thread per (row, segment of this group): the segment norm and the row's factor for it.
// The CPU zeroes the row when the flat norm or any segment norm is non-finite; testing the
// flat norm and this segment's is the same test: chunk sums are >= 0 (or NaN), and rounding
// is monotonic, so the flat sum is >= every segment's sum and is NaN when any of them is.
__global__ void __launch_bounds__(kThreads)
    factor_kernel(const __grid_constant__ SegGroup g, const RowArgs r) {
  PPML_GRID_STRIDE(item, r.rows * g.n) {
    const int64_t b = item / g.n;
    const int s = static_cast<int>(item % g.n);
    const int l = g.first_seg + s;
    double* slot = r.slots + b * r.L + l;
    const double flat_norm = *slot;
    const double* pb = r.partial + b * r.chunks;
    double sum = 0.0;
    for (int64_t c = g.chunk0[s]; c < g.chunk0[s + 1]; ++c) sum += pb[c];
    const double seg_norm = sqrt(sum);
    if (r.per_layer) r.norms[l * r.rows + b] = seg_norm;
    double f = 0.0;
    if (is_finite_double(flat_norm) && is_finite_double(seg_norm))
      f = clip_factor(r.per_layer ? seg_norm : flat_norm, g.max_norm[s], r.mode, r.eps, r.gamma);
    const double scale = r.row_scale ? r.row_scale[b] : 1.0;
    *slot = scale * f;
  }
}

// 4. Block per tile of kTile columns of one segment, thread per column: out[j] = sum over rows
// in order of factor * g[b, j], factor rounded to the accumulation type first and rows whose
// factor is 0 skipped (0 * NaN would poison the sum), exactly as the CPU's axpy_rows.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const __grid_constant__ SegGroup g, const RowArgs r) {
  using A = typename Storage<T>::acc;
  PPML_BLOCK_STRIDE(t, g.tile0[g.n]) {
    const int s = find_owner(g.tile0, g.n, t);
    const int64_t w = g.width[s];
    const int64_t j = (t - g.tile0[s]) * kTile + threadIdx.x;
    if (j >= w) continue;
    const T* x = static_cast<const T*>(g.in[s]) + j;
    const double* factor = r.slots + (g.first_seg + s);  // factor of row b at [b * L]
    // -0 + y == y for every y, so starting from -0 equals starting from the first term (the
    // CPU's out = a0 * g0); an output with no contributing row is +0 as on the CPU.
    A acc = static_cast<A>(-0.0);
    bool any = false;
#pragma unroll 4
    for (int64_t b = 0; b < r.rows; ++b) {
      const A a = static_cast<A>(factor[b * r.L]);
      const A v = static_cast<A>(Storage<T>::load(x, b * w));  // loaded even if skipped: ILP
      if (a != A(0)) {
        acc = acc + a * v;
        any = true;
      }
    }
    static_cast<A*>(g.out[s])[j] = any ? acc : A(0);
  }
}

// The problem's segments in groups of at most kGroup, with chunk and tile prefixes.
std::vector<SegGroup> make_groups(const ClipProblem& p) {
  const int L = static_cast<int>(p.seg_widths.size());
  std::vector<SegGroup> groups;
  int64_t chunk = 0;
  for (int l = 0; l < L; ++l) {
    if (l % kGroup == 0) {
      groups.push_back(SegGroup{});
      groups.back().first_seg = l;
      groups.back().chunk0[0] = chunk;
      groups.back().tile0[0] = 0;
    }
    SegGroup& g = groups.back();
    const int s = g.n++;
    const int64_t w = p.seg_widths[l];
    g.in[s] = p.seg_ptrs[l];
    g.out[s] = p.out_ptrs[l];
    g.width[s] = w;
    g.max_norm[s] = p.per_layer ? p.max_norms[l] : p.max_norms[0];
    chunk += (w + kChunk - 1) / kChunk;
    g.chunk0[s + 1] = chunk;
    g.tile0[s + 1] = g.tile0[s] + (w + kTile - 1) / kTile;
  }
  return groups;
}

template <typename T>
void run(const ClipProblem& p, cudaStream_t stream) {
  const std::vector<SegGroup> groups = make_groups(p);
  RowArgs r{};
  r.rows = p.rows;
  r.chunks = num_chunks(p.seg_widths);
  r.L = static_cast<int>(p.seg_widths.size());
  r.partial = p.scratch;
  r.slots = p.scratch + p.rows * r.chunks;
  r.norms = p.norms;
  r.row_scale = p.row_scale;
  r.mode = p.mode;
  r.per_layer = p.per_layer;
  r.eps = p.eps;
  r.gamma = p.gamma;

  for (const SegGroup& g : groups) {
    const int64_t items = p.rows * (g.chunk0[g.n] - g.chunk0[0]);
    if (items == 0) continue;  // only empty segments
    chunk_sumsq_kernel<T><<<grid_for(items, 1), kThreads, 0, stream>>>(g, p.rows, r.chunks,
                                                                       r.partial);
    check_launch("chunk_sumsq_kernel");
  }
  row_norm_kernel<<<grid_for(p.rows), kThreads, 0, stream>>>(r);
  check_launch("row_norm_kernel");
  for (const SegGroup& g : groups) {
    factor_kernel<<<grid_for(p.rows * g.n), kThreads, 0, stream>>>(g, r);
    check_launch("factor_kernel");
  }
  for (const SegGroup& g : groups) {
    const int64_t tiles = g.tile0[g.n];
    if (tiles == 0) continue;
    accumulate_kernel<T><<<grid_for(tiles, 1), kThreads, 0, stream>>>(g, r);
    check_launch("accumulate_kernel");
  }
}

}  // namespace

bool available() { return true; }

void clip_accumulate(const ClipProblem& p) {
  if (p.rows == 0) return;  // the Python layer returns zeros without calling the kernel
  if (!p.row_ptrs.empty())
    throw std::invalid_argument("ppml_fast CUDA clip_accumulate: row pointer lists are CPU only");
  if (p.scratch == nullptr || p.norms == nullptr)
    throw std::invalid_argument(
        "ppml_fast CUDA clip_accumulate: scratch and norms must be device buffers; got null");
  DeviceGuard guard(p.device);
  const cudaStream_t stream = as_stream(p.stream);
  switch (p.dtype) {
    case DType::kFloat32: return run<float>(p, stream);
    case DType::kFloat64: return run<double>(p, stream);
    case DType::kFloat16: return run<Half>(p, stream);
    case DType::kBFloat16: return run<BFloat16>(p, stream);
  }
  throw std::invalid_argument("ppml_fast CUDA clip_accumulate: unknown dtype tag");
}

}  // namespace ppml::cuda

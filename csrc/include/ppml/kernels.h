// Host-side descriptions of the three kernels' inputs, and the entry points that the
// bindings call for each backend. Pointers are raw buffers owned and allocated by the caller
// (torch or numpy); nothing here allocates device memory.
#pragma once

#include <cstdint>
#include <vector>

#include "chacha.h"
#include "clip.h"
#include "common.h"

namespace ppml {

// Rows of a "segmented matrix": row b is the concatenation of segments l = 0..L-1, each of
// seg_widths[l] elements. Element (b, l, j) lives at seg_ptrs[l] + (b * seg_widths[l] + j)
// (contiguous (rows, width) tensors), or, when row_ptrs is not empty (then L == 1), at
// row_ptrs[b] + j (a list of flat tensors, CPU only).
struct ClipProblem {
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  std::vector<const void*> seg_ptrs;
  std::vector<int64_t> seg_widths;
  std::vector<const void*> row_ptrs;
  // Outputs: out_ptrs[l] has seg_widths[l] elements of the accumulation type (float for 16-
  // and 32-bit inputs, double for float64). norms has rows (flat) or L * rows (per layer)
  // doubles, layer-major.
  std::vector<void*> out_ptrs;
  double* norms = nullptr;
  const double* row_scale = nullptr;  // optional per-row weight, multiplies the clip factor
  ClipMode mode = ClipMode::kClip;
  bool per_layer = false;
  std::vector<double> max_norms;  // one value (flat) or one per segment (per layer)
  double eps = 1e-6;
  double gamma = 0.01;
  int num_threads = 1;
  // CUDA only: doubles of scratch, rows * (num_chunks + L) (see num_chunks below).
  double* scratch = nullptr;
  intptr_t stream = 0;
  int device = -1;
};

// Columns are processed in chunks of this many elements; a chunk never crosses a segment.
constexpr int64_t kChunk = 4096;

inline int64_t num_chunks(const std::vector<int64_t>& widths) {
  int64_t c = 0;
  for (int64_t w : widths) c += (w + kChunk - 1) / kChunk;
  return c;
}

struct NoiseTensor {
  void* ptr;
  int64_t numel;
  DType dtype;
};

struct NoiseProblem {
  std::vector<NoiseTensor> tensors;
  double stddev = 0.0;
  double denominator = 1.0;
  bool divide = false;  // noisy_scale_: x <- (x + std z) / denominator
  bool secure = false;
  uint64_t seed = 0;
  uint64_t offset = 0;  // first Philox block; tensor k starts after the blocks of tensors < k
  ChaCha20Key key{};    // secure mode
  int num_threads = 1;
  intptr_t stream = 0;
  int device = -1;
};

// Blocks (of two samples) that a tensor of n elements consumes.
inline uint64_t noise_blocks(int64_t numel) { return static_cast<uint64_t>(numel + 1) / 2; }

namespace cpu {
void clip_accumulate(const ClipProblem& p);
void gaussian_noise(const NoiseProblem& p);
// Test hook: turns the AVX2 path of the reproducible noise on (where the CPU has AVX2) or off
// (the portable path); returns the previous setting. Both give the same bits.
bool set_noise_simd(bool enabled);
// Test hook: the AVX2 (true, where the CPU has it) or the portable (false) build of the
// clipping kernel's row loops; returns the previous setting. Both give the same bits.
bool set_clip_simd(bool enabled);
// Test hooks: the F16C build of the float16 loops (true, where the CPU has AVX2 and F16C) or the
// AVX2 build without F16C (false), used while the AVX2 switch is on; return the previous setting.
bool set_clip_f16c(bool enabled);
bool set_noise_f16c(bool enabled);
}  // namespace cpu

namespace cuda {
bool available();  // compiled with CUDA
void clip_accumulate(const ClipProblem& p);
void gaussian_noise(const NoiseProblem& p);
}  // namespace cuda

}  // namespace ppml

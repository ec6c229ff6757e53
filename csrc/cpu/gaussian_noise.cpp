// CPU kernel of add_gaussian_noise_ and noisy_scale_: x <- (x + std * z) [/ denominator].
//
// Element i of tensor k gets sample (i & 1) of block first_block_k + i / 2 of the Philox
// stream (include/ppml/noise.h), so the numbers depend on (seed, offset, sizes) only: not on the
// thread count, the split into chunks, or the device. Threads take contiguous ranges of the
// concatenated block space.
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "../include/ppml/kernels.h"
#include "../include/ppml/noise.h"
#include "parallel.h"
#include "philox_x8.h"
#include "target.h"

namespace ppml::cpu {
namespace {

constexpr int kLanes = 8;  // blocks generated together (philox_x8 and a vector of Box-Muller)

// PPML_FAST_DISABLE_AVX2=1 forces the portable Philox (the tests compare both paths).
bool has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx2") && !std::getenv("PPML_FAST_DISABLE_AVX2");
  return yes;
#else
  return false;
#endif
}

template <typename T>
PPML_ALWAYS_INLINE void noise_range(T* x, int64_t numel, uint64_t first_block, uint64_t b0, uint64_t b1,
                 const NoiseProblem& p) {
  // local blocks [b0, b1) of this tensor
  double z[2 * kLanes];
  uint64_t b = b0;
  for (; b < b1; b += kLanes) {
    const int lanes = static_cast<int>(std::min<uint64_t>(kLanes, b1 - b));
    if (p.secure) {
      for (int v = 0; v < lanes; ++v)
        secure_normal_pair(p.key, static_cast<uint32_t>(first_block + b + v), &z[2 * v],
                           &z[2 * v + 1]);
    } else {
      uint32_t w[4][kLanes];
#ifdef PPML_HAVE_PHILOX_AVX2
      if (has_avx2()) {
        philox_x8_avx2(p.seed, p.offset + first_block + b, w);
      } else {
        philox_x8_scalar(p.seed, p.offset + first_block + b, w);
      }
#else
      philox_x8_scalar(p.seed, p.offset + first_block + b, w);
#endif
      double z0[kLanes], z1[kLanes];
      for (int v = 0; v < kLanes; ++v) box_muller(w[0][v], w[1][v], w[2][v], w[3][v], &z0[v], &z1[v]);
      for (int v = 0; v < kLanes; ++v) {
        z[2 * v] = z0[v];
        z[2 * v + 1] = z1[v];
      }
    }
    const int64_t e0 = static_cast<int64_t>(2 * b);
    const int64_t e1 = std::min<int64_t>(numel, e0 + 2 * lanes);
    for (int64_t e = e0; e < e1; ++e)
      apply_noise(x, e, z[e - e0], p.stddev, p.denominator, p.divide);
  }
}

PPML_TARGET_CLONES void noise_f32(float* x, int64_t n, uint64_t f, uint64_t b0, uint64_t b1,
                                  const NoiseProblem& p) {
  noise_range(x, n, f, b0, b1, p);
}
PPML_TARGET_CLONES void noise_f64(double* x, int64_t n, uint64_t f, uint64_t b0, uint64_t b1,
                                  const NoiseProblem& p) {
  noise_range(x, n, f, b0, b1, p);
}
PPML_TARGET_CLONES void noise_f16(Half* x, int64_t n, uint64_t f, uint64_t b0, uint64_t b1,
                                  const NoiseProblem& p) {
  noise_range(x, n, f, b0, b1, p);
}
PPML_TARGET_CLONES void noise_bf16(BFloat16* x, int64_t n, uint64_t f, uint64_t b0, uint64_t b1,
                                   const NoiseProblem& p) {
  noise_range(x, n, f, b0, b1, p);
}

void noise_tensor(const NoiseTensor& t, uint64_t first, uint64_t b0, uint64_t b1,
                  const NoiseProblem& p) {
  switch (t.dtype) {
    case DType::kFloat32: return noise_f32(static_cast<float*>(t.ptr), t.numel, first, b0, b1, p);
    case DType::kFloat64: return noise_f64(static_cast<double*>(t.ptr), t.numel, first, b0, b1, p);
    case DType::kFloat16: return noise_f16(static_cast<Half*>(t.ptr), t.numel, first, b0, b1, p);
    case DType::kBFloat16:
      return noise_bf16(static_cast<BFloat16*>(t.ptr), t.numel, first, b0, b1, p);
  }
}

}  // namespace

void gaussian_noise(const NoiseProblem& p) {
  // first block of each tensor, relative to the stream's start (offset, or 0 in secure mode)
  std::vector<uint64_t> first(p.tensors.size() + 1, 0);
  for (size_t k = 0; k < p.tensors.size(); ++k)
    first[k + 1] = first[k] + noise_blocks(p.tensors[k].numel);
  const uint64_t total = first.back();
  if (total == 0) return;
  int nthreads = p.num_threads;
  if (total < 8192) nthreads = 1;
  parallel_run(nthreads, [&](int t, int nt) {
    // this thread's share [g0, g1) of the concatenated blocks, aligned to kLanes
    uint64_t g0 = total * t / nt / kLanes * kLanes;
    uint64_t g1 = (t == nt - 1) ? total : total * (t + 1) / nt / kLanes * kLanes;
    for (size_t k = 0; k < p.tensors.size() && g0 < g1; ++k) {
      uint64_t lo = std::max(g0, first[k]), hi = std::min(g1, first[k + 1]);
      if (lo >= hi) continue;
      noise_tensor(p.tensors[k], first[k], lo - first[k], hi - first[k], p);
    }
  });
}

}  // namespace ppml::cpu

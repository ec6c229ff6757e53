// CUDA kernel of add_gaussian_noise_ and noisy_scale_: x <- (x + std * z) [/ denominator].
//
// Same numbers as csrc/cpu/gaussian_noise.cpp, bit for bit: element i of tensor k gets sample
// (i & 1) of Philox block offset + first_k + i / 2, where first_k is the blocks of the tensors
// before k (secure mode: ChaCha20 block offset + first_k + i / 2, with a fresh key). The sampler and the update
// are the PPML_HD functions of include/ppml/noise.h, built with --fmad=false so every double
// operation rounds as on the CPU; which thread computes a block does not matter.
//
// Mapping: one thread per Philox/ChaCha block (two adjacent elements), grid-stride over the
// concatenated blocks of a group of up to kGroup tensors of one dtype. The group's table
// (pointers, sizes, first blocks) is a __grid_constant__ kernel parameter; the host loops over
// groups, all on the caller's stream, without synchronising.
#include <cuda_runtime.h>

#include <vector>

#include "../include/ppml/kernels.h"
#include "../include/ppml/noise.h"
#include "launch.h"

namespace ppml::cuda {
namespace {

constexpr int kGroup = 64;  // tensors per launch (the table is ~2 KiB of kernel parameters)

struct NoiseGroup {
  int n = 0;                     // tensors in this group
  void* ptr[kGroup];             // tensor data, all of one dtype
  int64_t numel[kGroup];
  uint64_t first[kGroup];        // first block of each tensor, from the start of the stream
  uint64_t local[kGroup + 1];    // prefix of blocks within the group: local[n] = group total
};

struct NoiseArgs {
  uint64_t seed;
  uint64_t offset;
  ChaCha20Key key;
  double stddev;
  double denominator;
  bool divide;
};

// Thread q of the group's blocks: find its tensor, draw the pair, update one or two elements.
template <typename T, bool kSecure>
__global__ void __launch_bounds__(kThreads)
    gaussian_noise_kernel(const __grid_constant__ NoiseGroup g, const __grid_constant__ NoiseArgs a) {
  const int64_t total = static_cast<int64_t>(g.local[g.n]);
  PPML_GRID_STRIDE(q, total) {
    const int k = find_owner(g.local, g.n, static_cast<uint64_t>(q));
    const uint64_t block = static_cast<uint64_t>(q) - g.local[k];  // block within tensor k
    double z0, z1;
    if constexpr (kSecure) {
      // 64-bit block index (a nonce per 2^32 blocks, include/ppml/chacha.h)
      secure_normal_pair(a.key, a.offset + g.first[k] + block, &z0, &z1);
    } else {
      philox_normal_pair(a.seed, a.offset + g.first[k] + block, &z0, &z1);
    }
    T* x = static_cast<T*>(g.ptr[k]);
    const int64_t e = static_cast<int64_t>(2 * block);
    apply_noise(x, e, z0, a.stddev, a.denominator, a.divide);
    if (e + 1 < g.numel[k]) apply_noise(x, e + 1, z1, a.stddev, a.denominator, a.divide);
  }
}

template <typename T>
void launch_group(const NoiseGroup& g, const NoiseArgs& a, bool secure, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(g.local[g.n]);
  if (total == 0) return;
  if (secure) {
    gaussian_noise_kernel<T, true><<<grid_for(total), kThreads, 0, stream>>>(g, a);
    check_launch("gaussian_noise_kernel (secure)");
  } else {
    gaussian_noise_kernel<T, false><<<grid_for(total), kThreads, 0, stream>>>(g, a);
    check_launch("gaussian_noise_kernel");
  }
}

void launch_group_any(DType dtype, const NoiseGroup& g, const NoiseArgs& a, bool secure,
                      cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_group<float>(g, a, secure, stream);
    case DType::kFloat64: return launch_group<double>(g, a, secure, stream);
    case DType::kFloat16: return launch_group<Half>(g, a, secure, stream);
    case DType::kBFloat16: return launch_group<BFloat16>(g, a, secure, stream);
  }
  throw std::invalid_argument("ppml_fast CUDA gaussian_noise: unknown dtype tag");
}

}  // namespace

void gaussian_noise(const NoiseProblem& p) {
  NoiseArgs a{};
  a.seed = p.seed;
  a.offset = p.offset;
  a.key = p.key;
  a.stddev = p.stddev;
  a.denominator = p.denominator;
  a.divide = p.divide;

  uint64_t total = 0;
  for (const NoiseTensor& t : p.tensors) total += noise_blocks(t.numel);
  if (total == 0) return;  // nothing to draw: no device touched

  DeviceGuard guard(p.device);
  const cudaStream_t stream = as_stream(p.stream);

  // Groups: runs of consecutive non-empty tensors of one dtype, at most kGroup each. first_k
  // counts the blocks of every earlier tensor (all dtypes), as on the CPU.
  NoiseGroup g{};
  DType group_dtype = DType::kFloat32;
  uint64_t first = 0;
  for (const NoiseTensor& t : p.tensors) {
    const uint64_t blocks = noise_blocks(t.numel);
    if (blocks > 0) {
      if (g.n > 0 && (g.n == kGroup || t.dtype != group_dtype)) {
        launch_group_any(group_dtype, g, a, p.secure, stream);
        g.n = 0;
      }
      if (g.n == 0) {
        group_dtype = t.dtype;
        g.local[0] = 0;
      }
      g.ptr[g.n] = t.ptr;
      g.numel[g.n] = t.numel;
      g.first[g.n] = first;
      g.local[g.n + 1] = g.local[g.n] + blocks;
      ++g.n;
    }
    first += blocks;
  }
  if (g.n > 0) launch_group_any(group_dtype, g, a, p.secure, stream);
}

}  // namespace ppml::cuda

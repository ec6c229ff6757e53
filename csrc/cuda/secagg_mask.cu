// CUDA kernel of secagg_mask_: x[i] <- x[i] + sum_s sign_s * ChaCha20(seed_s)[i]  (mod 2^32).
//
// Same words as csrc/cpu/secagg_mask.cpp (the stream is fixed by include/ppml/secagg.h and the
// block function is the PPML_HD one of chacha.h): integer maths only, so CPU and GPU agree bit
// for bit. One thread per ChaCha20 block (16 elements) sums the masks of all seeds in registers
// and adds them to x once. The seeds (32 bytes each) and signs live in device memory; each
// thread block stages them in shared memory, kTile seeds at a time.
#include <cuda_runtime.h>

#include "../include/ppml/secagg.h"
#include "launch.h"

namespace ppml::cuda {
namespace {

constexpr int kTile = 64;  // seeds staged per step: 64 * (32 + 1) bytes of shared memory

__global__ void __launch_bounds__(kThreads)
    secagg_mask_kernel(uint32_t* __restrict__ x, int64_t n, const uint8_t* __restrict__ seeds,
                       const int8_t* __restrict__ signs, int64_t num_seeds) {
  __shared__ ChaCha20Key keys[kTile];
  __shared__ int8_t sign[kTile];
  const int64_t blocks = (n + 15) / 16;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // The trip count depends on blockIdx only, so every thread of a block reaches the barriers.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < blocks; base += stride) {
    const int64_t b = base + threadIdx.x;
    uint32_t acc[16];
#pragma unroll
    for (int w = 0; w < 16; ++w) acc[w] = 0u;
    for (int64_t t0 = 0; t0 < num_seeds; t0 += kTile) {
      const int tile = static_cast<int>(num_seeds - t0 < kTile ? num_seeds - t0 : kTile);
      __syncthreads();  // the previous tile is no longer read
      for (int s = threadIdx.x; s < tile; s += blockDim.x) {
        keys[s] = secagg_key(seeds + 32 * (t0 + s));
        sign[s] = signs[t0 + s];
      }
      __syncthreads();
      if (b < blocks) {
        for (int s = 0; s < tile; ++s) {
          uint32_t out[16];
          chacha20_block(keys[s], static_cast<uint32_t>(b), out);
          if (sign[s] < 0) {
#pragma unroll
            for (int w = 0; w < 16; ++w) acc[w] -= out[w];
          } else {
#pragma unroll
            for (int w = 0; w < 16; ++w) acc[w] += out[w];
          }
        }
      }
    }
    if (b < blocks) {
      const int64_t e0 = 16 * b;
      if (e0 + 16 <= n) {
#pragma unroll
        for (int w = 0; w < 16; ++w) x[e0 + w] += acc[w];
      } else {
        for (int w = 0; w < n - e0; ++w) x[e0 + w] += acc[w];
      }
    }
  }
}

}  // namespace

void secagg_mask(const SecAggMaskProblem& p) {
  if (p.n <= 0 || p.num_seeds <= 0) return;  // nothing to add: no device touched
  DeviceGuard guard(p.device);
  const int64_t blocks = (p.n + 15) / 16;
  secagg_mask_kernel<<<grid_for(blocks), kThreads, 0, as_stream(p.stream)>>>(
      p.x, p.n, p.seeds, p.signs, p.num_seeds);
  check_launch("secagg_mask_kernel");
}

}  // namespace ppml::cuda

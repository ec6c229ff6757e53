// Helpers shared by the CUDA kernel files: the device guard, the stream of the caller, grid
// sizes for grid-stride loops, a launch check after every launch, and the prefix search that
// maps a work item to the tensor it belongs to.
//
// Tables of tensors (pointers, sizes) travel to the kernels by value, as kernel parameters
// marked __grid_constant__ (compute capability >= 7.0): the kernels index them directly in
// parameter memory, no per-thread copy, and nothing is allocated on the device for them.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace ppml::cuda {

constexpr int kThreads = 256;          // threads per block in every kernel here
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

// Throws std::runtime_error naming the call and CUDA's message when err is not cudaSuccess.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ppml_fast CUDA: ") + what + " failed: " +
                             cudaGetErrorString(err));
}

// After every launch: a bad configuration or an earlier asynchronous fault shows here. It does
// not synchronise, so faults inside the kernel surface at the caller's next synchronisation.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Makes `device` current for the lifetime of the guard and restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    if (device < 0) throw std::invalid_argument("ppml_fast CUDA: device index must be >= 0");
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);  // no throw from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = -1;
};

// torch's current stream, passed from Python as an integer.
inline cudaStream_t as_stream(intptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Blocks for `items` work items of `per_block` each, at least 1 and at most kMaxBlocks.
inline unsigned grid_for(int64_t items, int64_t per_block = kThreads) {
  int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

// Index i in [0, n) of the last entry with prefix[i] <= q, for a non-decreasing prefix with
// prefix[0] <= q < prefix[n]: the tensor that owns item q (empty tensors are stepped over).
template <typename I>
__device__ __forceinline__ int find_owner(const I* prefix, int n, I q) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= q) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace ppml::cuda

// for (int64_t i = first thread index; i < n; i += all threads of the grid)
#define PPML_GRID_STRIDE(i, n)                                                             \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// for (int64_t i = this block's index; i < n; i += blocks of the grid): one item per block
#define PPML_BLOCK_STRIDE(i, n) \
  for (int64_t i = blockIdx.x; i < (n); i += gridDim.x)

// Built instead of csrc/cuda/ when CMake finds no nvcc (or PPML_WITH_CUDA=OFF): CUDA entry
// points exist and raise a clear error.
#include <stdexcept>

#include "include/ppml/kernels.h"
#include "include/ppml/secagg.h"

namespace ppml::cuda {

namespace {
[[noreturn]] void unavailable() {
  throw std::runtime_error(
      "ppml_fast was built without CUDA support, so it cannot run on a CUDA tensor. Rebuild with "
      "nvcc on PATH and PPML_WITH_CUDA=ON (pip install . with that environment variable set), or "
      "move the tensors to the CPU.");
}
}  // namespace

bool available() { return false; }
void clip_accumulate(const ClipProblem&) { unavailable(); }
void gaussian_noise(const NoiseProblem&) { unavailable(); }
void secagg_mask(const SecAggMaskProblem&) { unavailable(); }

}  // namespace ppml::cuda

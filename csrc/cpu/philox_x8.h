// Philox4x32-10 for 8 consecutive counters at once: the portable path of the CPU noise kernel
// (the AVX2 path, noise_avx2.h, has its own vector Philox). Integer maths only: the words are
// exactly those of Philox4x32::at (tests compare the noise with a numpy Philox).
#pragma once

#include <cstdint>

#include "../include/ppml/philox.h"

namespace ppml::cpu {

// w[j][v] = word j of Philox block index + v, v = 0..7 (portable version).
inline void philox_x8_scalar(uint64_t seed, uint64_t index, uint32_t w[4][8]) {
  for (int v = 0; v < 8; ++v) {
    uint32_t out[4];
    Philox4x32::at(seed, index + v, out);
    for (int j = 0; j < 4; ++j) w[j][v] = out[j];
  }
}

}  // namespace ppml::cpu

// Philox4x32-10 counter-based generator (Salmon, Moraes, Dror, Shaw, "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011, Fig. 2 and Table 2): a bijection of a 128-bit counter keyed by
// 64 bits. Pure integer maths, so the CPU and the GPU produce identical words.
#pragma once

#include "common.h"

namespace ppml {

struct Philox4x32 {
  static constexpr uint32_t kM0 = 0xD2511F53u;
  static constexpr uint32_t kM1 = 0xCD9E8D57u;
  static constexpr uint32_t kW0 = 0x9E3779B9u;
  static constexpr uint32_t kW1 = 0xBB67AE85u;

  // out = Philox4x32-10(counter = (c0, c1, c2, c3), key = (k0, k1))
  PPML_HD static void block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1, uint32_t out[4]) {
PPML_UNROLL
    for (int r = 0; r < 10; ++r) {
      uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
      uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
      uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
      uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
      c0 = hi1 ^ c1 ^ k0;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ k1;
      c3 = lo0;
      k0 += kW0;
      k1 += kW1;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
  }

  // The stream used by the noise ops: key = seed, counter = (block index, 0).
  PPML_HD static void at(uint64_t seed, uint64_t index, uint32_t out[4]) {
    block(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u,
          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), out);
  }
};

}  // namespace ppml

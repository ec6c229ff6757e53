// Pairwise masks of secure aggregation (Bonawitz et al., "Practical Secure Aggregation for
// Privacy-Preserving Machine Learning", CCS 2017, section 4: masks are PRG(seed) expanded over
// the ring Z_{2^32}): x[i] <- x[i] + sum_s sign_s * ks_s[i]  (mod 2^32), in place.
//
// ks_s is the ChaCha20 keystream (RFC 8439, section 2.4) of the 256-bit seed s used as the key,
// the all-zero nonce and block counter 0, 1, 2, ...: element i is word i % 16 of block i / 16,
// the words read little-endian as in the RFC. A seed must therefore key one stream only (the
// protocol derives fresh seeds every round). At most 2^32 blocks: n <= 2^36 elements.
#pragma once

#include <cstdint>

#include "chacha.h"
#include "common.h"

namespace ppml {

struct SecAggMaskProblem {
  uint32_t* x = nullptr;          // n ring elements (int32 storage viewed as uint32)
  int64_t n = 0;
  const uint8_t* seeds = nullptr;  // num_seeds * 32 bytes (device memory for CUDA)
  const int8_t* signs = nullptr;   // num_seeds values, each +1 or -1 (device memory for CUDA)
  int64_t num_seeds = 0;
  int num_threads = 1;
  intptr_t stream = 0;
  int device = -1;
};

// Largest n: the 32-bit block counter covers 2^32 blocks of 16 words.
constexpr int64_t kSecAggMaxElements = int64_t{1} << 36;

// The ChaCha20 key of a 32-byte seed (RFC 8439 2.3: the key is read as 8 little-endian words).
PPML_HD ChaCha20Key secagg_key(const uint8_t* seed) {
  ChaCha20Key k{};
  for (int i = 0; i < 8; ++i)
    k.key[i] = static_cast<uint32_t>(seed[4 * i]) | (static_cast<uint32_t>(seed[4 * i + 1]) << 8) |
               (static_cast<uint32_t>(seed[4 * i + 2]) << 16) |
               (static_cast<uint32_t>(seed[4 * i + 3]) << 24);
  k.nonce[0] = k.nonce[1] = k.nonce[2] = 0;
  return k;
}

namespace cpu {
void secagg_mask(const SecAggMaskProblem& p);
// Test hook: the AVX2 path (where the CPU has AVX2) or the portable one; returns the previous
// setting. Both give the same words.
bool set_secagg_simd(bool enabled);
}  // namespace cpu

namespace cuda {
void secagg_mask(const SecAggMaskProblem& p);
}  // namespace cuda

}  // namespace ppml

// CPU kernel of secagg_mask_: x[i] <- x[i] + sum_s sign_s * ChaCha20(seed_s)[i]  (mod 2^32).
//
// The keystream and its layout are fixed by include/ppml/secagg.h, so the result depends on the
// inputs only (not on the thread count or the chunking). Mask expansion is the hot loop of
// secure aggregation (one keystream word per element per seed), so:
// - ChaCha20 runs on eight consecutive blocks at once, one 8-lane vector per state word (GCC
//   vector extensions), compiled for AVX2 (rotations by 16 and 8 as byte shuffles) and for the
//   baseline ISA, picked at load time;
// - each work item is a chunk of kChunkBlocks blocks; the masks of all seeds are summed into a
//   chunk accumulator kept in the vector layout (word-major, 16 KiB, in L1), and transposed into
//   x once per chunk, so the transposition costs nothing per seed;
// - threads take chunks from a shared counter (as the noise kernel does), on torch's team.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "../include/ppml/secagg.h"
#include "parallel.h"
#include "target.h"  // PPML_ALWAYS_INLINE, avx2_on_by_default

namespace ppml::cpu {
namespace {

constexpr int kLanes = 8;                // ChaCha20 blocks per vector step
constexpr int64_t kChunkBlocks = 256;    // blocks per work item: 4096 words
constexpr int kGroups = static_cast<int>(kChunkBlocks / kLanes);

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x32 __attribute__((vector_size(32)));

// Byte permutations that rotate each 32-bit lane left by 16 and by 8 (one vpshufb with AVX2,
// instead of two shifts and an or).
constexpr u8x32 kRot16 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13,
                          18, 19, 16, 17, 22, 23, 20, 21, 26, 27, 24, 25, 30, 31, 28, 29};
constexpr u8x32 kRot8 = {3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14,
                         19, 16, 17, 18, 23, 20, 21, 22, 27, 24, 25, 26, 31, 28, 29, 30};

// Macros, not functions: a vector passed by value outside the target function changes ABI.
#define PPML_SPLAT(v) (u32x8{} + (v))
#define PPML_ROTL(v, c) (((v) << (c)) | ((v) >> (32 - (c))))
#if defined(__GNUC__) && !defined(__clang__)
#define PPML_ROTL_BYTES(v, c, perm) \
  (kBytePerm ? reinterpret_cast<u32x8>(__builtin_shuffle(reinterpret_cast<u8x32>(v), perm)) \
             : PPML_ROTL(v, c))
#else
#define PPML_ROTL_BYTES(v, c, perm) PPML_ROTL(v, c)
#endif

#define PPML_QR8(a, b, c, d)                                    \
  x[a] += x[b]; x[d] = PPML_ROTL_BYTES(x[d] ^ x[a], 16, kRot16); \
  x[c] += x[d]; x[b] = PPML_ROTL(x[b] ^ x[c], 12);               \
  x[a] += x[b]; x[d] = PPML_ROTL_BYTES(x[d] ^ x[a], 8, kRot8);   \
  x[c] += x[d]; x[b] = PPML_ROTL(x[b] ^ x[c], 7);

// ks[w][l] = word w of the ChaCha20 block with counter `counter + l` (RFC 8439 2.3.1), l < 8:
// the same words as ppml::chacha20_block, eight blocks per call. kBytePerm: rotate by 16 and 8
// with byte shuffles (only where the target has a byte shuffle, i.e. AVX2).
template <bool kBytePerm>
PPML_ALWAYS_INLINE void chacha20_x8(const ChaCha20Key& k, uint32_t counter, u32x8 ks[16]) {
  const uint32_t s[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                          k.key[0],    k.key[1],    k.key[2],    k.key[3],
                          k.key[4],    k.key[5],    k.key[6],    k.key[7],
                          counter,     k.nonce[0],  k.nonce[1],  k.nonce[2]};
  const u32x8 lane = {0u, 1u, 2u, 3u, 4u, 5u, 6u, 7u};
  u32x8 x[16];
  for (int i = 0; i < 16; ++i) x[i] = PPML_SPLAT(s[i]);
  x[12] += lane;
  for (int r = 0; r < 10; ++r) {
    PPML_QR8(0, 4, 8, 12)
    PPML_QR8(1, 5, 9, 13)
    PPML_QR8(2, 6, 10, 14)
    PPML_QR8(3, 7, 11, 15)
    PPML_QR8(0, 5, 10, 15)
    PPML_QR8(1, 6, 11, 12)
    PPML_QR8(2, 7, 8, 13)
    PPML_QR8(3, 4, 9, 14)
  }
  for (int i = 0; i < 16; ++i) ks[i] = x[i] + PPML_SPLAT(s[i]);
  ks[12] += lane;
}

#undef PPML_QR8

// Blocks [b0, b0 + nb) of x (nb <= kChunkBlocks): every seed's mask added with its sign.
template <bool kBytePerm>
PPML_ALWAYS_INLINE void mask_chunk_impl(uint32_t* x, int64_t n, int64_t b0, int64_t nb,
                                        const std::vector<ChaCha20Key>& keys,
                                        const int8_t* signs) {
  alignas(64) u32x8 acc[kGroups][16];
  const int groups = static_cast<int>((nb + kLanes - 1) / kLanes);
  for (int g = 0; g < groups; ++g)
    for (int w = 0; w < 16; ++w) acc[g][w] = u32x8{};
  for (size_t s = 0; s < keys.size(); ++s) {
    u32x8 ks[16];
    if (signs[s] < 0) {
      for (int g = 0; g < groups; ++g) {
        chacha20_x8<kBytePerm>(keys[s], static_cast<uint32_t>(b0 + kLanes * g), ks);
        for (int w = 0; w < 16; ++w) acc[g][w] -= ks[w];
      }
    } else {
      for (int g = 0; g < groups; ++g) {
        chacha20_x8<kBytePerm>(keys[s], static_cast<uint32_t>(b0 + kLanes * g), ks);
        for (int w = 0; w < 16; ++w) acc[g][w] += ks[w];
      }
    }
  }
  // Transpose into x: element 16 * (b0 + 8 g + l) + w gets acc[g][w][l].
  const uint32_t* a = reinterpret_cast<const uint32_t*>(acc);
  for (int g = 0; g < groups; ++g) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t e0 = 16 * (b0 + kLanes * g + l);
      if (e0 >= n) return;
      const uint32_t* src = a + (g * 16) * kLanes + l;
      uint32_t* dst = x + e0;
      if (e0 + 16 <= n) {
        for (int w = 0; w < 16; ++w) dst[w] += src[w * kLanes];
      } else {
        for (int w = 0; w < n - e0; ++w) dst[w] += src[w * kLanes];
      }
    }
  }
}

#undef PPML_ROTL_BYTES
#undef PPML_ROTL
#undef PPML_SPLAT

using MaskChunkFn = void (*)(uint32_t*, int64_t, int64_t, int64_t,
                             const std::vector<ChaCha20Key>&, const int8_t*);

void mask_chunk_portable(uint32_t* x, int64_t n, int64_t b0, int64_t nb,
                         const std::vector<ChaCha20Key>& keys, const int8_t* signs) {
  mask_chunk_impl<false>(x, n, b0, nb, keys, signs);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("avx2"))) void mask_chunk_avx2(uint32_t* x, int64_t n, int64_t b0,
                                                     int64_t nb,
                                                     const std::vector<ChaCha20Key>& keys,
                                                     const int8_t* signs) {
  mask_chunk_impl<true>(x, n, b0, nb, keys, signs);
}
#endif

// AVX2 (byte-shuffle rotations) where the CPU has it, unless PPML_FAST_DISABLE_AVX2 is set or
// the test hook turned it off; the portable vector code elsewhere. Both compute the same words.
std::atomic<bool>& simd_flag() {
  static std::atomic<bool> on{avx2_on_by_default()};
  return on;
}

MaskChunkFn pick_mask_chunk() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (simd_flag().load(std::memory_order_relaxed)) return mask_chunk_avx2;
#endif
  return mask_chunk_portable;
}

}  // namespace

bool set_secagg_simd(bool enabled) { return simd_flag().exchange(enabled && cpu_has_avx2()); }

void secagg_mask(const SecAggMaskProblem& p) {
  if (p.n <= 0 || p.num_seeds <= 0) return;
  std::vector<ChaCha20Key> keys(static_cast<size_t>(p.num_seeds));
  for (int64_t s = 0; s < p.num_seeds; ++s) keys[s] = secagg_key(p.seeds + 32 * s);
  const int64_t blocks = (p.n + 15) / 16;
  const int64_t chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;
  // below ~64 K keystream words a second thread costs more than it saves
  int nthreads = p.num_threads;
  if (p.n * p.num_seeds < (int64_t{1} << 16) || chunks < 2) nthreads = 1;
  const MaskChunkFn mask_chunk = pick_mask_chunk();
  std::atomic<int64_t> next{0};
  parallel_run(nthreads, [&](int, int) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t b0 = c * kChunkBlocks;
      mask_chunk(p.x, p.n, b0, std::min(kChunkBlocks, blocks - b0), keys, p.signs);
    }
  });
}

}  // namespace ppml::cpu

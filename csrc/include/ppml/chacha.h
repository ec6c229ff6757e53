// ChaCha20 block function (RFC 8439, section 2.3): the cryptographically secure generator behind
// `secure=True`. Keyed from os.urandom by the Python layer; counter-based like Philox, so it
// parallelises the same way (one 512-bit block per counter value).
#pragma once

#include "common.h"

namespace ppml {

struct ChaCha20Key {
  uint32_t key[8];
  uint32_t nonce[3];
};

PPML_HD uint32_t rotl32(uint32_t v, int c) { return (v << c) | (v >> (32 - c)); }

#define PPML_CHACHA_QR(a, b, c, d) \
  a += b; d ^= a; d = rotl32(d, 16); \
  c += d; b ^= c; b = rotl32(b, 12); \
  a += b; d ^= a; d = rotl32(d, 8);  \
  c += d; b ^= c; b = rotl32(b, 7);

// out = ChaCha20 block (RFC 8439 2.3.1) for the given 32-bit block counter, as 16 words.
PPML_HD void chacha20_block(const ChaCha20Key& k, uint32_t counter, uint32_t out[16]) {
  uint32_t s[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                    k.key[0],    k.key[1],    k.key[2],    k.key[3],
                    k.key[4],    k.key[5],    k.key[6],    k.key[7],
                    counter,     k.nonce[0],  k.nonce[1],  k.nonce[2]};
  uint32_t x[16];
PPML_UNROLL
  for (int i = 0; i < 16; ++i) x[i] = s[i];
PPML_UNROLL
  for (int i = 0; i < 10; ++i) {
    PPML_CHACHA_QR(x[0], x[4], x[8], x[12])
    PPML_CHACHA_QR(x[1], x[5], x[9], x[13])
    PPML_CHACHA_QR(x[2], x[6], x[10], x[14])
    PPML_CHACHA_QR(x[3], x[7], x[11], x[15])
    PPML_CHACHA_QR(x[0], x[5], x[10], x[15])
    PPML_CHACHA_QR(x[1], x[6], x[11], x[12])
    PPML_CHACHA_QR(x[2], x[7], x[8], x[13])
    PPML_CHACHA_QR(x[3], x[4], x[9], x[14])
  }
PPML_UNROLL
  for (int i = 0; i < 16; ++i) out[i] = x[i] + s[i];
}

#undef PPML_CHACHA_QR

}  // namespace ppml

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

// The ChaCha20 block function (RFC 8439 2.3.1) on block counter `counter` and nonce
// (nonce0, k.nonce[1], k.nonce[2]), as 16 words.
PPML_HD void chacha20_block_nonce(const ChaCha20Key& k, uint32_t counter, uint32_t nonce0,
                                  uint32_t out[16]) {
  uint32_t s[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                    k.key[0],    k.key[1],    k.key[2],    k.key[3],
                    k.key[4],    k.key[5],    k.key[6],    k.key[7],
                    counter,     nonce0,      k.nonce[1],  k.nonce[2]};
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

// out = ChaCha20 block (RFC 8439 2.3.1) for the given 32-bit block counter, as 16 words.
PPML_HD void chacha20_block(const ChaCha20Key& k, uint32_t counter, uint32_t out[16]) {
  chacha20_block_nonce(k, counter, k.nonce[0], out);
}

// Block `index` of a stream of up to 2^64 blocks: the RFC 8439 block with counter
// index mod 2^32 and nonce word 0 = k.nonce[0] + floor(index / 2^32) (mod 2^32), i.e. a fresh
// nonce for every 2^32 blocks (RFC 8439 2.3: the counter is 32-bit; "a nonce per 2^32 blocks"
// keeps every (counter, nonce) pair distinct for distinct index < 2^64, so no block repeats).
// For index < 2^32 it is chacha20_block(k, index). Equivalently, words 12-13 form a 64-bit
// counter starting at k.nonce[0] * 2^32 whose carry out of word 13 is dropped.
PPML_HD void chacha20_block64(const ChaCha20Key& k, uint64_t index, uint32_t out[16]) {
  chacha20_block_nonce(k, static_cast<uint32_t>(index),
                       k.nonce[0] + static_cast<uint32_t>(index >> 32), out);
}

}  // namespace ppml

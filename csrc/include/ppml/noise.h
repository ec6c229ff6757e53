// The element -> sample maps of the noise ops, shared by the CPU and CUDA kernels.
//
// Reproducible stream (secure = false): element i of a tensor whose stream starts at block b
// gets sample (i & 1) of Box-Muller(Philox4x32-10(key = seed, counter = b + i / 2)).
// Secure stream: ChaCha20 block offset + b + i / 2 (a fresh key per call; the offset only
// places the call in the 2^64 blocks of the stream), and each sample is (z1 + z2 + z3 + z4) / 2, a sum of four
// independent normals, which defeats the floating-point attack on Box-Muller samples
// (Mironov, "On significance of the least significant bits for differential privacy",
// CCS 2012) as proposed by Holohan & Braghin, "Secure random sampling in differential
// privacy", ESORICS 2021, section 5 — the method Opacus's secure mode uses.
#pragma once

#include "chacha.h"
#include "common.h"
#include "gaussian.h"
#include "philox.h"

namespace ppml {

// Both samples of Philox block `index`.
PPML_HD void philox_normal_pair(uint64_t seed, uint64_t index, double* z0, double* z1) {
  uint32_t w[4];
  Philox4x32::at(seed, index, w);
  box_muller(w[0], w[1], w[2], w[3], z0, z1);
}

// Two secure samples from ChaCha20 block `index` (16 words -> 8 normals -> 2 sums of four);
// 64-bit block index (chacha20_block64: a fresh nonce per 2^32 blocks), so one call may draw
// more than 2^33 samples.
PPML_HD void secure_normal_pair(const ChaCha20Key& key, uint64_t index, double* z0, double* z1) {
  uint32_t w[16];
  chacha20_block64(key, index, w);
  double n[8];
  box_muller(w[0], w[1], w[2], w[3], &n[0], &n[1]);
  box_muller(w[4], w[5], w[6], w[7], &n[2], &n[3]);
  box_muller(w[8], w[9], w[10], w[11], &n[4], &n[5]);
  box_muller(w[12], w[13], w[14], w[15], &n[6], &n[7]);
  *z0 = ((n[0] + n[1]) + (n[2] + n[3])) * 0.5;
  *z1 = ((n[4] + n[5]) + (n[6] + n[7])) * 0.5;
}

// x <- (x + std * z) / denominator, computed in double and rounded once to the storage type.
template <typename T>
PPML_HD void apply_noise(T* p, int64_t i, double z, double stddev, double inv_or_den,
                         bool divide) {
  double x = static_cast<double>(Storage<T>::load(p, i));
  double v = x + stddev * z;
  if (divide) v = v / inv_or_den;
  Storage<T>::store(p, i, v);
}

}  // namespace ppml

// Per-record squared gradient norms of an embedding lookup (python/ppml_fast/privacy/per_sample/
// embedding.py, "rows"): record b's gradient has, in vocabulary row v, the sum of its output
// gradients g[b, t] at the positions t with idx[b, t] == v. Raw contiguous CPU buffers.
#pragma once

#include <cstdint>

#include "common.h"

namespace ppml {

struct EmbeddingNormsProblem {
  DType dtype = DType::kFloat32;  // of g: float32 or float64
  int64_t batch = 0, seq = 0, dim = 0;
  const int64_t* idx = nullptr;  // (B, S)
  const void* g = nullptr;       // (B, S, D)
  int64_t pad = -1;              // padding index (its positions contribute nothing), or -1
  double* sq = nullptr;          // (B,) out: sum over rows v of ||row sum||^2, all in float64
  double* norm_sum = nullptr;    // (B,) out: sum over non-padding t of ||g[b, t]||, float64
  int num_threads = 1;
};

namespace cpu {
void embedding_norms(const EmbeddingNormsProblem& p);
}  // namespace cpu

}  // namespace ppml

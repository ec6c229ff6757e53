// Per-record squared gradient norms of an embedding lookup (include/ppml/embedding.h), the
// "rows" formula of per_sample/embedding.py in one pass: each record's positions sorted by
// (index, position), the output gradients of one index summed in float64 (in position order:
// deterministic), and the squares of those row sums added in float64; also each record's
// sum of ||g_t||, from which the Python side bounds the rounding (Higham, Lemma 3.1 / eq. 3.5,
// with u = 2^-53: per_sample/embedding.py). It replaces ~20 small torch ops (a global sort
// of B S keys, index_add, norms, scatter of the squares) that cost ~0.4 ms a call at B 16,
// S 32, D 64 inside a DP step on the 2-core dev box.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/target.h"
#include "include/ppml/embedding.h"

namespace ppml::cpu {
namespace {

// sum_j v_j^2 in float64 with 8 interleaved partial sums (independent chains the compiler
// vectorises; Higham's bound holds for any order of the additions).
template <typename F>
PPML_ALWAYS_INLINE double sum_sq(const F* v, int64_t n) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) part[l] += static_cast<double>(v[j + l]) * static_cast<double>(v[j + l]);
  for (int l = 0; j < n; ++j, ++l) part[l] += static_cast<double>(v[j]) * static_cast<double>(v[j]);
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

template <typename F>
PPML_ALWAYS_INLINE void records(const EmbeddingNormsProblem& p, int64_t b0, int64_t b1) {
  const int64_t S = p.seq, D = p.dim;
  const F* g = static_cast<const F*>(p.g);
  std::vector<std::pair<int64_t, int64_t>> order;
  order.reserve(static_cast<size_t>(S));
  std::vector<double> acc(static_cast<size_t>(D));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t* ib = p.idx + b * S;
    const F* gb = g + b * S * D;
    order.clear();
    double norm_sum = 0.0;
    for (int64_t t = 0; t < S; ++t) {
      if (ib[t] == p.pad) continue;
      order.emplace_back(ib[t], t);
      norm_sum += std::sqrt(sum_sq<F>(gb + t * D, D));
    }
    std::sort(order.begin(), order.end());
    double sq = 0.0;
    for (size_t k = 0; k < order.size();) {
      size_t e = k + 1;
      while (e < order.size() && order[e].first == order[k].first) ++e;
      const F* first = gb + order[k].second * D;
      for (int64_t j = 0; j < D; ++j) acc[static_cast<size_t>(j)] = static_cast<double>(first[j]);
      for (size_t m = k + 1; m < e; ++m) {
        const F* row = gb + order[m].second * D;
        for (int64_t j = 0; j < D; ++j) acc[static_cast<size_t>(j)] += static_cast<double>(row[j]);
      }
      sq += sum_sq<double>(acc.data(), D);
      k = e;
    }
    p.sq[b] = sq;
    p.norm_sum[b] = norm_sum;
  }
}

void records_portable(const EmbeddingNormsProblem& p, int64_t b0, int64_t b1) {
  if (p.dtype == DType::kFloat64) records<double>(p, b0, b1); else records<float>(p, b0, b1);
}
#if PPML_HAVE_AVX2_TARGET
PPML_TARGET_AVX2 void records_avx2(const EmbeddingNormsProblem& p, int64_t b0, int64_t b1) {
  if (p.dtype == DType::kFloat64) records<double>(p, b0, b1); else records<float>(p, b0, b1);
}
#endif
#if PPML_HAVE_AVX512_TARGET
PPML_TARGET_AVX512 void records_avx512(const EmbeddingNormsProblem& p, int64_t b0, int64_t b1) {
  if (p.dtype == DType::kFloat64) records<double>(p, b0, b1); else records<float>(p, b0, b1);
}
#endif

void records_isa(const EmbeddingNormsProblem& p, int64_t b0, int64_t b1) {
  switch (isa_limit()) {
#if PPML_HAVE_AVX512_TARGET
    case Isa::kAvx512: return records_avx512(p, b0, b1);
#endif
#if PPML_HAVE_AVX2_TARGET
    case Isa::kAvx2: return records_avx2(p, b0, b1);
#endif
    default: return records_portable(p, b0, b1);
  }
}

}  // namespace

void embedding_norms(const EmbeddingNormsProblem& p) {
  const int64_t work = p.batch * p.seq * p.dim;
  const int nt = work >= (int64_t{1} << 17) ? std::max(1, p.num_threads) : 1;
  auto run = [&](int t, int n) {
    int64_t b0, b1;
    split_range(p.batch, t, n, &b0, &b1);
    records_isa(p, b0, b1);
  };
  if (nt == 1) {
    run(0, 1);
  } else {
    parallel_run(nt, run);
  }
}

}  // namespace ppml::cpu

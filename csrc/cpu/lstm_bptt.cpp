// The sequential loops of an LSTM direction (include/ppml/recurrent.h): the cell states of the
// DP forward's recomputation and backpropagation through time (Werbos 1990) that writes every
// step's gate gradients delta_t = dL/d(gate pre-activations) for the per-sample norms and clipped
// sums (privacy/recurrent_rule.py). In Python each step was 4-5 small torch ops (~30 us a step
// on the 2-core dev box); here one step is a (B, 4H) x (4H, H) product and one element-wise pass.
//
// Per step t (from T-1 down to 0), with delta_{t+1} = buf[t+1, :, 1:5] viewed as (B, 4H):
//   dh_t = gh_t + delta_{t+1} W_hh                         (no term at t = T-1)
//   dc_t = carry_{t+1} + dh_t * dc_dm_t                    (carry_T = dL/dc_T, or nothing)
//   buf[t, :, q] = dc_t * p4[t, :, q]  (q = 0..3: carry_t = dc_t f_t, delta_i, delta_f, delta_g)
//   buf[t, :, 4] = dh_t * po_t                             (delta_o)
// then dL/dh_0 = delta_0 W_hh and dL/dc_0 = carry_0. Sums run over k in order (deterministic);
// no FMA contraction (the whole build): each product is rounded, then added.
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/target.h"
#include "include/ppml/recurrent.h"

namespace ppml::cpu {
namespace {

// out[b, j] = (init ? init[b, j] : 0) + sum_k d[b * ld + k] w[k * H + j], k = 0..K-1.
template <typename F>
PPML_ALWAYS_INLINE void rows_times(F* __restrict out, const F* __restrict init,
                                   const F* __restrict d, int64_t ld, const F* __restrict w,
                                   int64_t B, int64_t K, int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    F* __restrict o = out + b * H;
    if (init != nullptr) {
      std::memcpy(o, init + b * H, sizeof(F) * static_cast<size_t>(H));
    } else {
      for (int64_t j = 0; j < H; ++j) o[j] = F(0);
    }
    const F* __restrict db = d + b * ld;
    for (int64_t k = 0; k < K; ++k) {
      const F dk = db[k];
      const F* __restrict wk = w + k * H;
      for (int64_t j = 0; j < H; ++j) o[j] += dk * wk[j];
    }
  }
}

template <typename F>
PPML_ALWAYS_INLINE void bptt_body(const LstmBpttProblem& p) {
  const int64_t T = p.steps, B = p.batch, H = p.hidden, H5 = 5 * H;
  const F* gh = static_cast<const F*>(p.gh);
  const F* p4 = static_cast<const F*>(p.p4);
  const F* po = static_cast<const F*>(p.po);
  const F* dc_dm = static_cast<const F*>(p.dc_dm);
  const F* w = static_cast<const F*>(p.w_hh);
  const F* gcn = static_cast<const F*>(p.gcn);
  F* buf = static_cast<F*>(p.buf);
  std::vector<F> dh_store(static_cast<size_t>(B * H));
  F* dh = dh_store.data();
  for (int64_t t = T - 1; t >= 0; --t) {
    F* bt = buf + t * B * H5;
    const F* ght = gh + t * B * H;
    const F* next = t + 1 < T ? buf + (t + 1) * B * H5 : nullptr;
    if (next == nullptr) {
      std::memcpy(dh, ght, sizeof(F) * static_cast<size_t>(B * H));
    } else {
      rows_times<F>(dh, ght, next + H, H5, w, B, 4 * H, H);
    }
    const F* carry = next != nullptr ? next : gcn;  // carry_{t+1}[b, j] at carry[b * ld + j]
    const int64_t carry_ld = next != nullptr ? H5 : H;
    for (int64_t b = 0; b < B; ++b) {
      const F* dhb = dh + b * H;
      const F* mb = dc_dm + (t * B + b) * H;
      const F* pb = p4 + (t * B + b) * 4 * H;
      const F* ob = po + (t * B + b) * H;
      F* out = bt + b * H5;
      const F* cb = carry != nullptr ? carry + b * carry_ld : nullptr;
      for (int64_t j = 0; j < H; ++j) {
        const F prod = dhb[j] * mb[j];
        const F dc = cb != nullptr ? cb[j] + prod : prod;
        out[j] = dc * pb[j];
        out[H + j] = dc * pb[H + j];
        out[2 * H + j] = dc * pb[2 * H + j];
        out[3 * H + j] = dc * pb[3 * H + j];
        out[4 * H + j] = dhb[j] * ob[j];
      }
    }
  }
  F* dh0 = static_cast<F*>(p.dh0);
  F* dc0 = static_cast<F*>(p.dc0);
  if (T == 0) {
    // no step: the gradients pass through unchanged (dL/dh_0 = 0 from above; dL/dc_0 = dL/dc_T)
    for (int64_t i = 0; i < B * H; ++i) {
      dh0[i] = F(0);
      dc0[i] = gcn != nullptr ? gcn[i] : F(0);
    }
    return;
  }
  rows_times<F>(dh0, nullptr, buf + H, H5, w, B, 4 * H, H);
  for (int64_t b = 0; b < B; ++b) std::memcpy(dc0 + b * H, buf + b * H5, sizeof(F) * static_cast<size_t>(H));
}

template <typename F>
PPML_ALWAYS_INLINE void cells_body(const LstmCellsProblem& p) {
  const int64_t T = p.steps, B = p.batch, H = p.hidden;
  const F* ig = static_cast<const F*>(p.ig);
  const F* f = static_cast<const F*>(p.f);
  F* c = static_cast<F*>(p.c);
  const F* prev = static_cast<const F*>(p.c0);
  for (int64_t t = 0; t < T; ++t) {
    F* ct = c + t * B * H;
    for (int64_t b = 0; b < B; ++b) {
      const F* igb = ig + (t * B + b) * H;
      const F* fb = f + (t * B + b) * p.f_row;
      const F* pb = prev + b * H;
      F* out = ct + b * H;
      for (int64_t j = 0; j < H; ++j) out[j] = igb[j] + fb[j] * pb[j];
    }
    prev = ct;
  }
}

void bptt_portable(const LstmBpttProblem& p) {
  if (p.dtype == DType::kFloat64) bptt_body<double>(p); else bptt_body<float>(p);
}
void cells_portable(const LstmCellsProblem& p) {
  if (p.dtype == DType::kFloat64) cells_body<double>(p); else cells_body<float>(p);
}
#if PPML_HAVE_AVX2_TARGET
PPML_TARGET_AVX2 void bptt_avx2(const LstmBpttProblem& p) {
  if (p.dtype == DType::kFloat64) bptt_body<double>(p); else bptt_body<float>(p);
}
PPML_TARGET_AVX2 void cells_avx2(const LstmCellsProblem& p) {
  if (p.dtype == DType::kFloat64) cells_body<double>(p); else cells_body<float>(p);
}
#endif
#if PPML_HAVE_AVX512_TARGET
PPML_TARGET_AVX512 void bptt_avx512(const LstmBpttProblem& p) {
  if (p.dtype == DType::kFloat64) bptt_body<double>(p); else bptt_body<float>(p);
}
PPML_TARGET_AVX512 void cells_avx512(const LstmCellsProblem& p) {
  if (p.dtype == DType::kFloat64) cells_body<double>(p); else cells_body<float>(p);
}
#endif

}  // namespace

void lstm_bptt(const LstmBpttProblem& p) {
  switch (isa_limit()) {
#if PPML_HAVE_AVX512_TARGET
    case Isa::kAvx512: return bptt_avx512(p);
#endif
#if PPML_HAVE_AVX2_TARGET
    case Isa::kAvx2: return bptt_avx2(p);
#endif
    default: return bptt_portable(p);
  }
}

void lstm_cells(const LstmCellsProblem& p) {
  switch (isa_limit()) {
#if PPML_HAVE_AVX512_TARGET
    case Isa::kAvx512: return cells_avx512(p);
#endif
#if PPML_HAVE_AVX2_TARGET
    case Isa::kAvx2: return cells_avx2(p);
#endif
    default: return cells_portable(p);
  }
}

}  // namespace ppml::cpu

// The sequential loops of an LSTM direction (include/ppml/recurrent.h): the forward (recurrence,
// gates and the backward's factors), the cell states of the torch path's recomputation, and
// backpropagation through time (Werbos 1990) that writes every
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
// no FMA contraction (the whole build): each product is rounded, then added, so the portable,
// AVX2 and AVX-512 builds give the same bits (tests/privacy/test_recurrent_native.py).
#include <cmath>
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
      #pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) o[j] = F(0);
    }
    const F* __restrict db = d + b * ld;
    for (int64_t k = 0; k < K; ++k) {
      const F dk = db[k];
      const F* __restrict wk = w + k * H;
      #pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) o[j] += dk * wk[j];
    }
  }
}


// exp(x) for float32 in plain arithmetic that the compiler vectorises (no libm call in the loop):
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6 Taylor polynomial of e^r
// (truncation < 2^-24 relative there) and 2^n from the exponent bits; x clamped to
// [-87, 88] (the results stay normal). Relative error a few ulp, against libm's 1.
PPML_ALWAYS_INLINE float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float e = 1.0f / 720;
  e = e * r + 1.0f / 120;
  e = e * r + 1.0f / 24;
  e = e * r + 1.0f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}
PPML_ALWAYS_INLINE double exp_poly(double x) { return std::exp(x); }

template <typename F>
PPML_ALWAYS_INLINE F sigmoid(F x) { return F(1) / (F(1) + exp_poly(-x)); }
// tanh for float32: 2 / (1 + e^(-2x)) - 1 (absolute error ~1e-7: a few ulp for |x| >= 1/4), and
// below |x| = 1/4 its Taylor series to x^9 (truncation < 9e-3 |x|^11 < 3e-9 |x|: relative
// accuracy for small activations, where the first form would lose it); both computed, one kept
// (branch-free, vectorised). float64: libm.
PPML_ALWAYS_INLINE float tanh_s(float x) {
  const float big = 2.0f / (1.0f + exp_poly(-2.0f * x)) - 1.0f;
  const float x2 = x * x;
  float p = 62.0f / 2835;
  p = p * x2 - 17.0f / 315;
  p = p * x2 + 2.0f / 15;
  p = p * x2 - 1.0f / 3;
  const float small = x + x * (x2 * p);
  return (x < 0.25f && x > -0.25f) ? small : big;
}
PPML_ALWAYS_INLINE double tanh_s(double x) { return std::tanh(x); }

template <typename F>
PPML_ALWAYS_INLINE void forward_body(const LstmForwardProblem& p) {
  const int64_t T = p.steps, B = p.batch, H = p.hidden, H4 = 4 * H;
  F* pre = static_cast<F*>(p.pre);
  const F* wt = static_cast<const F*>(p.w_hh_t);
  F* h = static_cast<F*>(p.h);
  F* c = static_cast<F*>(p.c);
  F* p4 = static_cast<F*>(p.p4);
  F* po = static_cast<F*>(p.po);
  F* dc_dm = static_cast<F*>(p.dc_dm);
  const F* h_prev = static_cast<const F*>(p.h0);
  const F* c_prev = static_cast<const F*>(p.c0);
  for (int64_t t = 0; t < T; ++t) {
    F* pt = pre + t * B * H4;
    for (int64_t b = 0; b < B; ++b) {  // pre_t += h_{t-1} W_hh^T, summed over k in order
      F* __restrict o = pt + b * H4;
      const F* __restrict hb = h_prev + b * H;
      for (int64_t k = 0; k < H; ++k) {
        const F hk = hb[k];
        const F* __restrict wk = wt + k * H4;
        #pragma GCC ivdep
        for (int64_t n = 0; n < H4; ++n) o[n] += hk * wk[n];
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      F* __restrict a = pt + b * H4;
      // activations in place: i, f, o sigmoid; g tanh
      #pragma GCC ivdep
      for (int64_t n = 0; n < 2 * H; ++n) a[n] = sigmoid<F>(a[n]);  // i, f
      #pragma GCC ivdep
      for (int64_t n = 2 * H; n < 3 * H; ++n) a[n] = tanh_s(a[n]);  // g
      #pragma GCC ivdep
      for (int64_t n = 3 * H; n < H4; ++n) a[n] = sigmoid<F>(a[n]);  // o
      const F* __restrict cp = c_prev + b * H;
      F* __restrict cb = c + row * H;
      #pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) cb[j] = a[j] * a[2 * H + j] + a[H + j] * cp[j];
      F* __restrict hb = h + row * H;
      F* __restrict q = p4 + row * 4 * H;
      F* __restrict pob = po + row * H;
      F* __restrict mb = dc_dm + row * H;
      #pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) {
        const F i = a[j], f = a[H + j], g = a[2 * H + j], og = a[3 * H + j];
        const F tc = tanh_s(cb[j]);
        const F m = og * tc;
        const F ig = i * g;
        const F cf = cp[j] * f;
        hb[j] = m;
        q[j] = f;
        q[H + j] = ig - ig * i;
        q[2 * H + j] = cf - cf * f;
        q[3 * H + j] = i - ig * g;
        pob[j] = m - m * og;
        mb[j] = og - m * tc;
      }
    }
    h_prev = h + t * B * H;
    c_prev = c + t * B * H;
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
      #pragma GCC ivdep
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
      #pragma GCC ivdep
      for (int64_t j = 0; j < H; ++j) out[j] = igb[j] + fb[j] * pb[j];
    }
    prev = ct;
  }
}

void forward_portable(const LstmForwardProblem& p) {
  if (p.dtype == DType::kFloat64) forward_body<double>(p); else forward_body<float>(p);
}
void bptt_portable(const LstmBpttProblem& p) {
  if (p.dtype == DType::kFloat64) bptt_body<double>(p); else bptt_body<float>(p);
}
void cells_portable(const LstmCellsProblem& p) {
  if (p.dtype == DType::kFloat64) cells_body<double>(p); else cells_body<float>(p);
}
#if PPML_HAVE_AVX2_TARGET
PPML_TARGET_AVX2 void forward_avx2(const LstmForwardProblem& p) {
  if (p.dtype == DType::kFloat64) forward_body<double>(p); else forward_body<float>(p);
}
PPML_TARGET_AVX2 void bptt_avx2(const LstmBpttProblem& p) {
  if (p.dtype == DType::kFloat64) bptt_body<double>(p); else bptt_body<float>(p);
}
PPML_TARGET_AVX2 void cells_avx2(const LstmCellsProblem& p) {
  if (p.dtype == DType::kFloat64) cells_body<double>(p); else cells_body<float>(p);
}
#endif
#if PPML_HAVE_AVX512_TARGET
PPML_TARGET_AVX512 void forward_avx512(const LstmForwardProblem& p) {
  if (p.dtype == DType::kFloat64) forward_body<double>(p); else forward_body<float>(p);
}
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

void lstm_forward(const LstmForwardProblem& p) {
  switch (isa_limit()) {
#if PPML_HAVE_AVX512_TARGET
    case Isa::kAvx512: return forward_avx512(p);
#endif
#if PPML_HAVE_AVX2_TARGET
    case Isa::kAvx2: return forward_avx2(p);
#endif
    default: return forward_portable(p);
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

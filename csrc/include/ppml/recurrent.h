// The sequential loops of an LSTM direction's DP forward and backward
// (python/ppml_fast/privacy/recurrent_layer.py): the cell-state recurrence and backpropagation
// through time writing every step's gate gradients. Raw contiguous CPU buffers (float32 or
// float64, one dtype per call), time-major, in the direction's own time order.
#pragma once

#include <cstdint>

#include "common.h"

namespace ppml {

struct LstmCellsProblem {
  DType dtype = DType::kFloat32;
  int64_t steps = 0, batch = 0, hidden = 0;
  const void* ig = nullptr;  // (T, B, H): i_t g_t
  const void* f = nullptr;   // element (t, b, j) at f + (t * B + b) * f_row + j
  int64_t f_row = 0;         // row stride of f (4H: the forget gate inside the (T, B, 4H) gates)
  const void* c0 = nullptr;  // (B, H)
  void* c = nullptr;         // (T, B, H) out: c_t = i_t g_t + f_t c_{t-1}
};

struct LstmBpttProblem {
  DType dtype = DType::kFloat32;
  int64_t steps = 0, batch = 0, hidden = 0;
  const void* gh = nullptr;     // (T, B, H): dL/dh_t from above (the layer's output gradient)
  const void* p4 = nullptr;     // (T, B, 4, H): [f, g i (1 - i), c_{t-1} f (1 - f), i (1 - g^2)]
  const void* po = nullptr;     // (T, B, H): tanh(c) o (1 - o)
  const void* dc_dm = nullptr;  // (T, B, H): o (1 - tanh(c)^2)
  const void* w_hh = nullptr;   // (4H, H)
  const void* gcn = nullptr;    // (B, H) dL/dc_T, or null
  void* buf = nullptr;          // (T, B, 5, H) out: [carry, delta_i, delta_f, delta_g, delta_o]
  void* dh0 = nullptr;          // (B, H) out: dL/dh_0
  void* dc0 = nullptr;          // (B, H) out: dL/dc_0
};

// The forward of one LSTM direction (no projection) keeping what its backward needs.
struct LstmForwardProblem {
  DType dtype = DType::kFloat32;
  int64_t steps = 0, batch = 0, hidden = 0;
  void* pre = nullptr;          // (T, B, 4H) in: x_t W_ih^T + b_ih + b_hh, gates [i, f, g, o];
                                // overwritten (the recurrent term added)
  const void* w_hh_t = nullptr; // (H, 4H): W_hh transposed
  const void* h0 = nullptr;     // (B, H)
  const void* c0 = nullptr;     // (B, H)
  void* h = nullptr;            // (T, B, H) out
  void* c = nullptr;            // (T, B, H) out: c_1 .. c_T
  void* p4 = nullptr;           // (T, B, 4, H) out: [f, g i (1 - i), c_{t-1} f (1 - f), i (1 - g^2)]
  void* po = nullptr;           // (T, B, H) out: tanh(c) o (1 - o)
  void* dc_dm = nullptr;        // (T, B, H) out: o (1 - tanh(c)^2)
};

namespace cpu {
void lstm_forward(const LstmForwardProblem& p);
void lstm_cells(const LstmCellsProblem& p);
void lstm_bptt(const LstmBpttProblem& p);
}  // namespace cpu

}  // namespace ppml

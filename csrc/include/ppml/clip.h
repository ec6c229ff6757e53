// Clip factors and row sums of squares, shared by the CPU and CUDA kernels.
//
// Clipping (Abadi et al., "Deep learning with differential privacy", CCS 2016, Algorithm 1):
//   factor = min(1, C / (||g|| + eps))
// Automatic clipping (Bu, Wang, Zha, Karypis, "Automatic clipping: differentially private deep
// learning made easier and stronger", NeurIPS 2023, eq. (4)):
//   factor = C / (||g|| + gamma)
// Either way ||factor * g|| <= C. A non-finite norm gives factor 0 and the kernels skip the row
// (0 * NaN would poison the sum), so a bad sample contributes nothing.
#pragma once

#include <cmath>

#include "common.h"

namespace ppml {

enum class ClipMode : int { kNone = 0, kClip = 1, kAutomatic = 2 };

PPML_HD bool is_finite_double(double v) {
  // true for finite values; false for inf and NaN (v - v is NaN exactly then)
  return (v - v) == 0.0;
}

PPML_HD double clip_factor(double norm, double max_norm, ClipMode mode, double eps, double gamma) {
  if (!is_finite_double(norm)) return 0.0;
  if (mode == ClipMode::kNone) return 1.0;
  if (mode == ClipMode::kAutomatic) return max_norm / (norm + gamma);
  double f = max_norm / (norm + eps);
  return f < 1.0 ? f : 1.0;
}

}  // namespace ppml

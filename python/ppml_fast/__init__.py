"""ppml_fast: privacy-preserving machine learning for PyTorch on a fast native core.

- :mod:`ppml_fast.privacy` — DP-SGD: ``PrivacyEngine`` (Opacus's API), ``DPOptimizer``, ghost
  norms and book-keeping clipped sums, Poisson sampling, virtual batches, the budget stop;
- :mod:`ppml_fast.accounting` — privacy events, RDP and PLD accountants, calibration, the ledger;
- :mod:`ppml_fast.mechanisms` — Gaussian, Laplace, randomized response, report-noisy-max;
- :mod:`ppml_fast.ops` — the native ops (fused per-sample clipping, reproducible and secure
  Gaussian noise, weighted aggregation), registered as ``torch.ops.ppml_fast.*``.
"""

from ppml_fast import accounting, ops, privacy
from ppml_fast._version import __version__
from ppml_fast.accounting.errors import PrivacyBudgetExceeded, PrivacyError
from ppml_fast.privacy import PrivacyEngine

__all__ = ["PrivacyBudgetExceeded", "PrivacyEngine", "PrivacyError", "accounting", "ops", "privacy",
           "__version__"]

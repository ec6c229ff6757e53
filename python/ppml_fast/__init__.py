"""ppml_fast: privacy-preserving machine learning for PyTorch on a fast native core.

- :mod:`ppml_fast.privacy` — DP-SGD: ``PrivacyEngine`` (Opacus's API), ``DPOptimizer``, ghost
  norms and book-keeping clipped sums, Poisson sampling, virtual batches, the budget stop;
- :mod:`ppml_fast.accounting` — privacy events, RDP and PLD accountants, calibration, the ledger;
- :mod:`ppml_fast.mechanisms` — Gaussian, Laplace, randomized response, report-noisy-max;
- :mod:`ppml_fast.ops` — the native ops (fused per-sample clipping, reproducible and secure
  Gaussian noise, weighted aggregation), registered as ``torch.ops.ppml_fast.*``.

The subpackages and names below load on first use (PEP 562): ``import ppml_fast`` costs no
SciPy and no torch._dynamo, and a script that only calls ``ppml_fast.ops`` loads only the ops.
``torch.ops.ppml_fast.*`` exist once :mod:`ppml_fast.ops` is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ppml_fast._version import __version__

#: the subpackages loaded on attribute access, and where each lazily exported name lives
_SUBMODULES = ("accounting", "ops", "privacy")
_NAMES = {
    "PrivacyBudgetExceeded": "ppml_fast.accounting.errors",
    "PrivacyError": "ppml_fast.accounting.errors",
    "PrivacyEngine": "ppml_fast.privacy",
}

__all__ = ["PrivacyBudgetExceeded", "PrivacyEngine", "PrivacyError", "accounting", "ops", "privacy",
           "__version__"]

if TYPE_CHECKING:
    from ppml_fast import accounting, ops, privacy
    from ppml_fast.accounting.errors import PrivacyBudgetExceeded, PrivacyError
    from ppml_fast.privacy import PrivacyEngine


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"ppml_fast.{name}")
    elif name in _NAMES:
        module = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'ppml_fast' has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

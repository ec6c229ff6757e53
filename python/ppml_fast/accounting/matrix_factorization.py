"""Matrix-factorization (correlated-noise) mechanisms for DP training: strategies and their accounting.

DP-SGD adds independent noise each step (the identity strategy). DP-FTRL with tree aggregation
(Kairouz et al. 2021, arXiv 2103.00039) and banded matrix factorization (BandMF, Choquette-Choo et
al. 2023, arXiv 2306.08153) add noise correlated across steps, w = C^{-1} z, which cancels in the
running sum of the updates. This module gives the strategy matrices C, their sensitivity under a
participation schema (``Participation``), the accounting events per step and the expected error;
the contract with the optimizer and the federated code is in the docstrings of ``NoiseStrategy``.
Pure numpy/scipy; imports nothing from ppml_fast.privacy.

Constructors: ``identity(steps)``, ``tree(steps)``, ``banded(coefficients, steps)``,
``optimize_banded(steps, bands)``.
"""

from __future__ import annotations

import numbers

import numpy as np

from ppml_fast.accounting import mf_optimize
from ppml_fast.accounting.mf_participation import Participation
from ppml_fast.accounting.mf_strategies import BandedStrategy, NoiseStrategy, TreeStrategy

__all__ = [
    "BandedStrategy",
    "NoiseStrategy",
    "Participation",
    "TreeStrategy",
    "banded",
    "identity",
    "optimize_banded",
    "tree",
]

_MAX_STEPS = 10**7


def _steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int; got {type(steps).__name__} {steps!r}")
    if not 1 <= steps <= _MAX_STEPS:
        raise ValueError(f"steps must be in [1, {_MAX_STEPS}]; got {steps!r}")
    return int(steps)


def _column_scale(c: np.ndarray, steps: int) -> np.ndarray:
    """1 / ||column j|| of the T x T Toeplitz matrix with coefficients c (columns near the end
    are truncated): C diag(scale) has unit column norms (jax_privacy's
    ``inverse_as_streaming_matrix(column_normalize_for_n=T)``)."""
    full = np.zeros(steps)
    full[: c.size] = c[:steps]
    norms = np.sqrt(np.cumsum(full * full))[::-1]  # column j holds c[0 .. T-1-j]
    return 1.0 / norms


def identity(steps: int) -> BandedStrategy:
    """C = I: independent noise each step (DP-SGD without amplification)."""
    return BandedStrategy("identity", np.ones(1), _steps(steps))


def tree(steps: int) -> TreeStrategy:
    """Binary-tree aggregation over all ``steps`` (DP-FTRL, arXiv 2103.00039, Sec. 3), no restarts:
    several epochs are accounted through the participation schema's sensitivity."""
    return TreeStrategy(_steps(steps))


def banded(coefficients, steps: int, *, column_normalize: bool = False) -> BandedStrategy:
    """The banded lower-triangular Toeplitz C with ``coefficients`` [c_0, ..., c_{b-1}]
    (C[t, t - m] = c_m), b = len(coefficients) <= steps, c_0 > 0.

    Args:
        coefficients: finite reals, c_0 > 0 (C must be invertible; its scale does not matter for
            privacy: sensitivity is computed from C, and the noise std is sigma x sensitivity).
        steps: T.
        column_normalize: scale every column to unit norm (the last b - 1 columns of a Toeplitz
            C are truncated, so their norm is below ||c||); lowers the error and keeps the max
            column norm (arXiv 2306.08153, Sec. 4; jax_privacy ``column_normalize_for_n``).
    """
    steps = _steps(steps)
    try:
        c = np.array(coefficients, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"coefficients must be a 1-D sequence of reals; got {coefficients!r}") from e
    if c.ndim != 1 or c.size < 1:
        raise ValueError(f"coefficients must be a non-empty 1-D sequence; got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"coefficients must be finite; got {c.tolist()}")
    if not c[0] > 0:
        raise ValueError(f"coefficients[0] (the diagonal of C) must be > 0; got {c[0]!r}")
    if c.size > steps:
        raise ValueError(f"bands = len(coefficients) must be <= steps={steps}; got {c.size}")
    if not isinstance(column_normalize, bool):
        raise TypeError(f"column_normalize must be a bool; got {column_normalize!r}")
    scale = _column_scale(c, steps) if column_normalize else None
    return BandedStrategy("banded", c, steps, column_scale=scale)


def optimize_banded(steps: int, bands: int, *, column_normalize: bool = True,
                    use_cache: bool = True) -> BandedStrategy:
    """BandMF: the b-banded Toeplitz C minimising ||A C^{-1}||_F^2 with column norms <= 1
    (arXiv 2306.08153, Sec. 3-4, restricted to Toeplitz C as in McKenna 2024, arXiv 2405.15913),
    optimised once per (steps, bands) and cached in memory and on disk
    (``$PPML_FAST_CACHE`` or ``~/.cache/ppml_fast``). The coefficients have unit norm; with
    ``column_normalize`` (default) every column has norm 1. The optimum does not depend on the
    participation schema as long as participations are >= bands steps apart (then the
    sensitivity is the same for every unit-norm c); use bands <= min_separation
    (steps_per_epoch for "every_epoch")."""
    steps = _steps(steps)
    if isinstance(bands, bool) or not isinstance(bands, numbers.Integral):
        raise TypeError(f"bands must be an int; got {type(bands).__name__} {bands!r}")
    if not 1 <= bands <= steps:
        raise ValueError(f"bands must be in [1, steps={steps}]; got {bands!r}")
    c = mf_optimize.optimal_toeplitz_coefficients(steps, int(bands), use_cache=use_cache)
    return banded(c, steps, column_normalize=column_normalize)

"""Maths of truncated Poisson sampling (sampling_events.TruncatedPoissonEvent) for the two
accountants: pure functions on numbers.

The step is a mixture, with a label both neighbours draw from the same law (whether the other
records' sample fills the batch, probability p), of two Poisson-subsampled Gaussians with the
same rate q: noise sigma (sensitivity C) with probability 1 - p, sigma / 2 (sensitivity 2C)
with probability p. Revealing the label only helps an adversary, and for the labelled pair
- the hockey-stick curve is the mixture of the curves (the optimal set splits by label):
      delta(eps) = (1 - p) delta_{q,sigma}(eps) + p delta_{q,sigma/2}(eps);
- the Rényi divergence of order a satisfies
      exp((a - 1) D_a) = (1 - p) exp((a - 1) D_a(q, sigma)) + p exp((a - 1) D_a(q, sigma / 2))
(both from the definitions; the decomposition is Ganesh 2025, arXiv 2508.15089, Sec. 3, with the
second branch bounded as in sampling_events.TruncatedPoissonEvent's docstring).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from ppml_fast.accounting import pld_math, rdp_math


def rdp_truncated_poisson_gaussian(p: float, q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP eps(a) of one truncated-Poisson Gaussian step at each order (module docstring)."""
    alphas = np.asarray(orders, dtype=np.float64)
    r1 = rdp_math.rdp_poisson_gaussian(q, sigma, orders)
    r2 = rdp_math.rdp_poisson_gaussian(q, sigma / 2.0, orders)
    if p >= 1.0:
        return r2
    a1 = alphas - 1.0
    with np.errstate(over="ignore"):
        log_mix = np.logaddexp(np.log1p(-p) + a1 * r1, np.log(p) + a1 * r2)
    # logaddexp and log1p are accurate to a few ulps; round the result up by a relative 1e-15
    return np.maximum(log_mix / a1, r1) * (1.0 + 1e-15)


def loss_range(p: float, q: float, sigma: float, direction: str) -> tuple[float, float]:
    """The losses the mixture's grid covers: the union of the two branches' ranges."""
    lo1, hi1 = pld_math.loss_range("gaussian", (q, sigma), direction)
    lo2, hi2 = pld_math.loss_range("gaussian", (q, sigma / 2.0), direction)
    return min(lo1, lo2), max(hi1, hi2)


@lru_cache(maxsize=16)
def truncated_pld(p: float, q: float, sigma: float, direction: str, step: float) -> pld_math.DiscretePLD:
    """The pessimistic connect-the-dots grid PLD (pld_math.connect_the_dots) of the mixture's
    hockey-stick curve, for ``direction`` "remove" or "add"."""
    other = "add" if direction == "remove" else "remove"

    def curve(d: str):
        def f(e: np.ndarray) -> np.ndarray:
            b1 = pld_math.subsampled_delta(lambda x: pld_math.gaussian_delta(sigma, x), q, e, d)
            b2 = pld_math.subsampled_delta(lambda x: pld_math.gaussian_delta(sigma / 2.0, x), q, e, d)
            return np.clip((1.0 - p) * b1 + p * b2, 0.0, 1.0)
        return f

    lo, hi = loss_range(p, q, sigma, direction)
    return pld_math.connect_the_dots(curve(direction), curve(other), lo, hi, step)

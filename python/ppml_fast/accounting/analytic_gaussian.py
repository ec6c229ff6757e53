"""The analytic Gaussian mechanism: the smallest noise for one (epsilon, delta)-DP release.

Balle & Wang, "Improving the Gaussian mechanism for differential privacy: analytical
calibration and optimal denoising", ICML 2018, Theorem 8: the Gaussian mechanism with noise std
sigma on a query of L2 sensitivity Delta is (epsilon, delta)-DP if and only if
    Phi(Delta / (2 sigma) - epsilon sigma / Delta) - e^epsilon Phi(-Delta / (2 sigma) - epsilon sigma / Delta) <= delta.
The left side falls as sigma grows; bisection returns a sigma at or just above the exact one
(never below: the result is private).
"""

from __future__ import annotations

import math

from scipy import special

from ppml_fast.accounting import _checks


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """The exact delta of the Gaussian mechanism at ``epsilon`` (Balle & Wang 2018, Thm. 8)."""
    sigma = _checks.positive("sigma", sigma)
    epsilon = _checks.non_negative("epsilon", epsilon)
    sensitivity = _checks.positive("sensitivity", sensitivity)
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    first = special.ndtr(a - b)
    second = math.exp(epsilon + special.log_ndtr(-a - b))
    return max(0.0, float(first - second))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest sigma (to a relative 1e-12, rounded up) for which one Gaussian release of a
    query with L2 ``sensitivity`` is (``epsilon``, ``delta``)-DP."""
    epsilon = _checks.positive("epsilon", epsilon)
    delta = _checks.open_unit("delta", delta)
    sensitivity = _checks.positive("sensitivity", sensitivity)
    lo, hi = 1e-3 * sensitivity, sensitivity
    while gaussian_delta(hi, epsilon, sensitivity) > delta:
        lo, hi = hi, hi * 2
    while gaussian_delta(lo, epsilon, sensitivity) <= delta:
        lo /= 2
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        if gaussian_delta(mid, epsilon, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi

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
import numbers

from scipy import special


def _check(name: str, value: object, *, below_one: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    v = float(value)
    if not (v > 0 and math.isfinite(v)) or (below_one and not v < 1):
        expected = "in (0, 1)" if below_one else "a finite number > 0"
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return v


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """The exact delta of the Gaussian mechanism at ``epsilon`` (Balle & Wang 2018, Thm. 8)."""
    sigma = _check("sigma", sigma)
    epsilon = float(epsilon)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and >= 0; got {epsilon!r}")
    sensitivity = _check("sensitivity", sensitivity)
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    first = special.ndtr(a - b)
    second = math.exp(epsilon + special.log_ndtr(-a - b))
    return max(0.0, float(first - second))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest sigma (to a relative 1e-12, rounded up) for which one Gaussian release of a
    query with L2 ``sensitivity`` is (``epsilon``, ``delta``)-DP."""
    epsilon = _check("epsilon", epsilon)
    delta = _check("delta", delta, below_one=True)
    sensitivity = _check("sensitivity", sensitivity)
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

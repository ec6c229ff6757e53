"""Rényi DP of the Poisson-subsampled Gaussian mechanism and the RDP -> (epsilon, delta)
conversion: pure functions on floats (the accountant in rdp.py keeps the state).

Sources, next to the formulas below:
- Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
  arXiv:1908.10530, Section 3.3 (integer orders: binomial expansion; fractional orders: the
  two-series expansion with erfc terms). Same algorithm as dp_accounting 0.6, including its
  conservative absolute-value bound for fractional orders.
- Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", arXiv:2004.00010
  v4, Proposition 12 (equivalently Balle et al. 2020, "Hypothesis testing interpretations and
  Rényi differential privacy", Theorem 21): the conversion used in epsilon_from_rdp and
  delta_from_rdp.
All sums run in log space, so small q, large sigma and 10^6 steps are stable.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special

# Orders: dense fractional ones near 1 (small epsilon), every integer to 256 (Opacus stops at
# 63, which is looser at small epsilon), and large ones (dp_accounting drops low fractional
# orders at large epsilon; here all are kept).
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {1.0 + x / 20.0 for x in range(1, 200)}
        | {float(a) for a in range(11, 257)}
        | {320.0, 384.0, 512.0, 768.0, 1024.0, 2048.0, 4096.0}
    )
)


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    if hi == -math.inf:
        return -math.inf
    return hi + math.log1p(math.exp(lo - hi))


def _log_erfc(x: float) -> float:
    return math.log(2.0) + special.log_ndtr(-x * 2**0.5)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha (Mironov et al. 2019, Section 3.3, binomial expansion)."""
    i = np.arange(alpha + 1, dtype=np.float64)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
    terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
    return float(special.logsumexp(terms))


_MAX_TERMS_FRAC = 1000


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """An upper bound on log A_alpha for fractional alpha (Mironov et al. 2019, Section 3.3,
    the two series over (-inf, z0] and [z0, inf)).

    Conservative, as dp_accounting 0.6 does: the binomial coefficients of a fractional order
    alternate in sign past i = alpha; adding their absolute values bounds A_alpha from above
    (so epsilon from above) and avoids cancelling subtractions in log space. A series that has
    not converged after 1000 terms gives +inf: the order is then never the minimiser.
    """
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    last_s0 = last_s1 = -math.inf
    for i in range(_MAX_TERMS_FRAC):
        log_coef = float(special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1))
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log_1mq
        log_t1 = log_coef + j * log_q + i * log_1mq
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        log_a0 = _log_add(log_a0, log_s0)
        log_a1 = _log_add(log_a1, log_s1)
        total = _log_add(log_a0, log_a1)
        # both series decreasing and their terms negligible against the total
        if log_s0 < last_s0 and log_s1 < last_s1 and max(log_s0, log_s1) < total - 30:
            return total
        last_s0, last_s1 = log_s0, log_s1
    return math.inf


def rdp_poisson_gaussian(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP epsilon(alpha) of one step of the Poisson-subsampled Gaussian mechanism with sampling
    rate ``q`` and noise multiplier ``sigma``, at each order."""
    out = np.empty(len(orders))
    for k, alpha in enumerate(orders):
        if q == 0:
            out[k] = 0.0
        elif q == 1.0:
            out[k] = alpha / (2 * sigma**2)  # the Gaussian mechanism itself (Mironov 2017, Prop. 7)
        elif float(alpha).is_integer():
            out[k] = _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
        else:
            out[k] = _log_a_frac(q, sigma, float(alpha)) / (alpha - 1)
    return out


def rdp_laplace(scale: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of the Laplace mechanism with noise scale ``scale`` x the L1 sensitivity (exact;
    Mironov 2017, "Rényi Differential Privacy", Prop. 6):
    eps(a) = 1/(a-1) log[a/(2a-1) e^{(a-1)/b} + (a-1)/(2a-1) e^{-a/b}]
           = 1/b + log1p((a-1) expm1((1-2a)/b) / (2a-1)) / (a-1)   (the stable form used here)."""
    e = 1.0 / scale
    out = np.empty(len(orders))
    for k, a in enumerate(orders):
        c = math.expm1(e * (1.0 - 2.0 * a)) / (2.0 * a - 1.0)
        if a < 1.1:  # log1p(c x) / x by its series: c sum_k (-c x)^(k-1) / k, 0 <= -c x <= 0.1
            v = -c * (a - 1.0)
            out[k] = e + c * math.fsum(v ** (j - 1) / j for j in range(1, 60))
        else:
            out[k] = e + math.log1p((a - 1.0) * c) / (a - 1.0)
    return np.maximum(out, 0.0)


def rdp_randomized_response(noise_parameter: float, num_buckets: int, orders: Sequence[float]) -> np.ndarray:
    """RDP of k-ary randomized response (exact under replace-one): the Rényi divergence of
    P = (1-p+p/k, p/k, ..., p/k) from Q = (p/k, 1-p+p/k, p/k, ..., p/k) (definition of RDP,
    Mironov 2017, Def. 3, on the two output distributions; as dp_accounting's REPLACE_ONE):
    eps(a) = 1/(a-1) log[(p/k) r^a + (1-p+p/k) r^-a + (1-2/k) p],  r = (1-p+p/k)/(p/k).
    Under add/remove with an absent respondent reported as a uniform bucket, these values are an
    upper bound: uniform is the average of the k output distributions and Rényi divergence is
    jointly quasi-convex (van Erven & Harremoës 2014, Thm. 13)."""
    p, k = float(noise_parameter), int(num_buckets)
    if p == 1.0:
        return np.zeros(len(orders))
    log_r = math.log(k / p - k + 1.0)
    out = np.empty(len(orders))
    for j, a in enumerate(orders):
        out[j] = special.logsumexp(
            [a * log_r, -a * log_r, 0.0], b=[p / k, 1.0 - p + p / k, (1.0 - 2.0 / k) * p]
        ) / (a - 1.0)
    return np.maximum(out, 0.0)


def epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, delta: float) -> float:
    """Smallest epsilon over the orders (Canonne-Kamath-Steinke 2020, Prop. 12):
    eps = rdp + log1p(-1/a) - log(delta * a) / (a - 1)."""
    best = math.inf
    for a, r in zip(orders, rdp):
        if r < 0:
            raise ValueError(f"RDP values must be >= 0; got {r} at order {a}")
        if delta**2 + math.expm1(-r) > 0:
            return 0.0  # delta >= sqrt(1 - exp(-KL)): (0, delta)-DP already
        if a > 1.01:
            best = min(best, r + math.log1p(-1.0 / a) - math.log(delta * a) / (a - 1))
    return max(0.0, best)


def delta_from_rdp(orders: Sequence[float], rdp: np.ndarray, epsilon: float) -> float:
    """Smallest delta over the orders (Canonne-Kamath-Steinke 2020, Prop. 12), or the KL bound
    delta <= sqrt(1 - exp(-rdp)) where smaller."""
    best = math.inf
    for a, r in zip(orders, rdp):
        if r < 0:
            raise ValueError(f"RDP values must be >= 0; got {r} at order {a}")
        log_delta = -math.inf if r == 0 else 0.5 * math.log1p(-math.exp(-r))
        if a > 1.01:
            log_delta = min(log_delta, (a - 1) * (r - epsilon + math.log1p(-1.0 / a)) - math.log(a))
        best = min(best, log_delta)
    return min(math.exp(best), 1.0)

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


def _log_erfc(x: np.ndarray) -> np.ndarray:
    return math.log(2.0) + special.log_ndtr(-np.asarray(x) * 2**0.5)


def _log_a_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for integer orders (Mironov et al. 2019, Section 3.3, binomial expansion):
    A_alpha = sum_{i=0}^{alpha} C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2)).
    All orders at once: their terms concatenated, one segmented log-sum-exp.
    The binomial weights sum to 1, so A - 1 = sum_{i>=2} C(alpha, i) q^i (1-q)^(alpha-i)
    expm1((i^2 - i) / (2 sigma^2)), a sum of positive terms: log A = log1p(A - 1) keeps its
    relative precision when A - 1 is tiny (q ~ 1e-9), where log(sum) would be rounding noise.
    """
    alphas = np.asarray(alphas, dtype=np.int64)
    lens = alphas - 1  # terms i = 2..alpha
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    a = np.repeat(alphas, lens)
    i = np.arange(int(lens.sum())) - np.repeat(starts, lens) + 2
    # tables over 0..max order, indexed by the integer a and i (no special function per term)
    k = np.arange(int(alphas.max()) + 1, dtype=np.float64)
    log_fact = special.gammaln(k + 1)
    x = (k * k - k) / (2 * sigma**2)
    with np.errstate(divide="ignore"):  # k = 0, 1: x = 0, never indexed (i >= 2)
        by_i = x + np.log(-np.expm1(-x)) + k * math.log(q) - k * math.log1p(-q)  # log(e^x - 1) ...
    terms = (log_fact[a] - log_fact[i] - log_fact[a - i] + by_i[i]
             + a.astype(np.float64) * math.log1p(-q))
    m = np.maximum.reduceat(terms, starts)
    log_s = m + np.log(np.add.reduceat(np.exp(terms - np.repeat(m, lens)), starts))
    return np.logaddexp(0.0, log_s)  # log(1 + S)


_MAX_TERMS_FRAC = 1000
_TERM_CHUNKS = (64, 256, _MAX_TERMS_FRAC)


def _log_a_frac(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """An upper bound on log A_alpha for fractional orders (Mironov et al. 2019, Section 3.3,
    the two series over (-inf, z0] and [z0, inf)), all orders at once.

    Conservative, as dp_accounting 0.6 does: the binomial coefficients of a fractional order
    alternate in sign past i = alpha; adding their absolute values bounds A_alpha from above
    (so epsilon from above) and avoids cancelling subtractions in log space. A series stops at
    the first term i where both series decrease and both terms are below the running total by
    e^30; one that has not stopped after 1000 terms gives +inf: the order is then never the
    minimiser. Terms are computed for 64, then 256, then 1000 indices, for the orders still open.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    out = np.full(len(alphas), math.inf)
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    open_rows = np.arange(len(alphas))
    for n in _TERM_CHUNKS:
        if not len(open_rows):
            break
        A = alphas[open_rows, None]
        I = np.arange(n, dtype=np.float64)[None, :]
        J = A - I
        log_coef = special.gammaln(A + 1) - special.gammaln(I + 1) - special.gammaln(A - I + 1)
        s0 = (log_coef + I * log_q + J * log_1mq + (I * I - I) / (2 * sigma**2)
              + math.log(0.5) + _log_erfc((I - z0) / (math.sqrt(2) * sigma)))
        s1 = (log_coef + J * log_q + I * log_1mq + (J * J - J) / (2 * sigma**2)
              + math.log(0.5) + _log_erfc((z0 - J) / (math.sqrt(2) * sigma)))
        with np.errstate(invalid="ignore"):  # -inf - -inf in the running sums
            total = np.logaddexp(np.logaddexp.accumulate(s0, axis=1), np.logaddexp.accumulate(s1, axis=1))
        stop = np.zeros(s0.shape, dtype=bool)
        stop[:, 1:] = ((s0[:, 1:] < s0[:, :-1]) & (s1[:, 1:] < s1[:, :-1])
                       & (np.maximum(s0, s1)[:, 1:] < total[:, 1:] - 30))
        done = stop.any(axis=1)
        first = stop.argmax(axis=1)
        out[open_rows[done]] = total[np.flatnonzero(done), first[done]]
        open_rows = open_rows[~done]
    # log A near 0 is log(1 + tiny) computed as a difference of large terms: rounding noise
    # (q ~ 1e-7 and below). Such an order is dropped (+inf), never used with a too-small value;
    # the integer orders (exact log1p above) cover that regime.
    out[out < 1e-10] = math.inf
    return out


def rdp_poisson_gaussian(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP epsilon(alpha) of one step of the Poisson-subsampled Gaussian mechanism with sampling
    rate ``q`` and noise multiplier ``sigma``, at each order."""
    alphas = np.asarray(orders, dtype=np.float64)
    if q == 0:
        return np.zeros(len(alphas))
    if q == 1.0:
        return alphas / (2 * sigma**2)  # the Gaussian mechanism itself (Mironov 2017, Prop. 7)
    out = np.empty(len(alphas))
    is_int = alphas == np.floor(alphas)
    if is_int.any():
        out[is_int] = _log_a_int(q, sigma, alphas[is_int])
    if (~is_int).any():
        out[~is_int] = _log_a_frac(q, sigma, alphas[~is_int])
    return out / (alphas - 1)


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


def _checked(orders: Sequence[float], rdp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, r = np.asarray(orders, dtype=np.float64), np.asarray(rdp, dtype=np.float64)
    if np.any(r < 0):
        k = int(np.flatnonzero(r < 0)[0])
        raise ValueError(f"RDP values must be >= 0; got {r[k]} at order {a[k]}")
    return a, r


def epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, delta: float) -> float:
    """Smallest epsilon over the orders (Canonne-Kamath-Steinke 2020, Prop. 12):
    eps = rdp + log1p(-1/a) - log(delta * a) / (a - 1)."""
    a, r = _checked(orders, rdp)
    if np.any(delta**2 + np.expm1(-r) > 0):
        return 0.0  # delta >= sqrt(1 - exp(-KL)): (0, delta)-DP already
    use = a > 1.01
    if not use.any():
        return math.inf
    a, r = a[use], r[use]
    eps = r + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1)
    return max(0.0, float(np.min(eps)))


def delta_from_rdp(orders: Sequence[float], rdp: np.ndarray, epsilon: float) -> float:
    """Smallest delta over the orders (Canonne-Kamath-Steinke 2020, Prop. 12), or the KL bound
    delta <= sqrt(1 - exp(-rdp)) where smaller."""
    a, r = _checked(orders, rdp)
    with np.errstate(divide="ignore"):
        log_delta = np.where(r == 0, -math.inf, 0.5 * np.log1p(-np.exp(-r)))
        use = a > 1.01
        conv = (a - 1) * (r - epsilon + np.log1p(-1.0 / a)) - np.log(a)
    log_delta = np.where(use, np.minimum(log_delta, conv), log_delta)
    return min(math.exp(float(np.min(log_delta))), 1.0)

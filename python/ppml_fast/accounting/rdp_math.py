"""Rényi DP of the Poisson-subsampled Gaussian mechanism and the RDP -> (epsilon, delta)
conversion: pure functions on floats (the accountant in rdp.py keeps the state).

Sources, next to the formulas below:
- Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
  arXiv:1908.10530, Section 3.3: integer orders by the binomial expansion (here); fractional
  orders by the exact two-series expansion summed with signs, its tail certified by the
  alternating-series test (rdp_frac.py). dp_accounting 0.6 sums the absolute values of the
  fractional series instead (up to 2x looser in epsilon at large epsilon); Opacus 1.6 sums
  with signs but stops without a bound on the rest.
- Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", arXiv:2004.00010
  v4, Proposition 12 (equivalently Balle et al. 2020, "Hypothesis testing interpretations and
  Rényi differential privacy", Theorem 21): the conversion used in epsilon_from_rdp and
  delta_from_rdp.
All sums run in log space, so small q, large sigma and 10^6 steps are stable. Every value is
rounded up: each function adds an allowance for its floating-point error (documented where it
is added), so a result is an upper bound on the exact one, not only close to it.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import special

from ppml_fast.accounting import rdp_frac

# Orders. Near 1 (large epsilon): 1.01-1.04, then every 0.05 to 10.95 (a superset of Opacus's
# and dp_accounting's 1 + x/10); every integer to 256 (Opacus stops at 63, which is looser at
# small epsilon); and large integers to 10^4 (about 10% apart) for small epsilon, where the best
# order of a Gaussian is about sigma_eff sqrt(2 log(1/delta)). dp_accounting's 512 and 1024
# are included, so this grid is at least as fine as both libraries' defaults.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {1.0 + x / 100.0 for x in range(1, 5)}
        | {1.0 + x / 20.0 for x in range(1, 200)}
        | {float(a) for a in range(11, 257)}
        | {288.0, 320.0, 352.0, 384.0, 448.0, 512.0, 576.0, 640.0, 704.0, 768.0, 896.0, 1024.0,
           1152.0, 1280.0, 1408.0, 1536.0, 1792.0, 2048.0, 2304.0, 2560.0, 2816.0, 3072.0,
           3584.0, 4096.0, 4608.0, 5120.0, 5632.0, 6144.0, 7168.0, 8192.0, 9216.0, 10000.0}
    )
)
_U = float(np.finfo(float).eps)


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    if hi == -math.inf:
        return -math.inf
    return hi + math.log1p(math.exp(lo - hi))


def _log_erfc(x: np.ndarray) -> np.ndarray:
    return math.log(2.0) + special.log_ndtr(-np.asarray(x) * 2**0.5)


@functools.lru_cache(maxsize=8)
def _int_layout(alphas: tuple[int, ...]):
    """The q- and sigma-independent part of _log_a_int for these orders (cached: an accountant
    asks for the same orders at every new (q, sigma)): segment starts and lengths, each term's
    order a and index i, log C(a, i), and the sum of the absolute values of its log-gammas."""
    al = np.asarray(alphas, dtype=np.int64)
    lens = al - 1  # terms i = 2..alpha
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    a = np.repeat(al, lens)
    i = np.arange(int(lens.sum())) - np.repeat(starts, lens) + 2
    log_fact = special.gammaln(np.arange(int(al.max()) + 1, dtype=np.float64) + 1)
    log_binom = log_fact[a] - log_fact[i] - log_fact[a - i]
    mag_binom = np.maximum.reduceat(log_fact[a] + log_fact[i] + log_fact[a - i], starts)  # >= 0
    seg = np.repeat(np.arange(len(al)), lens)
    return lens, starts, al, seg, a.astype(np.float64), i, log_binom, mag_binom


def _log_a_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """Upper bounds on log A_alpha for integer orders (Mironov et al. 2019, Section 3.3,
    binomial expansion): A_alpha = sum_{i=0}^{alpha} C(alpha, i) q^i (1-q)^(alpha-i)
    exp((i^2 - i) / (2 sigma^2)). All orders at once: their terms concatenated, one segmented
    log-sum-exp.
    The binomial weights sum to 1, so A - 1 = sum_{i>=2} C(alpha, i) q^i (1-q)^(alpha-i)
    expm1((i^2 - i) / (2 sigma^2)), a sum of positive terms: log A = log1p(A - 1) keeps its
    relative precision when A - 1 is tiny (q ~ 1e-9), where log(sum) would be rounding noise.
    Rounding allowance (added): each term's log is taken to be within 16 u (sum of the absolute
    values of its components + 4) of the exact one (the functions used are accurate to a few
    ulps of their value), the segmented sum within 2 (n + 4) u relative for n terms, and each
    log, log1p within 2 u (1 + |value|).
    """
    lens, starts, al, seg, a_f, i, log_binom, mag_binom = _int_layout(tuple(int(x) for x in alphas))
    # tables over 0..max order, indexed by i (no special function per term)
    k = np.arange(int(al.max()) + 1, dtype=np.float64)
    x = (k * k - k) / (2 * sigma**2)
    with np.errstate(divide="ignore"):  # k = 0, 1: x = 0, never indexed (i >= 2)
        log_em1 = np.log(-np.expm1(-x))
    by_i = x + log_em1 + k * math.log(q) - k * math.log1p(-q)  # log(e^x - 1) ...
    terms = log_binom + by_i[i] + a_f * math.log1p(-q)
    m = np.maximum.reduceat(terms, starts)
    log_s = m + np.log(np.add.reduceat(np.exp(terms - m[seg]), starts))
    # the largest term error of each segment, bounded by the largest of each component over
    # i = 2..alpha: x, i |log q|, i |log(1-q)| grow with i (largest at i = alpha);
    # |log(1 - e^-x)| falls with x (largest at i = 2)
    mag = (x[al] + abs(float(log_em1[2])) + al * (abs(math.log(q)) + 2 * abs(math.log1p(-q))))
    d = 16 * _U * (mag_binom + mag + 4.0)
    log_s = log_s + d + 2 * (lens + 4) * _U + 2 * _U * (1 + np.abs(log_s))
    out = np.logaddexp(0.0, log_s)  # log(1 + S)
    return out * (1 + 4 * _U)  # log1p is accurate to an ulp or two of its value


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
        out[~is_int] = rdp_frac.log_a_frac_upper(q, sigma, alphas[~is_int])
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


def _rounded_up(r: np.ndarray, terms: int) -> np.ndarray:
    """``r`` raised by the rounding of a sum of ``terms`` non-negative rounded values (each
    addition or product errs by at most u relative)."""
    return r * (1 + 2 * (int(terms) + 2) * _U)


def epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, delta: float, *, terms: int = 1) -> float:
    """Smallest epsilon over the orders (Canonne-Kamath-Steinke 2020, Prop. 12):
    eps = rdp + log1p(-1/a) - log(delta * a) / (a - 1).
    Rounded up: ``rdp`` is taken as a sum of ``terms`` rounded values (an accountant passes its
    history's length) and raised by that rounding; the formula's own rounding (a few ulps of each
    of its three parts) is added."""
    a, r = _checked(orders, rdp)
    r = _rounded_up(r, terms)
    if np.any(delta**2 + np.expm1(-r) > 0):
        return 0.0  # delta >= sqrt(1 - exp(-KL)): (0, delta)-DP already
    use = a > 1.01
    if not use.any():
        return math.inf
    a, r = a[use], r[use]
    p1, p2 = np.log1p(-1.0 / a), np.log(delta * a) / (a - 1)
    eps = r + p1 - p2 + 8 * _U * (np.abs(r) + np.abs(p1) + np.abs(p2))
    return max(0.0, float(np.min(eps)))


def delta_from_rdp(orders: Sequence[float], rdp: np.ndarray, epsilon: float, *, terms: int = 1) -> float:
    """Smallest delta over the orders (Canonne-Kamath-Steinke 2020, Prop. 12), or the KL bound
    delta <= sqrt(1 - exp(-rdp)) where smaller (Bretagnolle-Huber; RDP grows with the order, so
    any order's value bounds the KL divergence). Rounded up as epsilon_from_rdp is."""
    a, r = _checked(orders, rdp)
    r = _rounded_up(r, terms)
    with np.errstate(divide="ignore"):
        log_delta = np.where(r == 0, -math.inf, 0.5 * np.log1p(-np.exp(-r)))
        use = a > 1.01
        p1 = np.log1p(-1.0 / a)
        conv = (a - 1) * (r - epsilon + p1) - np.log(a)
        conv = conv + 8 * _U * ((a - 1) * (np.abs(r) + epsilon + np.abs(p1)) + np.log(a))
    log_delta = np.where(use, np.minimum(log_delta, conv), log_delta)
    best = float(np.min(log_delta))
    if best == -math.inf:
        return 0.0
    return min(math.exp(best + 4 * _U * (1 + abs(best))) * (1 + 2 * _U), 1.0)

"""Rényi DP of the Gaussian mechanism run on a sample drawn without replacement (a uniformly
random subset of exactly m of the n records; adjacency: substitution of one record, n public):
pure functions on floats (the accountant in rdp.py keeps the state).

Source: Wang, Balle, Kasiviswanathan, "Subsampled Rényi Differential Privacy and Analytical
Moments Accountant", AISTATS 2019 (arXiv:1808.00087): the general upper bound for subsampling
without replacement (Theorem 9), in the form dp_accounting 0.6 implements for the Gaussian
mechanism (``_compute_rdp_sample_wor_gaussian_int``; its comments cite the strengthened bound as
Theorem 27 of the arXiv version), with gamma = m / n and integer alpha >= 2:

    A(alpha) = 1 + gamma^2 C(alpha, 2) min(4 (e^eps(2) - 1), 2 e^eps(2))
                 + sum_{j=3}^{alpha} gamma^j C(alpha, j)
                       min(4 sqrt(D_{2 floor(j/2)} D_{2 ceil(j/2)}), 2 e^{(j - 1) eps(j)}),
    eps_sampled(alpha) = log A(alpha) / (alpha - 1),

where eps(j) = j / (2 sigma^2) is the Gaussian mechanism's RDP (Mironov 2017, Prop. 7) and
D_k = sum_i (-1)^(k - i) C(k, i) e^{(i - 1) eps(i)} is the k-th forward difference at 0 of
i -> e^{(i - 1) eps(i)} (for even k, E[(L - 1)^k] > 0 with L the Gaussian likelihood ratio).
Like dp_accounting, orders above 256 keep only the second argument of each min (a looser but
valid bound; computing D_k there would cost O(alpha^2) high-precision terms), and a fractional
order interpolates log A linearly between the neighbouring integers (WBK19, Corollary 10).

One deliberate difference from dp_accounting: D_k alternates in sign term by term and cancels
catastrophically in float64 once sigma is large (dp_accounting's log-space differences are off
by up to 200x at sigma = 200, q = 0.1, order 256). Here D_k is summed in decimal arithmetic with
the precision raised until the cancellation is resolved to better than 1e-16 relative, so the
result is the theorem's bound to float accuracy: equal to dp_accounting's where its floats are
accurate, and smaller (tighter, still the proven bound) where they are not. If even 32,768 digits
do not resolve a D_k, it is taken as +inf (the other argument of the min is used: conservative).
"""

from __future__ import annotations

import decimal
import functools
import math
import numbers
from typing import Sequence

import numpy as np
from scipy import special

from ppml_fast.accounting import _checks

_EXACT_MAX_ORDER = 256  # dp_accounting's max_alpha: above it only the cap term is summed
_MAX_DIGITS = 1 << 15
_LOG2, _LOG4 = math.log(2.0), math.log(4.0)


@functools.lru_cache(maxsize=64)
def _log_even_forward_diffs(sigma: float, kmax: int) -> np.ndarray:
    """log D_k for k = 0, 1, ..., kmax (odd entries are NaN: never used), where
    D_k = sum_{i=0}^{k} (-1)^(k - i) C(k, i) g(i) and g(i) = exp(i (i - 1) / (2 sigma^2)).

    Exact to a relative 1e-16 (decimal arithmetic, precision doubled until the alternating sum's
    rounding error bound is 1e-16 of its value); +inf where 2^15 digits are not enough.
    """
    out = np.full(kmax + 1, np.nan)
    out[0] = 0.0
    pending = list(range(2, kmax + 1, 2))
    if kmax * kmax / (2.0 * sigma * sigma) > 1e9:  # g(i) past 10^(4e8): no cancellation to fear,
        out[pending] = math.inf  # but decimal exponents would not fit; the cap term is then used
        out.setflags(write=False)
        return out
    digits = 64
    while pending and digits <= _MAX_DIGITS:
        ctx = decimal.Context(prec=digits, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
        with decimal.localcontext(ctx):
            ratio = (1 / (decimal.Decimal(sigma) ** 2)).exp()  # g(i + 1) / g(i) = ratio^i
            g = [decimal.Decimal(1), decimal.Decimal(1)]
            power = decimal.Decimal(1)
            for i in range(1, kmax):
                power *= ratio
                g.append(g[i] * power)
            still = []
            for k in pending:
                plus = sum((math.comb(k, i) * g[i] for i in range(k, -1, -2)), decimal.Decimal(0))
                minus = sum((math.comb(k, i) * g[i] for i in range(k - 1, -1, -2)), decimal.Decimal(0))
                d = plus - minus
                # rounding (u = one unit in the last digit): g(i) is within i^2 (1 + 1/sigma^2) u
                # (ratio^j by j products, exp amplifying its argument's error by the argument),
                # each product and partial sum adds at most u; all relative to plus + minus
                factor = (k * k + 1) * (1.0 + 1.0 / sigma**2) + 5 * k + 10
                err = decimal.Decimal(factor) * decimal.Decimal(10) ** (1 - digits) * (plus + minus)
                if d > err * decimal.Decimal("1e16"):
                    with decimal.localcontext() as low:
                        low.prec = 30
                        out[k] = float(d.ln())
                else:
                    still.append(k)
        pending = still
        digits *= 2
    out[pending] = math.inf
    out.setflags(write=False)  # cached: shared by every caller
    return out


def _log_comb(n: float, k: np.ndarray) -> np.ndarray:
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def _log_a_int(q: float, sigma: float, alphas: Sequence[int]) -> dict[int, float]:
    """log A(alpha) (module docstring) for each integer alpha >= 1 (log A(1) = 0: the CGF at
    lambda = 0, used only to interpolate orders in (1, 2))."""
    log_q = math.log(q)
    eps2 = 1.0 / sigma**2  # eps(2) of the Gaussian mechanism
    # log(e^eps2 - 1) = eps2 + log(1 - e^-eps2), the latter through expm1 (accurate for large sigma)
    first = min(_LOG4 + eps2 + math.log(-math.expm1(-eps2)), _LOG2 + eps2)
    out = {a: 0.0 for a in alphas if a == 1}
    small = sorted(a for a in set(alphas) if 2 <= a <= _EXACT_MAX_ORDER)
    if small:
        top = small[-1]
        i = np.arange(2, top + 1, dtype=np.float64)
        cap = _LOG2 + (i - 1) * i / (2 * sigma**2)  # log(2 e^{(i-1) eps(i)})
        d = _log_even_forward_diffs(sigma, 2 * math.ceil(top / 2))
        ii = i.astype(int)
        lo, hi = d[2 * (ii // 2)], d[2 * ((ii + 1) // 2)]
        base = np.minimum(_LOG4 + 0.5 * (lo + hi), cap)
        base[0] = first
        base = base + i * log_q
        alphas_arr = np.array(small, dtype=np.float64)[:, None]
        terms = np.where(i[None, :] <= alphas_arr, base[None, :] + _log_comb(alphas_arr, i[None, :]), -np.inf)
        terms = np.concatenate([np.zeros((len(small), 1)), terms], axis=1)  # the leading 1
        for a, v in zip(small, special.logsumexp(terms, axis=1)):
            out[a] = float(v)
    for a in sorted(a for a in set(alphas) if a > _EXACT_MAX_ORDER):
        i = np.arange(2, a + 1, dtype=np.float64)
        base = _LOG2 + (i - 1) * i / (2 * sigma**2)
        base[0] = first
        terms = base + i * log_q + _log_comb(float(a), i)
        out[a] = float(special.logsumexp(np.concatenate([[0.0], terms])))
    return out


def rdp_sample_wor_gaussian(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP epsilon(alpha), at each order, of one Gaussian release (noise std = ``sigma`` x the
    L2 sensitivity under substitution) computed on a uniformly random subset of a fraction
    ``q`` = m / n of the n records, drawn without replacement.

    ``sigma`` is relative to the sensitivity under substitution: for a sum of per-record
    vectors clipped to norm C that sensitivity is 2 C, not C.
    """
    q = _checks.real("q", q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1]; got {q!r}")
    sigma = _checks.positive("sigma", sigma)
    alphas = [_checks.real("orders", a) for a in orders]
    if any(not a > 1.0 for a in alphas):
        raise ValueError(f"orders must be > 1; got {list(orders)!r}")
    if q == 0.0:
        return np.zeros(len(alphas))
    if q == 1.0:  # no sampling: the Gaussian mechanism itself (Mironov 2017, Prop. 7)
        return np.array(alphas) / (2 * sigma**2)
    finite = [a for a in alphas if math.isfinite(a)]
    needed = {math.floor(a) for a in finite} | {math.ceil(a) for a in finite}
    log_a = _log_a_int(q, sigma, sorted(needed))
    out = np.empty(len(alphas))
    for k, a in enumerate(alphas):
        if not math.isfinite(a):
            out[k] = math.inf
        elif a.is_integer():
            out[k] = log_a[int(a)] / (a - 1)
        else:  # WBK19, Corollary 10: the CGF (alpha - 1) eps(alpha) is convex in alpha, so
            # interpolating its bounds at the neighbouring integers bounds it
            lo, hi = math.floor(a), math.ceil(a)
            t = a - lo
            out[k] = ((1 - t) * log_a[lo] + t * log_a[hi]) / (a - 1)
    return out


def rdp_sampled_wor_gaussian(
    source_dataset_size: int, sample_size: int, noise_multiplier: float, orders: Sequence[float]
) -> np.ndarray:
    """``rdp_sample_wor_gaussian`` for a sample of ``sample_size`` of ``source_dataset_size``
    records (q = sample_size / source_dataset_size, as dp_accounting computes it): the RDP
    curve of one ``SampledWithoutReplacementEvent(n, m, GaussianEvent(noise_multiplier))``."""
    for name, v in (("source_dataset_size", source_dataset_size), ("sample_size", sample_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int; got {type(v).__name__} {v!r}")
    if source_dataset_size < 1:
        raise ValueError(f"source_dataset_size must be >= 1; got {source_dataset_size}")
    if not 0 <= sample_size <= source_dataset_size:
        raise ValueError(
            f"sample_size must be in [0, source_dataset_size={source_dataset_size}]; got {sample_size}"
        )
    bound = rdp_sample_wor_gaussian(sample_size / source_dataset_size, noise_multiplier, orders)
    # Never above the Gaussian mechanism on the whole sample: with the same index subset for both
    # neighbours, each subset's outputs differ by at most one substitution (RDP alpha/(2 sigma^2),
    # Mironov 2017, Prop. 7), and Rényi divergence is jointly quasi-convex over the mixture
    # (van Erven & Harremoës 2014, Thm. 13). Tighter than WBK19 for large sampling fractions.
    return np.minimum(bound, np.asarray(orders, dtype=np.float64) / (2 * noise_multiplier**2))

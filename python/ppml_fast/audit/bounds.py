"""Epsilon lower bounds from a distinguishing test's counts, with Clopper–Pearson intervals.

A test guesses, for each trial, whether the target record (a canary) was in the input ("in")
or not ("out"). Over ``positives`` trials with the record and ``negatives`` without it, it
makes ``fn`` false "out" guesses and ``fp`` false "in" guesses. If the mechanism is
(epsilon, delta)-DP, every such test has (Kairouz, Oh & Viswanath, ICML 2015, Theorem 2.1)

    FPR + e^epsilon FNR >= 1 - delta   and   FNR + e^epsilon FPR >= 1 - delta,

so epsilon >= max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)). The true rates
are unknown; replacing each by its one-sided Clopper–Pearson upper bound (exact binomial
intervals; Clopper & Pearson 1934) at significance (1 - confidence) / 2 makes the result a lower
bound on epsilon that holds with probability >= ``confidence`` (a union bound over the two
rates). This is the estimate of Jagielski, Ullman & Oprea, "Auditing differentially private
machine learning: how private is private SGD?", NeurIPS 2020, and of Nasr et al., "Adversary
instantiation", IEEE S&P 2021.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from scipy import stats

from ppml_fast.audit import _checks

ArrayLike = Union[int, np.ndarray]


def clopper_pearson_upper(successes: ArrayLike, trials: ArrayLike, significance: float) -> np.ndarray:
    """One-sided upper confidence bound on a binomial rate: the p at which seeing at most
    ``successes`` in ``trials`` has probability ``significance`` (1 where successes = trials).
    Vectorised over ``successes`` and ``trials``."""
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        hi = stats.beta.ppf(1.0 - significance, k + 1.0, np.maximum(n - k, 1.0))
    return np.where(k >= n, 1.0, hi)


def clopper_pearson_lower(successes: ArrayLike, trials: ArrayLike, significance: float) -> np.ndarray:
    """One-sided lower confidence bound on a binomial rate (0 where successes = 0)."""
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = stats.beta.ppf(significance, np.maximum(k, 1.0), n - k + 1.0)
    return np.where(k <= 0, 0.0, lo)


def clopper_pearson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The two-sided exact (Clopper–Pearson) interval of a binomial rate at ``confidence``."""
    k = _checks.count("successes", successes)
    n = _checks.count("trials", trials, minimum=1)
    if k > n:
        raise ValueError(f"successes must be <= trials ({n}); got {k}")
    alpha = 1.0 - _checks.open_unit("confidence", confidence)
    return float(clopper_pearson_lower(k, n, alpha / 2)), float(clopper_pearson_upper(k, n, alpha / 2))


def epsilon_from_rates(fpr: ArrayLike, fnr: ArrayLike, delta: float = 0.0) -> np.ndarray:
    """max(0, log((1 - delta - fpr) / fnr), log((1 - delta - fnr) / fpr)), element-wise: the
    smallest epsilon compatible with these error rates at ``delta`` (Kairouz et al. 2015,
    Theorem 2.1). A zero rate with a positive numerator gives inf."""
    fpr = np.asarray(fpr, dtype=np.float64)
    fnr = np.asarray(fnr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1.0 - delta - fpr, 0.0)) - np.log(fnr)
        b = np.log(np.maximum(1.0 - delta - fnr, 0.0)) - np.log(fpr)
    a = np.where(np.isnan(a), -np.inf, a)
    b = np.where(np.isnan(b), -np.inf, b)
    return np.maximum(np.maximum(a, b), 0.0)


def epsilon_lower_bound(
    *,
    tp: int,
    fp: int,
    tn: int,
    fn: int,
    delta: float = 0.0,
    confidence: float = 0.95,
    tests: int = 1,
) -> float:
    """The epsilon lower bound of one distinguishing test from its counts, at ``confidence``.

    Args:
        tp, fn: trials with the canary guessed "in" / "out" (positives = tp + fn >= 1).
        fp, tn: trials without the canary guessed "in" / "out" (negatives = fp + tn >= 1).
        delta: the delta of the claim being tested, in [0, 1).
        confidence: probability that the bound holds (over the trials' randomness).
        tests: how many tests the caller picked this one from (Bonferroni: each rate's
            significance is divided by ``tests``); 1 for a test fixed before seeing the data.

    Returns:
        epsilon >= 0 such that, with probability >= ``confidence``, the mechanism is not
        (epsilon', delta)-DP for any epsilon' < epsilon.
    """
    tp, fp, tn, fn = (_checks.count(n, v) for n, v in (("tp", tp), ("fp", fp), ("tn", tn), ("fn", fn)))
    if tp + fn < 1:
        raise ValueError(f"tp + fn (trials with the canary) must be >= 1; got {tp + fn}")
    if fp + tn < 1:
        raise ValueError(f"fp + tn (trials without the canary) must be >= 1; got {fp + tn}")
    delta = _checks.delta("delta", delta)
    alpha = 1.0 - _checks.open_unit("confidence", confidence)
    tests = _checks.count("tests", tests, minimum=1)
    sig = alpha / (2 * tests)
    fpr_hi = clopper_pearson_upper(fp, fp + tn, sig)
    fnr_hi = clopper_pearson_upper(fn, tp + fn, sig)
    return float(epsilon_from_rates(fpr_hi, fnr_hi, delta))  # finite: CP upper bounds are > 0

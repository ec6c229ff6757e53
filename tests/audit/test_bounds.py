"""Clopper–Pearson bounds and the epsilon of a distinguishing test's counts, against values
computed by hand (closed forms for zero counts, the binomial CDF for the rest)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ppml_fast.audit import (
    clopper_pearson_interval,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
)


def test_clopper_pearson_closed_forms():
    # no successes in n: P[Bin(n, p) = 0] = (1 - p)^n = alpha  ->  p = 1 - alpha^(1/n)
    assert float(clopper_pearson_upper(0, 100, 0.025)) == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-12)
    # all successes: P[Bin(n, p) = n] = p^n = alpha  ->  p = alpha^(1/n)
    assert float(clopper_pearson_lower(50, 50, 0.05)) == pytest.approx(0.05 ** (1 / 50), rel=1e-12)
    assert float(clopper_pearson_upper(7, 7, 0.05)) == 1.0
    assert float(clopper_pearson_lower(0, 7, 0.05)) == 0.0


@pytest.mark.parametrize("k, n", [(1, 10), (13, 40), (250, 1000)])
def test_clopper_pearson_defining_property(k, n):
    """The upper bound p solves P[Bin(n, p) <= k] = alpha; the lower solves P[Bin(n, p) >= k] = alpha."""
    alpha = 0.05
    hi = float(clopper_pearson_upper(k, n, alpha))
    lo = float(clopper_pearson_lower(k, n, alpha))
    assert stats.binom.cdf(k, n, hi) == pytest.approx(alpha, rel=1e-8)
    assert stats.binom.sf(k - 1, n, lo) == pytest.approx(alpha, rel=1e-8)
    lo2, hi2 = clopper_pearson_interval(k, n, 0.90)  # two-sided 90% = one-sided 5% each
    assert (lo2, hi2) == pytest.approx((lo, hi), rel=1e-12)


def test_epsilon_from_rates_by_hand():
    # max(log((1 - 0.1) / 0.2), log((1 - 0.2) / 0.1)) = log 8
    assert float(epsilon_from_rates(0.1, 0.2)) == pytest.approx(math.log(8))
    assert float(epsilon_from_rates(0.1, 0.2, 0.05)) == pytest.approx(math.log(0.75 / 0.1))
    assert float(epsilon_from_rates(0.5, 0.5)) == 0.0  # a coin flip: no evidence
    assert float(epsilon_from_rates(0.7, 0.7)) == 0.0  # worse than a coin flip: 0, not negative
    assert float(epsilon_from_rates(0.0, 0.3)) == math.inf


def test_epsilon_lower_bound_by_hand():
    # a perfect test on 100 + 100 trials: both rates bounded by u = 1 - 0.025^(1/100)
    u = 1 - 0.025 ** (1 / 100)
    got = epsilon_lower_bound(tp=100, fp=0, tn=100, fn=0, confidence=0.95)
    assert got == pytest.approx(math.log((1 - u) / u), rel=1e-10)
    # with delta, and a Bonferroni factor of 4 (each rate at 0.05 / 8)
    u4 = 1 - (0.05 / 8) ** (1 / 100)
    got = epsilon_lower_bound(tp=100, fp=0, tn=100, fn=0, delta=0.01, tests=4)
    assert got == pytest.approx(math.log((1 - 0.01 - u4) / u4), rel=1e-10)
    # 30 false "in" out of 1000 negatives, 500 false "out" of 1000 positives
    fpr = float(clopper_pearson_upper(30, 1000, 0.025))
    fnr = float(clopper_pearson_upper(500, 1000, 0.025))
    want = max(math.log((1 - fpr) / fnr), math.log((1 - fnr) / fpr))
    assert epsilon_lower_bound(tp=500, fp=30, tn=970, fn=500) == pytest.approx(want, rel=1e-12)
    assert epsilon_lower_bound(tp=50, fp=50, tn=50, fn=50) == 0.0  # chance


def test_more_trials_tighter_bound():
    small = epsilon_lower_bound(tp=100, fp=0, tn=100, fn=0)
    large = epsilon_lower_bound(tp=10_000, fp=0, tn=10_000, fn=0)
    assert 0 < small < large


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(tp=-1, fp=0, tn=1, fn=0), ValueError, "tp"),
    (dict(tp=1.5, fp=0, tn=1, fn=0), TypeError, "tp"),
    (dict(tp=True, fp=0, tn=1, fn=0), TypeError, "tp"),
    (dict(tp=0, fp=0, tn=1, fn=0), ValueError, "tp \\+ fn"),
    (dict(tp=1, fp=0, tn=0, fn=0), ValueError, "fp \\+ tn"),
    (dict(tp=1, fp=0, tn=1, fn=0, confidence=1.0), ValueError, "confidence"),
    (dict(tp=1, fp=0, tn=1, fn=0, delta=1.0), ValueError, "delta"),
    (dict(tp=1, fp=0, tn=1, fn=0, tests=0), ValueError, "tests"),
])
def test_epsilon_lower_bound_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        epsilon_lower_bound(**kwargs)


def test_interval_bad_input():
    with pytest.raises(ValueError, match="successes must be <= trials"):
        clopper_pearson_interval(11, 10)
    with pytest.raises(ValueError, match="trials"):
        clopper_pearson_interval(0, 0)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson_interval(1, 10, 0.0)


def test_vectorised_bounds_match_scalar():
    ks = np.array([0, 3, 10])
    hi = clopper_pearson_upper(ks, 10, 0.05)
    assert [float(h) for h in hi] == [float(clopper_pearson_upper(int(k), 10, 0.05)) for k in ks]

"""RDP of the Gaussian mechanism on a sample drawn without replacement: dp_accounting cross-checks
(per order and through the accountant), an exact high-precision reference where dp_accounting's
float64 forward differences cancel, monotonicity in the sample size, edge cases, bad input."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from ppml_fast.accounting import (
    GaussianEvent,
    LaplaceEvent,
    PoissonSampledEvent,
    RDPAccountant,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
)
from ppml_fast.accounting import rdp_sampled_wor as wor
from ppml_fast.accounting.rdp import MixedAdjacencyError

# integer and fractional orders, both sides of 256 (above it only the cap term is summed)
ORDERS = [1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.5, 8.0, 16.0, 32.0, 63.5, 64.0, 128.0, 255.0, 256.0,
          300.0, 512.0]


def wor_event(n, m, sigma):
    return SampledWithoutReplacementEvent(n, m, GaussianEvent(sigma))


# --- exact reference: the theorem's sum with mpmath at 1,000 digits --------------------------
mpmath = pytest.importorskip("mpmath")


def reference_log_a(q, sigma, alpha):
    """log A(alpha) of rdp_sampled_wor's docstring, every term in 1,000-digit arithmetic."""
    with mpmath.workdps(1000):
        q, s2 = mpmath.mpf(q), mpmath.mpf(sigma) ** 2
        g = [mpmath.exp(mpmath.mpf(i) * (i - 1) / (2 * s2)) for i in range(alpha + 3)]
        # even forward differences at 0 of g
        d = {k: mpmath.fsum((-1) ** (k - i) * mpmath.binomial(k, i) * g[i] for i in range(k + 1))
             for k in range(2, alpha + 2, 2)} if alpha <= 256 else {}
        eps2 = 1 / s2
        total = 1 + q**2 * mpmath.binomial(alpha, 2) * min(4 * mpmath.expm1(eps2), 2 * mpmath.exp(eps2))
        for j in range(3, alpha + 1):
            cap = 2 * mpmath.exp(mpmath.mpf(j - 1) * j / (2 * s2))
            if alpha <= 256:
                cap = min(4 * mpmath.sqrt(d[2 * (j // 2)] * d[2 * ((j + 1) // 2)]), cap)
            total += q**j * mpmath.binomial(alpha, j) * cap
        return float(mpmath.log(total))


@pytest.mark.parametrize("sigma", [0.7, 10.0, 1000.0])
def test_forward_differences_are_exact(sigma):
    ours = wor._log_even_forward_diffs(sigma, 256)
    with mpmath.workdps(1000):
        s2 = mpmath.mpf(sigma) ** 2
        g = [mpmath.exp(mpmath.mpf(i) * (i - 1) / (2 * s2)) for i in range(257)]
        for k in (2, 4, 64, 130, 256):
            d = mpmath.fsum((-1) ** (k - i) * mpmath.binomial(k, i) * g[i] for i in range(k + 1))
            assert d > 0
            ref = float(mpmath.log(d))
            assert ours[k] == pytest.approx(ref, rel=1e-14, abs=1e-12)


@pytest.mark.parametrize(
    "q, sigma, alpha",
    [(0.1, 10.0, 256), (0.5, 10.0, 128), (0.5, 50.0, 128), (0.9, 50.0, 63), (0.1, 1000.0, 130),
     (0.9, 200.0, 8), (0.01, 2.0, 3), (0.3, 0.8, 40), (0.2, 3.0, 300)],
)
def test_equals_the_exact_bound(q, sigma, alpha):
    ours = wor.rdp_sample_wor_gaussian(q, sigma, [float(alpha)])[0]
    assert ours == pytest.approx(reference_log_a(q, sigma, alpha) / (alpha - 1), rel=1e-12)


# --- cross-checks against Google's dp_accounting -----------------------------------------------
dpa = pytest.importorskip("dp_accounting")
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _quiet_dp_accounting():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


# sigma <= 5: dp_accounting's float64 forward differences are accurate (to ~1e-9 relative) there
GRID = [(n, m, sigma)
        for n in (100, 60_000) for m in (1, n // 10, n // 2, n - 1) for sigma in (0.5, 1.0, 2.0, 5.0)]


@pytest.mark.parametrize("n, m, sigma", GRID)
def test_rdp_per_order_equals_dp_accounting(n, m, sigma):
    ours = wor.rdp_sampled_wor_gaussian(n, m, sigma, ORDERS)
    theirs = dpa_rdp._compute_rdp_sample_wor_gaussian(m / n, sigma, ORDERS)
    # ours is also capped by the unsampled Gaussian's alpha / (2 sigma^2) (quasi-convexity)
    theirs = np.minimum(theirs, np.asarray(ORDERS, dtype=float) / (2 * sigma**2))
    np.testing.assert_allclose(ours, theirs, rtol=2e-9, atol=0)


def test_capped_by_the_unsampled_gaussian_where_wbk19_is_looser():
    orders = [1.1, 2.0, 8.0]
    ours = wor.rdp_sampled_wor_gaussian(10, 9, 1.0, orders)
    wbk = dpa_rdp._compute_rdp_sample_wor_gaussian(0.9, 1.0, orders)
    np.testing.assert_allclose(ours[:2], np.asarray(orders[:2]) / 2, rtol=1e-15)  # the cap
    assert np.all(wbk[:2] > 1.5 * ours[:2])
    assert ours[2] == wbk[2] < 8.0 / 2  # WBK19 is the tighter one at order 8


@pytest.mark.parametrize("q, sigma", [(0.1, 10.0), (0.5, 10.0), (0.5, 50.0), (0.9, 200.0)])
def test_where_dp_accounting_floats_cancel(q, sigma):
    # Its float64 forward differences cancel for large sigma: its values are then up to ~20x too
    # large at high orders, and up to ~2e-9 (relative) too small at low ones; ours equal the exact
    # bound (test_equals_the_exact_bound covers these points).
    ours = wor.rdp_sample_wor_gaussian(q, sigma, ORDERS)
    theirs = dpa_rdp._compute_rdp_sample_wor_gaussian(q, sigma, ORDERS)
    assert np.all(ours <= theirs * (1 + 1e-8))
    assert np.any(ours < 0.9 * theirs)


DPA_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0,
              48.0, 64.0, 128.0, 256.0]


@pytest.mark.parametrize("n, m, sigma, steps", [(60_000, 256, 1.0, 2000), (1000, 10, 0.8, 100),
                                                 (500, 250, 2.0, 1), (100, 1, 0.6, 10_000)])
@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_epsilon_against_dp_accounting(n, m, sigma, steps, delta):
    theirs = dpa_rdp.RdpAccountant(DPA_ORDERS, dpa.NeighboringRelation.REPLACE_ONE)
    theirs.compose(dpa.SelfComposedDpEvent(
        dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(sigma)), steps))
    ours = RDPAccountant(DPA_ORDERS).compose(wor_event(n, m, sigma), steps)
    assert ours.get_epsilon(delta) == pytest.approx(theirs.get_epsilon(delta), rel=1e-9)
    assert ours.get_delta(1.0) == pytest.approx(theirs.get_delta(1.0), rel=1e-9)


# --- properties and edge cases -----------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.6, 1.0, 4.0])
def test_monotone_in_the_sample_size(sigma):
    n = 50
    curves = [wor.rdp_sampled_wor_gaussian(n, m, sigma, ORDERS) for m in range(n)]
    for smaller, larger in zip(curves, curves[1:]):
        assert np.all(larger >= smaller)
    eps = [RDPAccountant().compose(wor_event(n, m, sigma), 100).get_epsilon(1e-5) for m in (1, 5, 25, 49)]
    assert eps == sorted(eps)


@pytest.mark.parametrize("sigma", [0.5, 3.0])
def test_edge_sample_sizes(sigma):
    assert np.array_equal(wor.rdp_sampled_wor_gaussian(10, 0, sigma, ORDERS), np.zeros(len(ORDERS)))
    assert RDPAccountant().compose(wor_event(10, 0, sigma), 1000).get_epsilon(1e-5) == 0.0
    # the whole data set: the Gaussian mechanism itself (Mironov 2017, Prop. 7)
    full = wor.rdp_sampled_wor_gaussian(10, 10, sigma, ORDERS)
    np.testing.assert_array_equal(full, np.array(ORDERS) / (2 * sigma**2))
    assert (RDPAccountant().compose(wor_event(10, 10, sigma), 3).get_epsilon(1e-5)
            == RDPAccountant().compose(GaussianEvent(sigma), 3).get_epsilon(1e-5))
    theirs = dpa_rdp._compute_rdp_sample_wor_gaussian(1.0, sigma, ORDERS)
    np.testing.assert_array_equal(full, theirs)


def test_huge_and_tiny_noise_stay_finite_or_infinite_as_they_should():
    big = wor.rdp_sample_wor_gaussian(0.5, 1e5, ORDERS)
    assert np.all(np.isfinite(big)) and np.all(big >= 0)
    # orders <= 256: the exact bound, ~ q^2 alpha / sigma^2; above, only the cap term (as in
    # dp_accounting): ~ log(1 + q) whatever sigma, never the minimising order
    assert np.all(big[np.array(ORDERS) <= 256] < 1e-6)
    tiny = wor.rdp_sample_wor_gaussian(0.5, 1e-3, [2.0, 64.0, 512.0])
    assert np.all(tiny > 1e4)


def test_accountant_state_round_trip_and_history():
    acc = RDPAccountant().compose(wor_event(1000, 32, 1.1), 50).compose(GaussianEvent(3.0))
    assert acc.events[0] == ("sampled_wor_gaussian", 1000, 32, 1.1, 50)
    other = RDPAccountant()
    other.load_state_dict(acc.state_dict())
    assert other.get_epsilon(1e-6) == acc.get_epsilon(1e-6)
    assert other.supports(SelfComposedEvent(wor_event(10, 3, 1.0), 4))
    assert not other.supports(SampledWithoutReplacementEvent(10, 3, LaplaceEvent(1.0)))


def test_substitution_and_add_remove_do_not_mix():
    acc = RDPAccountant().compose(wor_event(1000, 32, 1.1), 5)
    before = acc.get_epsilon(1e-5)
    with pytest.raises(MixedAdjacencyError):
        acc.compose(PoissonSampledEvent(0.01, GaussianEvent(1.0)))
    assert acc.get_epsilon(1e-5) == before


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: wor.rdp_sample_wor_gaussian(1.5, 1.0, [2.0]), ValueError, "q"),
        (lambda: wor.rdp_sample_wor_gaussian(float("nan"), 1.0, [2.0]), ValueError, "q"),
        (lambda: wor.rdp_sample_wor_gaussian(0.1, 0.0, [2.0]), ValueError, "sigma"),
        (lambda: wor.rdp_sample_wor_gaussian(0.1, 1.0, [1.0]), ValueError, "orders"),
        (lambda: wor.rdp_sampled_wor_gaussian(10, 11, 1.0, [2.0]), ValueError, "sample_size"),
        (lambda: wor.rdp_sampled_wor_gaussian(0, 0, 1.0, [2.0]), ValueError, "source_dataset_size"),
        (lambda: wor.rdp_sampled_wor_gaussian(10.0, 1, 1.0, [2.0]), TypeError, "source_dataset_size"),
        (lambda: wor.rdp_sampled_wor_gaussian(10, True, 1.0, [2.0]), TypeError, "sample_size"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_infinite_order_is_infinite():
    out = wor.rdp_sample_wor_gaussian(0.1, 1.0, [2.0, math.inf])
    assert math.isfinite(out[0]) and out[1] == math.inf

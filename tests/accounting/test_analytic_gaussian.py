"""Analytic Gaussian mechanism (Balle & Wang 2018): exact delta and the calibrated sigma."""

from __future__ import annotations

import math

import pytest

from ppml_fast.accounting import analytic_gaussian_sigma, gaussian_delta


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_sigma_is_the_smallest_that_meets_delta(epsilon, delta):
    sigma = analytic_gaussian_sigma(epsilon, delta)
    assert gaussian_delta(sigma, epsilon) <= delta
    assert gaussian_delta(sigma * (1 - 1e-9), epsilon) > delta * (1 - 1e-6)


def test_known_value_and_the_classical_bound():
    sigma = analytic_gaussian_sigma(1.0, 1e-5)
    assert sigma == pytest.approx(3.7306, rel=1e-4)
    # Dwork & Roth's sqrt(2 ln(1.25 / delta)) / epsilon (valid for epsilon < 1) is looser
    assert sigma < math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0


def test_sigma_scales_with_sensitivity():
    assert analytic_gaussian_sigma(0.7, 1e-6, sensitivity=3.0) == pytest.approx(
        3.0 * analytic_gaussian_sigma(0.7, 1e-6), rel=1e-10
    )


@pytest.mark.parametrize(
    "args, match",
    [((0.0, 1e-5), "epsilon"), ((1.0, 0.0), "delta"), ((1.0, 1.0), "delta"),
     ((float("nan"), 1e-5), "epsilon"), ((1.0, 1e-5, -1.0), "sensitivity")],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        analytic_gaussian_sigma(*args)


dpa_pld = pytest.importorskip("dp_accounting.pld.privacy_loss_distribution")


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("epsilon", [0.1, 1.0, 4.0])
def test_delta_matches_dp_accounting_pld(sigma, epsilon):
    theirs = dpa_pld.from_gaussian_mechanism(sigma, value_discretization_interval=1e-4)
    want = theirs.get_delta_for_epsilon(epsilon)
    assert gaussian_delta(sigma, epsilon) == pytest.approx(want, rel=1e-6, abs=1e-15)

"""Mechanisms: distributions (statistical tests with fixed seeds, thresholds from the
distribution), events, calibration, types, and bad input leaving the noise source unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ppml_fast.accounting import (
    GaussianEvent,
    LaplaceEvent,
    RandomizedResponseEvent,
    RDPAccountant,
    analytic_gaussian_sigma,
)
from ppml_fast.mechanisms import (
    NoiseSource,
    gaussian_mechanism,
    laplace_mechanism,
    randomized_response,
    report_noisy_max,
)

N = 200_000
P_MIN = 1e-4  # a correct sampler fails one of these tests with probability ~1e-4 per test


def test_gaussian_mechanism_distribution_and_event():
    x = torch.full((N,), 3.0)
    y, event = gaussian_mechanism(x, sensitivity=0.5, noise_multiplier=2.0, rng=NoiseSource(1))
    assert event == GaussianEvent(2.0)
    assert torch.equal(x, torch.full((N,), 3.0))  # input unchanged
    z = ((y - 3.0) / 1.0).double().numpy()  # std = 2.0 * 0.5
    assert stats.kstest(z, "norm").pvalue > P_MIN


def test_gaussian_mechanism_by_epsilon_uses_analytic_sigma():
    y, event = gaussian_mechanism(np.zeros(10), sensitivity=2.0, epsilon=1.0, delta=1e-5, rng=NoiseSource(2))
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    assert event.noise_multiplier == analytic_gaussian_sigma(1.0, 1e-5, 1.0)


def test_laplace_mechanism_distribution_and_event():
    y, event = laplace_mechanism(torch.zeros(N, dtype=torch.float64), sensitivity=2.0, epsilon=0.5,
                                 rng=NoiseSource(3))
    assert event == LaplaceEvent(2.0)
    assert stats.kstest(y.numpy(), "laplace", args=(0.0, 4.0)).pvalue > P_MIN  # scale 2 * 2


def test_float_in_float_out_and_reproducible():
    a, _ = gaussian_mechanism(1.5, sensitivity=1.0, noise_multiplier=1.0, rng=NoiseSource(7))
    b, _ = gaussian_mechanism(1.5, sensitivity=1.0, noise_multiplier=1.0, rng=NoiseSource(7))
    assert isinstance(a, float) and a == b and a != 1.5


def test_noise_source_never_repeats():
    rng = NoiseSource(5)
    a = rng.normal((1000,))
    b = rng.normal((1000,))
    assert not torch.equal(a, b)
    assert rng.offset == 1000


def test_secure_source_is_not_reproducible():
    a = NoiseSource(secure=True).normal((64,))
    b = NoiseSource(secure=True).normal((64,))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="secure mode"):  # a seed there was silently ignored
        NoiseSource(1, secure=True)


@pytest.mark.parametrize("k, eps", [(2, 1.0), (10, 2.0)])
def test_randomized_response_frequencies(k, eps):
    values = torch.zeros(N, dtype=torch.int64)
    out, event = randomized_response(values, num_buckets=k, epsilon=eps, rng=NoiseSource(11))
    assert isinstance(event, RandomizedResponseEvent) and event.epsilon == pytest.approx(eps, rel=1e-12)
    p = event.noise_parameter
    expected = np.full(k, p / k)
    expected[0] += 1 - p
    counts = np.bincount(out.numpy(), minlength=k)
    assert stats.chisquare(counts, expected * N).pvalue > P_MIN
    # local DP: the ratio of the probabilities of reporting 0 from input 0 and from input 1
    assert expected[0] / (p / k) == pytest.approx(math.exp(eps), rel=1e-12)


def test_randomized_response_keeps_type_and_checks_range():
    out, _ = randomized_response(np.array([0, 1, 2], dtype=np.int32), num_buckets=3,
                                 noise_parameter=0.5, rng=NoiseSource(0))
    assert out.dtype == np.int32 and out.shape == (3,)
    rng = NoiseSource(0)
    with pytest.raises(ValueError, match="values"):
        randomized_response(torch.tensor([0, 3]), num_buckets=3, epsilon=1.0, rng=rng)
    with pytest.raises(TypeError, match="values"):
        randomized_response(torch.tensor([0.0]), num_buckets=3, epsilon=1.0, rng=rng)
    assert rng.offset == 0


def test_report_noisy_max_picks_the_clear_winner_and_returns_the_release_event():
    scores = torch.tensor([[0.0, 100.0, 0.0], [50.0, 0.0, 0.0]])
    idx, event = report_noisy_max(scores, sensitivity=math.sqrt(2), noise_multiplier=1.0, rng=NoiseSource(4))
    assert idx.tolist() == [1, 0] and event == GaussianEvent(1.0)
    idx, event = report_noisy_max(scores.numpy(), sensitivity=2.0, laplace_scale=1.0, rng=NoiseSource(4))
    assert idx.tolist() == [1, 0] and event == LaplaceEvent(1.0)


def test_report_noisy_max_is_noisy_on_ties():
    scores = torch.zeros(20_000, 4)
    idx, _ = report_noisy_max(scores, sensitivity=1.0, noise_multiplier=1.0, rng=NoiseSource(9))
    counts = np.bincount(idx.numpy(), minlength=4)
    assert stats.chisquare(counts).pvalue > P_MIN  # uniform over the tied classes


def test_events_compose_in_one_accountant():
    rng = NoiseSource(0)
    _, e1 = gaussian_mechanism(torch.zeros(3), sensitivity=1.0, noise_multiplier=3.0, rng=rng)
    _, e2 = laplace_mechanism(torch.zeros(3), sensitivity=1.0, scale=5.0, rng=rng)
    _, e3 = randomized_response(torch.zeros(3, dtype=torch.long), num_buckets=2, epsilon=0.3, rng=rng)
    acc = RDPAccountant()
    for e in (e1, e2, e3):
        acc.compose(e)
    alone = RDPAccountant().compose(e1).get_epsilon(1e-5)
    assert acc.get_epsilon(1e-5) > alone


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda r: gaussian_mechanism(torch.zeros(2), sensitivity=0.0, noise_multiplier=1.0, rng=r), ValueError, "sensitivity"),
        (lambda r: gaussian_mechanism(torch.zeros(2), sensitivity=1.0, rng=r), ValueError, "noise_multiplier"),
        (lambda r: gaussian_mechanism(torch.zeros(2), sensitivity=1.0, epsilon=1.0, rng=r), ValueError, "delta"),
        (lambda r: gaussian_mechanism(torch.zeros(2), sensitivity=1.0, noise_multiplier=-1.0, rng=r), ValueError, "noise_multiplier"),
        (lambda r: gaussian_mechanism(torch.tensor([1.0, float("nan")]), sensitivity=1.0, noise_multiplier=1.0, rng=r), ValueError, "value"),
        (lambda r: gaussian_mechanism(torch.zeros(2, dtype=torch.long), sensitivity=1.0, noise_multiplier=1.0, rng=r), TypeError, "value"),
        (lambda r: gaussian_mechanism("x", sensitivity=1.0, noise_multiplier=1.0, rng=r), TypeError, "value"),
        (lambda r: laplace_mechanism(torch.zeros(2), sensitivity=1.0, epsilon=0.0, rng=r), ValueError, "epsilon"),
        (lambda r: laplace_mechanism(torch.zeros(2), sensitivity=1.0, scale=1.0, epsilon=1.0, rng=r), ValueError, "scale"),
        (lambda r: report_noisy_max(torch.zeros(0), sensitivity=1.0, noise_multiplier=1.0, rng=r), ValueError, "scores"),
        (lambda r: gaussian_mechanism(torch.zeros(2), sensitivity=1.0, noise_multiplier=1.0, rng=object()), TypeError, "rng"),
    ],
)
def test_bad_input(call, exc, match):
    rng = NoiseSource(0)
    with pytest.raises(exc, match=match):
        call(rng)
    assert rng.offset == 0


def test_bad_noise_source():
    with pytest.raises(ValueError, match="seed"):
        NoiseSource(-1)
    with pytest.raises(TypeError, match="secure"):
        NoiseSource(0, secure=1)


def test_randomized_response_refuses_buckets_beyond_the_dtype():
    with pytest.raises(ValueError, match="num_buckets"):
        randomized_response(np.zeros(3, dtype=np.uint8), num_buckets=300, epsilon=1.0, rng=NoiseSource(0))

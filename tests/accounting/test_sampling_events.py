"""Events for non-Poisson batch sampling (accounting/sampling_events.py): shuffled fixed-size
batches and balls-in-bins (one Gaussian per epoch touched), truncated Poisson (a mixture of two
Poisson-subsampled Gaussians), checked against closed forms and dp_accounting 0.6."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant as dpa_pld
from scipy import stats

from ppml_fast.accounting import (
    BallsInBinsEvent,
    ComposedEvent,
    GaussianEvent,
    LaplaceEvent,
    MixedAdjacencyError,
    PLDAccountant,
    PoissonSampledEvent,
    RDPAccountant,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledBatchesEvent,
    TruncatedPoissonEvent,
    UnsupportedEventError,
    event_from_dict,
    event_to_dict,
)
from ppml_fast.accounting import pld_math

ACCOUNTANTS = (PLDAccountant, RDPAccountant)


def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism (Balle & Wang 2018, Theorem 8), by bisection."""
    return pld_math.gaussian_epsilon(sigma, delta)


@pytest.mark.parametrize("steps,epochs", [(1, 1), (9, 1), (10, 1), (11, 2), (20, 2), (25, 3), (0, 0)])
def test_a_partial_epoch_counts_whole(steps, epochs):
    e = ShuffledBatchesEvent.dp_sgd(1.0, 10, steps)
    assert e.participations == epochs
    eps = PLDAccountant().compose(e).get_epsilon(1e-5)
    if epochs == 0:
        assert eps == 0.0
    else:  # E Gaussians of sigma compose to one of sigma / sqrt(E), exactly (no grid for these)
        assert eps == pytest.approx(_gaussian_epsilon(1.0 / math.sqrt(epochs), 1e-5), rel=1e-9)


@pytest.mark.parametrize("sigma,epochs", [(0.8, 1), (1.0, 3), (2.0, 10), (4.0, 50)])
def test_shuffled_equals_dp_accountings_gaussian_composition(sigma, epochs):
    """What JAX Privacy's balls_in_bins_accounting.py takes as its no-amplification bound: a
    Gaussian mechanism with sensitivity sqrt(ceil(T / K)); dp_accounting's PLD (a pessimistic
    grid) is at or above our exact value, by its discretisation only."""
    k = 7
    e = ShuffledBatchesEvent.dp_sgd(sigma, k, epochs * k - 3)
    ref = dpa_pld.PLDAccountant()
    ref.compose(dpa.GaussianDpEvent(sigma / math.sqrt(math.ceil((epochs * k - 3) / k))))
    ours = PLDAccountant().compose(e).get_epsilon(1e-6)
    assert ours <= ref.get_epsilon(1e-6) + 1e-9
    assert ours == pytest.approx(ref.get_epsilon(1e-6), rel=2e-3)
    rdp_ref = dpa.rdp.RdpAccountant().compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma),
                                                                       e.participations))
    assert RDPAccountant().compose(e).get_epsilon(1e-6) == pytest.approx(rdp_ref.get_epsilon(1e-6), rel=1e-3)


def test_substitution_halves_the_noise_and_reads_higher():
    zero = ShuffledBatchesEvent.dp_sgd(1.5, 10, 30)
    sub = ShuffledBatchesEvent.dp_sgd(1.5, 10, 30, adjacency="substitution")
    assert sub.event == GaussianEvent(0.75) and zero.event == GaussianEvent(1.5)
    for acc in ACCOUNTANTS:
        assert acc().compose(sub).get_epsilon(1e-5) > 1.5 * acc().compose(zero).get_epsilon(1e-5)


@pytest.mark.parametrize("acc", ACCOUNTANTS)
def test_monotone_in_steps_and_noise(acc):
    eps = [acc().compose(ShuffledBatchesEvent.dp_sgd(1.0, 10, t)).get_epsilon(1e-5) for t in range(1, 60, 3)]
    assert all(a <= b for a, b in zip(eps, eps[1:]))
    eps = [acc().compose(ShuffledBatchesEvent.dp_sgd(s, 10, 35)).get_epsilon(1e-5) for s in (0.5, 1, 2, 4)]
    assert all(a > b for a, b in zip(eps, eps[1:]))


@pytest.mark.parametrize("acc", ACCOUNTANTS)
def test_shuffled_is_above_poisson_where_it_should_be(acc):
    """Same noise, same steps, q = 1 / K: without amplification the shuffled epsilon is far
    above the Poisson one (Chua et al. 2024 show the true shuffled epsilon is also above it)."""
    k, epochs, sigma = 100, 5, 1.0
    shuffled = acc().compose(ShuffledBatchesEvent.dp_sgd(sigma, k, k * epochs)).get_epsilon(1e-5)
    poisson = acc().compose(PoissonSampledEvent(1 / k, GaussianEvent(sigma)), k * epochs).get_epsilon(1e-5)
    assert shuffled > 3 * poisson


def test_per_step_composition_with_zero_counts_equals_the_run_event():
    """How the engine composes: a charged participation at each epoch start, nothing else."""
    k, t = 6, 17
    acc = PLDAccountant()
    for s in range(t):
        step = ShuffledBatchesEvent.dp_sgd(1.2, k, 1)
        acc.compose(step if s % k == 0 else SelfComposedEvent(step, 0))
    whole = PLDAccountant().compose(ShuffledBatchesEvent.dp_sgd(1.2, k, t))
    assert acc.get_epsilon(1e-5) == whole.get_epsilon(1e-5)


def test_balls_in_bins_is_the_one_participation_bound():
    b = BallsInBinsEvent(GaussianEvent(1.3), 8, 20)
    assert b.participations == 3
    for acc in ACCOUNTANTS:
        assert acc().compose(b).get_epsilon(1e-5) == pytest.approx(
            acc().compose(GaussianEvent(1.3), 3).get_epsilon(1e-5), rel=1e-12)
    assert PLDAccountant().compose(BallsInBinsEvent(LaplaceEvent(2.0), 4, 4)).get_epsilon(1e-5) == pytest.approx(0.5, abs=1e-3)


# --- truncated Poisson --------------------------------------------------------------------------
TRUNCATED = [(1000, 0.1, 110, 1.0), (1000, 0.1, 130, 1.0), (10_000, 0.01, 100, 1.5), (5000, 0.02, 120, 0.9)]


def test_truncation_probability_is_the_binomial_tail():
    e = TruncatedPoissonEvent(1000, 0.1, 110, 1.0)
    assert e.truncation_probability == pytest.approx(stats.binom.sf(109, 1000, 0.1), rel=1e-9)
    assert e.truncation_probability >= stats.binom.sf(109, 1000, 0.1)
    assert TruncatedPoissonEvent(10, 0.5, 11, 1.0).truncation_probability == 0.0


@pytest.mark.parametrize("args", TRUNCATED)
@pytest.mark.parametrize("acc", ACCOUNTANTS)
def test_truncated_between_its_two_branches(args, acc):
    n, q, b, sigma = args
    t = 50
    eps = acc().compose(TruncatedPoissonEvent(n, q, b, sigma), t).get_epsilon(1e-5)
    low = acc().compose(PoissonSampledEvent(q, GaussianEvent(sigma)), t).get_epsilon(1e-5)
    high = acc().compose(PoissonSampledEvent(q, GaussianEvent(sigma / 2)), t).get_epsilon(1e-5)
    assert low <= eps <= high


def test_never_truncated_is_poisson_exactly():
    e = TruncatedPoissonEvent(100, 0.05, 101, 1.0)  # at most 100 others: never truncated
    for acc in ACCOUNTANTS:
        assert acc().compose(e, 30).get_epsilon(1e-5) == acc().compose(
            PoissonSampledEvent(0.05, GaussianEvent(1.0)), 30).get_epsilon(1e-5)


@pytest.mark.parametrize("args", TRUNCATED[:3])
def test_truncated_against_dp_accounting(args):
    """dp_accounting 0.6's TruncatedSubsampledGaussianDpEvent (Ganesh 2025) and ours are both
    upper bounds built on the same split; its second branch is tighter (a smaller conditional
    rate), ours where it adds substitution. Measured here (T = 100, delta = 1e-5): 16.03 vs
    16.67, 7.767 vs 7.797, 1.643 vs 1.615 (ours vs dp_accounting)."""
    ref = dpa_pld.PLDAccountant()
    ref.compose(dpa.SelfComposedDpEvent(dpa.dp_event.TruncatedSubsampledGaussianDpEvent(*args), 100))
    ours = PLDAccountant().compose(TruncatedPoissonEvent(*args), 100).get_epsilon(1e-5)
    assert 0.95 * ref.get_epsilon(1e-5) <= ours <= 1.03 * ref.get_epsilon(1e-5)


def test_truncated_rdp_mixture_matches_a_direct_sum():
    from ppml_fast.accounting import rdp_math, sampling_math

    orders = [2.0, 3.0, 8.0, 32.0]
    p, q, s = 0.3, 0.05, 1.1
    got = sampling_math.rdp_truncated_poisson_gaussian(p, q, s, orders)
    r1, r2 = rdp_math.rdp_poisson_gaussian(q, s, orders), rdp_math.rdp_poisson_gaussian(q, s / 2, orders)
    for a, g, x, y in zip(orders, got, r1, r2):
        want = np.logaddexp(math.log1p(-p) + (a - 1) * x, math.log(p) + (a - 1) * y) / (a - 1)
        assert g == pytest.approx(want, rel=1e-12) and g >= want


@pytest.mark.parametrize("acc", ACCOUNTANTS)
def test_state_round_trip_with_sampling_events(acc):
    a = acc().compose(PoissonSampledEvent(0.01, GaussianEvent(1.0)), 10)
    a.compose(TruncatedPoissonEvent(1000, 0.1, 110, 1.0), 5).compose(BallsInBinsEvent(GaussianEvent(2.0), 5, 7))
    b = acc()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.get_epsilon(1e-5) == a.get_epsilon(1e-5) and b.events == a.events


# --- refusals and checks ------------------------------------------------------------------------
def test_rdp_refuses_substitution_mixed_with_poisson():
    acc = RDPAccountant().compose(PoissonSampledEvent(0.01, GaussianEvent(1.0)), 3)
    with pytest.raises(MixedAdjacencyError):
        acc.compose(ShuffledBatchesEvent.dp_sgd(1.0, 10, 5, adjacency="substitution"))
    # zero-out reads like add/remove: it composes with Poisson; substitution with without-replacement
    acc.compose(ShuffledBatchesEvent.dp_sgd(1.0, 10, 5))
    RDPAccountant().compose(SampledWithoutReplacementEvent(100, 10, GaussianEvent(0.5))).compose(
        ShuffledBatchesEvent.dp_sgd(1.0, 10, 5, adjacency="substitution"))
    with pytest.raises(MixedAdjacencyError):
        RDPAccountant().compose(SampledWithoutReplacementEvent(100, 10, GaussianEvent(0.5))).compose(
            TruncatedPoissonEvent(100, 0.1, 20, 1.0))


@pytest.mark.parametrize("acc", ACCOUNTANTS)
def test_unsupported_inner_events_are_refused_with_state_unchanged(acc):
    a = acc().compose(GaussianEvent(3.0))
    before = a.get_epsilon(1e-5)
    bad = ComposedEvent((ShuffledBatchesEvent.dp_sgd(1.0, 3, 3), SampledWithoutReplacementEvent(10, 2, GaussianEvent(1.0))))
    if acc is PLDAccountant:
        with pytest.raises(UnsupportedEventError):
            a.compose(bad)
        assert not a.supports(bad)
    assert a.get_epsilon(1e-5) == before or acc is RDPAccountant


@pytest.mark.parametrize("make,err", [
    (lambda: ShuffledBatchesEvent(PoissonSampledEvent(0.1, GaussianEvent(1.0)), 10), TypeError),
    (lambda: ShuffledBatchesEvent(GaussianEvent(1.0), 0), ValueError),
    (lambda: ShuffledBatchesEvent(GaussianEvent(1.0), 10, -1), ValueError),
    (lambda: ShuffledBatchesEvent(GaussianEvent(1.0), 10.0), TypeError),
    (lambda: ShuffledBatchesEvent(GaussianEvent(1.0), 10, 1, "add/remove"), ValueError),
    (lambda: ShuffledBatchesEvent.dp_sgd(0.0, 10), ValueError),
    (lambda: BallsInBinsEvent(GaussianEvent(1.0), True), TypeError),
    (lambda: TruncatedPoissonEvent(0, 0.1, 10, 1.0), ValueError),
    (lambda: TruncatedPoissonEvent(10, 1.5, 10, 1.0), ValueError),
    (lambda: TruncatedPoissonEvent(10, 0.1, 0, 1.0), ValueError),
    (lambda: TruncatedPoissonEvent(10, 0.1, 5, float("nan")), ValueError),
])
def test_bad_arguments_name_themselves(make, err):
    with pytest.raises(err):
        make()


@pytest.mark.parametrize("event", [
    ShuffledBatchesEvent.dp_sgd(1.1, 235, 1000, "substitution"),
    SelfComposedEvent(BallsInBinsEvent(LaplaceEvent(0.5), 10, 3), 4),
    ComposedEvent((TruncatedPoissonEvent(60_000, 0.004, 300, 1.0), ShuffledBatchesEvent(GaussianEvent(math.inf), 2))),
])
def test_json_round_trip(event):
    back = event_from_dict(json.loads(json.dumps(event_to_dict(event), allow_nan=False)))
    assert back == event


def test_json_refuses_a_bad_adjacency():
    d = event_to_dict(ShuffledBatchesEvent.dp_sgd(1.0, 10))
    d["adjacency"] = "add/remove"
    with pytest.raises(ValueError, match="adjacency"):
        event_from_dict(d)
    d["adjacency"] = 3
    with pytest.raises(ValueError):
        event_from_dict(d)
    assert np.isfinite(PLDAccountant().compose(event_from_dict(event_to_dict(
        ShuffledBatchesEvent.dp_sgd(1.0, 10)))).get_epsilon(1e-5))

"""Auditing the raw Gaussian noise op (through ``ppml_fast.mechanisms.gaussian_mechanism``):
a broken mechanism is flagged; the correct one stays below its exact epsilon across seeds and
noise levels; with many trials the bound reaches what a perfect attacker with that many trials
can certify (computed from the two normal distributions, not tuned)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ppml_fast.accounting import analytic_gaussian_sigma, gaussian_delta
from ppml_fast.audit import audit_gaussian_mechanism, audit_mechanism, gaussian_epsilon
from ppml_fast.audit.bounds import clopper_pearson_upper, epsilon_from_rates
from ppml_fast.mechanisms import NoiseSource

DELTA = 1e-5


def test_gaussian_epsilon_inverts_the_analytic_gaussian():
    for sigma in (0.5, 1.0, 3.0):
        eps = gaussian_epsilon(sigma, DELTA)
        assert gaussian_delta(sigma, eps) == pytest.approx(DELTA, rel=1e-8)
        assert analytic_gaussian_sigma(eps, DELTA) == pytest.approx(sigma, rel=1e-8)
    assert gaussian_epsilon(1000.0, 0.4) == 0.0  # delta(0) <= delta already


@pytest.mark.parametrize("broken, name", [(lambda x: x, "noise removed"),
                                          (None, "noise 10x too small")])
def test_broken_mechanism_is_flagged(broken, name):
    claimed = gaussian_epsilon(1.0, DELTA)  # what sigma = 1 would give
    if broken is None:
        rng = NoiseSource(0)
        broken = lambda x: x + 0.1 * rng.normal(tuple(x.shape))  # noqa: E731
    got = audit_mechanism(broken, epsilon_claimed=claimed, delta=DELTA, trials=100_000)
    assert got.flagged, name
    assert got.epsilon_lower_bound > claimed + 2  # 4.4 claimed; a perfect split of 5e4 + 5e4 certifies ~9.5


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_correct_gaussian_stays_below_its_epsilon(sigma):
    claimed = gaussian_epsilon(sigma, DELTA)
    for seed in range(4):
        got = audit_gaussian_mechanism(sigma, trials=100_000, seed=seed, delta=DELTA)
        assert got.epsilon_claimed == claimed
        assert 0 < got.epsilon_lower_bound < claimed, (sigma, seed)
        assert not got.flagged


def _design_bound(sigma: float, n: int) -> tuple[float, float]:
    """The bound at the exact error rates of 'score > t' on N(0, s^2) vs N(1, s^2) with n
    trials per class (each count at its mean), maximised over t; and the expected count k of
    the rarer error there (log k fluctuates by ~1/sqrt(k))."""
    t = np.linspace(-8 * sigma, 8 * sigma + 1, 20001)
    fpr, fnr = stats.norm.sf(t / sigma), stats.norm.cdf((t - 1) / sigma)
    eps = epsilon_from_rates(clopper_pearson_upper(n * fpr, n, 0.025), clopper_pearson_upper(n * fnr, n, 0.025), DELTA)
    i = int(np.argmax(eps))
    return float(eps[i]), float(min(n * fpr[i], n * fnr[i]))


def test_raw_noise_op_bound_is_consistent_with_analytic_epsilon():
    """The raw op, 10^6 trials per input (half pick the threshold, half give the bound)."""
    analytic = gaussian_epsilon(1.0, DELTA)  # 4.38
    got = audit_gaussian_mechanism(1.0, trials=1_000_000, seed=0, delta=DELTA)
    design, k = _design_bound(1.0, 500_000)  # 3.19, k ~ 24
    assert got.epsilon_lower_bound <= analytic
    assert got.epsilon_lower_bound >= design - 4 / math.sqrt(k)
    assert got.details["threshold_strategy"] == "split"
    assert sum(got.counts.values()) == 1_000_000


def test_raw_noise_op_directly():
    """The op itself (``ops.add_gaussian_noise_``) as the mechanism, seeded Philox."""
    from ppml_fast.ops import add_gaussian_noise_

    state = {"offset": 0}

    def mech(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        state["offset"] = add_gaussian_noise_(y, 2.0, seed=7, offset=state["offset"])
        return y

    analytic = gaussian_epsilon(2.0, DELTA)
    got = audit_mechanism(mech, epsilon_claimed=analytic, delta=DELTA, trials=200_000, seed=1)
    design, k = _design_bound(2.0, 100_000)
    assert design - 4 / math.sqrt(k) <= got.epsilon_lower_bound <= analytic


def test_fixed_threshold_and_secure_mode():
    got = audit_gaussian_mechanism(1.0, trials=50_000, threshold=2.0)
    assert got.details["threshold_strategy"] == "fixed" and got.details["threshold"] == 2.0
    secure = audit_gaussian_mechanism(1.0, trials=50_000, secure=True)
    assert secure.details["secure"] is True
    assert secure.epsilon_lower_bound < secure.epsilon_claimed


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(mechanism=3), TypeError, "mechanism must be callable"),
    (dict(mechanism=lambda x: x[:-1]), ValueError, "mechanism must return a tensor of shape"),
    (dict(mechanism=lambda x: x.numpy()), ValueError, "mechanism must return a tensor"),
    (dict(mechanism=lambda x: x, trials=1), ValueError, "trials"),
    (dict(mechanism=lambda x: x, epsilon_claimed=-1.0), ValueError, "epsilon_claimed"),
    (dict(mechanism=lambda x: x, sensitivity=0.0), ValueError, "sensitivity"),
    (dict(mechanism=lambda x: x, delta=1.5), ValueError, "delta"),
])
def test_audit_mechanism_bad_input(kwargs, err, match):
    args = dict(epsilon_claimed=1.0, delta=DELTA, trials=100)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        audit_mechanism(args.pop("mechanism"), **args)


def test_audit_gaussian_bad_input():
    with pytest.raises(ValueError, match="noise_multiplier"):
        audit_gaussian_mechanism(0.0)
    with pytest.raises(ValueError, match="delta"):
        audit_gaussian_mechanism(1.0, delta=0.0)
    with pytest.raises(ValueError, match="seed"):
        audit_gaussian_mechanism(1.0, seed=-3)


def test_result_dict_is_json_ready():
    import json

    got = audit_mechanism(lambda x: x, epsilon_claimed=math.inf, delta=DELTA, trials=1000)
    d = json.loads(json.dumps(got.to_dict()))
    assert d["epsilon_claimed"] == "inf" and d["flagged"] is False and d["method"] == "clopper_pearson"
    assert set(d["counts"]) == {"tp", "fp", "tn", "fn"}
    assert "epsilon lower bound" in got.summary()

"""The one-run bound of Steinke, Nasr & Jagielski 2023 (Theorem 3 / Appendix D) against values
computed by hand, its validity on scores that carry no information, and its tightness on
randomized response (whose epsilon is known exactly)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ppml_fast.audit import one_run_audit, one_run_epsilon_lower_bound, one_run_p_value
from ppml_fast.audit.one_run import guess_candidates


def test_p_value_pure_dp_is_the_binomial_tail():
    q = math.exp(1) / (1 + math.exp(1))
    assert one_run_p_value(canaries=20, guesses=10, correct=10, epsilon=1.0) == pytest.approx(q ** 10, rel=1e-10)
    # P[Bin(4, 1/2) >= 3] = 5/16
    assert one_run_p_value(canaries=4, guesses=4, correct=3, epsilon=0.0) == pytest.approx(5 / 16, rel=1e-12)
    assert one_run_p_value(canaries=4, guesses=4, correct=0, epsilon=0.0) == 1.0


def test_p_value_with_delta_by_hand():
    # m = 10, r = v = 3, eps = 0 (p = 1/2): f(3) = 1/8; (f(3 - i) - f(3)) / i = 3/8, 6/8 / 2, 7/8 / 3
    # -> max 3/8; p-value = 1/8 + 2 * 10 * 0.01 * 3/8 = 0.2
    assert one_run_p_value(canaries=10, guesses=3, correct=3, epsilon=0.0, delta=0.01) == pytest.approx(0.2, rel=1e-12)
    # eps = log 3 (p = 3/4): f(3) = 27/64; the terms are 27/64, 36/64 / 2, 37/64 / 3 -> max 27/64
    want = 27 / 64 + 2 * 10 * 0.01 * 27 / 64
    got = one_run_p_value(canaries=10, guesses=3, correct=3, epsilon=math.log(3), delta=0.01)
    assert got == pytest.approx(want, rel=1e-10)
    assert one_run_p_value(canaries=1000, guesses=3, correct=3, epsilon=0.0, delta=0.01) == 1.0  # capped


def test_lower_bound_closed_form():
    # all r guesses right, delta 0: q^r <= alpha  ->  q = alpha^(1/r), eps = log(q / (1 - q))
    for r in (10, 100, 400):
        q = 0.05 ** (1 / r)
        got = one_run_epsilon_lower_bound(canaries=1000, guesses=r, correct=r, confidence=0.95)
        assert got == pytest.approx(math.log(q / (1 - q)), abs=2e-5)
    # Bonferroni over 16 tests = the single test at significance 0.05 / 16
    q = (0.05 / 16) ** (1 / 100)
    got = one_run_epsilon_lower_bound(canaries=1000, guesses=100, correct=100, tests=16)
    assert got == pytest.approx(math.log(q / (1 - q)), abs=2e-5)


def test_lower_bound_is_refuting_and_delta_only_lowers_it():
    eps = one_run_epsilon_lower_bound(canaries=1000, guesses=200, correct=180, delta=1e-5)
    assert 0 < eps
    assert one_run_p_value(canaries=1000, guesses=200, correct=180, epsilon=eps, delta=1e-5) <= 0.05
    assert one_run_p_value(canaries=1000, guesses=200, correct=180, epsilon=eps + 1e-3, delta=1e-5) > 0.05
    assert eps <= one_run_epsilon_lower_bound(canaries=1000, guesses=200, correct=180)
    assert eps > one_run_epsilon_lower_bound(canaries=1000, guesses=200, correct=180, delta=1e-3)
    assert one_run_epsilon_lower_bound(canaries=1000, guesses=200, correct=100) == 0.0  # chance


def test_audit_picks_guesses_and_applies_bonferroni():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + 0.1 * rng.random(1000)  # perfectly separated
    got = one_run_audit(scores, included)
    pairs = guess_candidates(1000)
    assert got.tests == len(pairs) == 16
    assert got.correct == got.guesses  # every guess right
    want = max(one_run_epsilon_lower_bound(canaries=1000, guesses=kp + km, correct=kp + km, tests=16)
               for kp, km in pairs if kp <= included.sum() and km <= (~included).sum())
    assert got.epsilon_lower_bound == pytest.approx(want)
    fixed = one_run_audit(scores, included, guesses=(100, 0))
    assert (fixed.tests, fixed.guesses, fixed.correct) == (1, 100, 100)
    assert fixed.epsilon_lower_bound == pytest.approx(
        one_run_epsilon_lower_bound(canaries=1000, guesses=100, correct=100))


def test_no_information_gives_no_bound():
    """Scores independent of membership: a 0-DP mechanism. The bound may exceed 0 with
    probability <= 5% per seed; over 40 seeds, 7 or more would have probability < 0.3%."""
    positives = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        positives += one_run_audit(rng.normal(size=500), rng.random(500) < 0.5).epsilon_lower_bound > 0
    assert positives <= 6


@pytest.mark.parametrize("seed", range(3))
def test_randomized_response_is_audited_tightly(seed):
    """Each canary's guess is its membership flipped with probability 1 / (1 + e): exactly
    1-DP randomized response. All 10,000 guessed: v ~ Bin(10^4, 0.731), sd of v/m 0.0044,
    i.e. ~0.022 in epsilon; the bound sits ~1.645 sd below 1 on average, so it lands in
    [0.85, 1] except with negligible probability — and above 1 with probability <= 5%."""
    rng = np.random.default_rng(seed)
    m = 10_000
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(1) / (1 + math.exp(1))
    scores = np.where(truthful == included, 1.0, 0.0)
    got = one_run_audit(scores, included, guesses=(int((scores == 1).sum()), int((scores == 0).sum())))
    assert 0.85 <= got.epsilon_lower_bound <= 1.0


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(scores=[1.0, 2.0], included=[True]), ValueError, "included"),
    (dict(scores=[1.0, 2.0], included=[1, 0]), ValueError, "included must be bools"),
    (dict(scores=[], included=np.zeros(0, bool)), ValueError, "at least one canary"),
    (dict(scores=[1.0, float("nan")], included=[True, False]), ValueError, "finite"),
    (dict(scores=[1.0, 2.0], included=[True, False], guesses=(2, 1)), ValueError, "k_plus \\+ k_minus"),
    (dict(scores=[1.0, 2.0], included=[True, False], guesses=(0, 0)), ValueError, "k_plus \\+ k_minus"),
    (dict(scores=[1.0, 2.0], included=[True, False], guesses=[(1, 0, 1)]), ValueError, "pair"),
    (dict(scores=[1.0, 2.0], included=[True, False], guesses=[]), ValueError, "at least one"),
    (dict(scores=[1.0, 2.0], included=[True, False], confidence=0.0), ValueError, "confidence"),
])
def test_audit_bad_input(kwargs, err, match):
    kwargs["included"] = np.asarray(kwargs["included"])
    with pytest.raises(err, match=match):
        one_run_audit(**kwargs)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(canaries=0, guesses=0, correct=0), ValueError, "canaries"),
    (dict(canaries=10, guesses=11, correct=0), ValueError, "guesses must be <= canaries"),
    (dict(canaries=10, guesses=5, correct=6), ValueError, "correct must be <= guesses"),
    (dict(canaries=10, guesses=5, correct=2.0), TypeError, "correct"),
    (dict(canaries=10, guesses=5, correct=2, delta=-0.1), ValueError, "delta"),
    (dict(canaries=10, guesses=5, correct=2, tests=0), ValueError, "tests"),
])
def test_lower_bound_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        one_run_epsilon_lower_bound(**kwargs)


def test_p_value_bad_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        one_run_p_value(canaries=10, guesses=5, correct=2, epsilon=-1.0)

"""The many-trial threshold test: counts by hand at a fixed threshold, the Bonferroni factor of
a grid, the split's validity on uninformative scores."""

from __future__ import annotations

import numpy as np
import pytest

from ppml_fast.audit import distinguishing_test, epsilon_lower_bound


def test_fixed_threshold_counts_by_hand():
    ins = [0.5, 1.5, 2.5, 3.5]  # guessed "in" where > 2: 2.5, 3.5 -> tp 2, fn 2
    outs = [0.0, 1.0, 2.0, 3.0, 4.0]  # > 2: 3.0, 4.0 -> fp 2, tn 3 (2.0 is not > 2)
    got = distinguishing_test(ins, outs, threshold=2.0)
    assert (got.tp, got.fn, got.fp, got.tn, got.tests, got.strategy) == (2, 2, 2, 3, 1, "fixed")
    assert got.epsilon_lower_bound == epsilon_lower_bound(tp=2, fp=2, tn=3, fn=2)


def test_grid_takes_the_best_with_bonferroni():
    rng = np.random.default_rng(0)
    ins, outs = rng.normal(3.0, 1.0, 2000), rng.normal(0.0, 1.0, 2000)
    grid = [0.0, 1.5, 3.0]
    got = distinguishing_test(ins, outs, threshold=grid, delta=1e-5)
    assert got.tests == 3 and got.strategy == "grid" and got.threshold in grid
    each = []
    for t in grid:
        tp, fp = int((ins > t).sum()), int((outs > t).sum())
        each.append(epsilon_lower_bound(tp=tp, fp=fp, tn=2000 - fp, fn=2000 - tp, delta=1e-5, tests=3))
    assert got.epsilon_lower_bound == pytest.approx(max(each))
    assert got.epsilon_lower_bound < distinguishing_test(ins, outs, threshold=got.threshold, delta=1e-5).epsilon_lower_bound


def test_split_evaluates_on_the_held_out_part():
    rng = np.random.default_rng(1)
    ins, outs = rng.normal(3.0, 1.0, 1000), rng.normal(0.0, 1.0, 1000)
    got = distinguishing_test(ins, outs, seed=3)
    assert got.strategy == "split" and got.tp + got.fn == 500 and got.fp + got.tn == 500
    assert got.epsilon_lower_bound > 1.0  # separated by 3 standard deviations
    again = distinguishing_test(ins, outs, seed=3)
    assert again == got  # seeded


def test_split_is_valid_on_uninformative_scores():
    """Same distribution in and out: epsilon 0. Each seed's bound exceeds 0 with probability
    <= 5%; 7 or more of 40 would have probability < 0.3%."""
    positives = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        got = distinguishing_test(rng.normal(size=400), rng.normal(size=400), seed=seed)
        positives += got.epsilon_lower_bound > 0
    assert positives <= 6


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(in_scores=[[1.0]], out_scores=[1.0]), ValueError, "in_scores must be 1-d"),
    (dict(in_scores=[1.0, float("inf")], out_scores=[1.0]), ValueError, "in_scores must be finite"),
    (dict(in_scores=["a"], out_scores=[1.0]), TypeError, "in_scores"),
    (dict(in_scores=[1.0], out_scores=[1.0, 2.0]), ValueError, "in_scores must have enough trials"),
    (dict(in_scores=[1.0, 2.0], out_scores=[1.0, 2.0], threshold="best"), ValueError, "threshold"),
    (dict(in_scores=[1.0, 2.0], out_scores=[1.0, 2.0], threshold=[]), ValueError, "threshold"),
    (dict(in_scores=[], out_scores=[1.0, 2.0], threshold=0.0), ValueError, "non-empty"),
    (dict(in_scores=[1.0, 2.0], out_scores=[1.0, 2.0], select_fraction=1.0), ValueError, "select_fraction"),
    (dict(in_scores=[1.0, 2.0], out_scores=[1.0, 2.0], seed=-1), ValueError, "seed"),
    (dict(in_scores=[1.0, 2.0], out_scores=[1.0, 2.0], delta=2.0), ValueError, "delta"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        distinguishing_test(**kwargs)

"""The many-trial distinguishing test: attack scores of trials with the canary ("in") and
without it ("out") -> a threshold test -> its Clopper–Pearson epsilon lower bound
(:mod:`ppml_fast.audit.bounds`).

A higher score means "in": the test guesses "in" where ``score > threshold``. Picking the
threshold that looks best on the same scores and then bounding with those scores would
overstate the bound (a maximum over many tests), so the threshold is chosen one of three valid
ways:

- a number fixed in advance: one test, exact;
- a sequence of numbers fixed in advance: the best of them, with a Bonferroni correction over
  their count;
- ``"split"`` (default): a seeded random part of the trials (``select_fraction`` of each class)
  picks the threshold, the other part alone gives the bound (the sample-splitting of Jagielski
  et al. 2020, who fit the attack on separate runs).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence, Union

import numpy as np

from ppml_fast.audit import _checks
from ppml_fast.audit.bounds import clopper_pearson_upper, epsilon_from_rates, epsilon_lower_bound

Threshold = Union[str, float, Sequence[float]]
MAX_CANDIDATES = 2000  # thresholds tried on the selection part (quantiles beyond this)


@dataclasses.dataclass(frozen=True)
class DistinguishingTest:
    """One threshold test and its bound. Counts are those of the trials that gave the bound
    (with ``"split"``, only the evaluation part)."""

    epsilon_lower_bound: float
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    confidence: float
    delta: float
    tests: int  # the Bonferroni factor applied (1 unless a grid of thresholds was given)
    strategy: str  # "fixed", "grid" or "split"


def _counts(in_sorted: np.ndarray, out_sorted: np.ndarray, t: np.ndarray):
    """(tp, fn, fp, tn) of the tests ``score > t`` (vectorised over t) on sorted scores."""
    fn = np.searchsorted(in_sorted, t, side="right")
    tn = np.searchsorted(out_sorted, t, side="right")
    return in_sorted.size - fn, fn, out_sorted.size - tn, tn


def _bounds_at(in_sorted, out_sorted, t: np.ndarray, delta: float, sig: float) -> np.ndarray:
    tp, fn, fp, tn = _counts(in_sorted, out_sorted, t)
    fpr = clopper_pearson_upper(fp, fp + tn, sig)
    fnr = clopper_pearson_upper(fn, tp + fn, sig)
    return epsilon_from_rates(fpr, fnr, delta)


def _candidates(in_sorted: np.ndarray, out_sorted: np.ndarray) -> np.ndarray:
    """Thresholds where the counts change (each pooled score), or quantiles of them."""
    pooled = np.unique(np.concatenate([in_sorted, out_sorted]))
    if pooled.size > MAX_CANDIDATES:
        pooled = np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, MAX_CANDIDATES)))
    return np.concatenate([[-np.inf], pooled])


def _test(in_sorted, out_sorted, t: float, delta, confidence, tests, strategy) -> DistinguishingTest:
    tp, fn, fp, tn = (int(c[0]) for c in _counts(in_sorted, out_sorted, np.asarray([t])))
    eps = epsilon_lower_bound(tp=tp, fp=fp, tn=tn, fn=fn, delta=delta, confidence=confidence, tests=tests)
    return DistinguishingTest(eps, float(t), tp, fp, tn, fn, confidence, delta, tests, strategy)


def distinguishing_test(
    in_scores,
    out_scores,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    threshold: Threshold = "split",
    select_fraction: float = 0.5,
    seed: int = 0,
) -> DistinguishingTest:
    """The epsilon lower bound of the threshold test ``score > threshold`` on these scores.

    Args:
        in_scores: one attack score per trial run with the canary (higher: more "in").
        out_scores: one per trial run without it.
        delta: the delta of the claim tested, in [0, 1).
        confidence: probability that the bound holds.
        threshold: a number, a sequence of numbers (fixed in advance), or ``"split"``.
        select_fraction: with ``"split"``, the part of each class used to pick the threshold.
        seed: with ``"split"``, seeds the random split.
    """
    ins = np.sort(_checks.scores("in_scores", in_scores))
    outs = np.sort(_checks.scores("out_scores", out_scores))
    delta = _checks.delta("delta", delta)
    confidence = _checks.open_unit("confidence", confidence)
    if isinstance(threshold, str):
        if threshold != "split":
            raise ValueError(f"threshold must be a number, a sequence of numbers or 'split'; got {threshold!r}")
        return _split_test(ins, outs, delta, confidence, select_fraction, seed)
    if isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
        if ins.size == 0 or outs.size == 0:
            raise ValueError(f"in_scores and out_scores must be non-empty; got {ins.size} and {outs.size}")
        return _test(ins, outs, float(threshold), delta, confidence, 1, "fixed")
    grid = _checks.scores("threshold", threshold)
    if grid.size == 0:
        raise ValueError("threshold must hold at least one number; got an empty sequence")
    if ins.size == 0 or outs.size == 0:
        raise ValueError(f"in_scores and out_scores must be non-empty; got {ins.size} and {outs.size}")
    sig = (1.0 - confidence) / (2 * grid.size)
    best = grid[int(np.argmax(_bounds_at(ins, outs, grid, delta, sig)))]
    return _test(ins, outs, float(best), delta, confidence, int(grid.size), "grid")


def _split_test(ins, outs, delta, confidence, select_fraction, seed) -> DistinguishingTest:
    select_fraction = _checks.open_unit("select_fraction", select_fraction)
    seed = _checks.seed("seed", seed)
    for name, arr in (("in_scores", ins), ("out_scores", outs)):
        k = int(round(arr.size * select_fraction))
        if k < 1 or arr.size - k < 1:
            raise ValueError(f"{name} must have enough trials for both parts of the split "
                             f"(select_fraction {select_fraction:g}); got {arr.size}")
    rng = np.random.default_rng(seed)

    def halves(arr):
        perm = rng.permutation(arr.size)
        k = int(round(arr.size * select_fraction))
        return np.sort(arr[perm[:k]]), np.sort(arr[perm[k:]])

    in_sel, in_eval = halves(ins)
    out_sel, out_eval = halves(outs)
    cand = _candidates(in_sel, out_sel)
    sig = (1.0 - confidence) / 2
    best = cand[int(np.argmax(_bounds_at(in_sel, out_sel, cand, delta, sig)))]
    return _test(in_eval, out_eval, float(best), delta, confidence, 1, "split")

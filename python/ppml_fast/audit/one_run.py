"""Auditing in one training run: Steinke, Nasr & Jagielski, "Privacy auditing with one (1)
training run", NeurIPS 2023, arXiv 2305.08846.

Each of ``m`` canaries is included in the input independently with probability 1/2; after one
run the auditor guesses "in" or "out" for ``r`` of them (abstaining on the rest) and ``v``
guesses are right. Their main theorem for approximate DP (Section 3; Appendix D gives the
computation as code, which this module follows and was checked against; cited by section, as
we could not confirm the theorem's number in both the arXiv and NeurIPS versions): if the mechanism is (epsilon, delta)-DP with
respect to each canary, then for every v

    P[correct >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, p) >= u],   p = e^epsilon / (1 + e^epsilon)

(with delta = 0 this is their pure-DP theorem: the guesses are no better than r coin flips of
bias p). The right side is a p-value for the claim "(epsilon, delta)-DP"; the lower bound is the
largest epsilon whose p-value is <= 1 - confidence (bisection that only ever returns an epsilon
whose p-value was checked, so it is valid even where the p-value is not monotone).

Which guesses to make: the top ``k_plus`` scores are guessed "in", the bottom ``k_minus``
"out". Choosing (k_plus, k_minus) after seeing the scores is a choice among several tests, so
:func:`one_run_audit` divides the significance by the number of candidate pairs (Bonferroni);
pass ``guesses=(k_plus, k_minus)`` to fix the pair in advance and skip the correction.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence

import numpy as np
from scipy import special, stats

from ppml_fast.audit import _checks

GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def _check_counts(canaries, guesses, correct) -> tuple[int, int, int]:
    m = _checks.count("canaries", canaries, minimum=1)
    r = _checks.count("guesses", guesses)
    v = _checks.count("correct", correct)
    if r > m:
        raise ValueError(f"guesses must be <= canaries ({m}); got {r}")
    if v > r:
        raise ValueError(f"correct must be <= guesses ({r}); got {v}")
    return m, r, v


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """P[at least ``correct`` right guesses] bounded under the claim "(epsilon, delta)-DP"
    (Steinke et al. 2023, Section 3's approximate-DP theorem; the expression of their Appendix D)."""
    m, r, v = _check_counts(canaries, guesses, correct)
    epsilon = _checks.non_negative("epsilon", epsilon)
    delta = _checks.delta("delta", delta)
    return _p_value(m, r, v, epsilon, delta)


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    p = float(special.expit(epsilon))  # e^eps / (1 + e^eps): the accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, p))  # f(v) = P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    ks = np.arange(v - 1, -1, -1)  # v-1, v-2, ..., 0
    between = np.cumsum(stats.binom.pmf(ks, r, p))  # f(v - i) - f(v) = P[v - i <= B < v], i = 1..v
    alpha = float(np.max(between / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(
    *,
    canaries: int,
    guesses: int,
    correct: int,
    delta: float = 0.0,
    confidence: float = 0.95,
    tests: int = 1,
) -> float:
    """The largest epsilon (to ~1e-6) that ``correct`` right guesses out of ``guesses`` on
    ``canaries`` canaries refute at ``confidence``: the mechanism is not (epsilon, delta)-DP
    with probability >= confidence. ``tests``: a Bonferroni factor on the significance."""
    m, r, v = _check_counts(canaries, guesses, correct)
    delta = _checks.delta("delta", delta)
    significance = (1.0 - _checks.open_unit("confidence", confidence)) / _checks.count("tests", tests, minimum=1)
    if r == 0 or _p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while _p_value(m, r, v, hi, delta) <= significance:  # p -> 1 as epsilon grows (r >= 1)
        lo, hi = hi, hi * 2
        if hi > 1e3:
            break
    while hi - lo > 1e-6 * max(1.0, lo):
        mid = (lo + hi) / 2
        if _p_value(m, r, v, mid, delta) <= significance:
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass(frozen=True)
class OneRunTest:
    """The guesses that gave the bound: ``k_plus`` "in" and ``k_minus`` "out" guesses,
    ``correct`` of them right, chosen among ``tests`` candidate pairs."""

    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    confidence: float
    delta: float
    tests: int


def guess_candidates(m: int) -> list[tuple[int, int]]:
    """The default (k_plus, k_minus) pairs: k = fraction * m for GUESS_FRACTIONS, as
    (k, 0) ("in" guesses only) and (k, k) (both tails)."""
    ks = sorted({max(1, int(round(m * f))) for f in GUESS_FRACTIONS})
    pairs = [(k, 0) for k in ks if k <= m] + [(k, k) for k in ks if 2 * k <= m]
    return pairs


def _correct(order: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> int:
    """Right guesses when the top k_plus of ``order`` (ascending scores) are "in" and the
    bottom k_minus "out"."""
    top = order[order.size - k_plus:] if k_plus else order[:0]
    bottom = order[:k_minus]
    return int(included[top].sum()) + int((~included[bottom]).sum())


def one_run_audit(
    scores,
    included,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    guesses: Optional[tuple[int, int] | Sequence[tuple[int, int]]] = None,
) -> OneRunTest:
    """The one-run epsilon lower bound from each canary's score and whether it was included.

    Args:
        scores: one attack score per canary (higher: more likely "in").
        included: bools, whether each canary was in the input (each with probability 1/2,
            independently, drawn before the run: the theorem's assumption).
        delta: the delta of the claim tested.
        confidence: probability that the bound holds.
        guesses: (k_plus, k_minus) fixed in advance, or a list of such pairs to choose from
            (Bonferroni over the list); default :func:`guess_candidates`.
    """
    s = _checks.scores("scores", scores)
    inc = np.asarray(included)
    if inc.shape != s.shape or inc.dtype != np.bool_:
        raise ValueError(f"included must be bools of the same shape as scores {s.shape}; "
                         f"got {inc.dtype} of shape {inc.shape}")
    m = s.size
    if m == 0:
        raise ValueError("scores must hold at least one canary; got none")
    delta = _checks.delta("delta", delta)
    confidence = _checks.open_unit("confidence", confidence)
    if guesses is None:
        pairs = guess_candidates(m)
    elif len(guesses) == 2 and all(isinstance(g, numbers.Integral) for g in guesses):
        pairs = [tuple(guesses)]
    else:
        try:
            pairs = [tuple(g) for g in guesses]
        except TypeError as e:
            raise TypeError(f"guesses must be a (k_plus, k_minus) pair or a list of pairs; got {guesses!r}") from e
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"guesses must be a (k_plus, k_minus) pair or a list of pairs; got {guesses!r}")
    if not pairs:
        raise ValueError("guesses must hold at least one (k_plus, k_minus) pair; got none")
    for kp, km in pairs:
        _checks.count("k_plus", kp)
        _checks.count("k_minus", km)
        if kp + km > m or kp + km == 0:
            raise ValueError(f"guesses (k_plus, k_minus) must satisfy 1 <= k_plus + k_minus <= "
                             f"{m} (the canaries); got {(kp, km)}")
    order = np.argsort(s, kind="stable")
    best: Optional[OneRunTest] = None
    for kp, km in pairs:
        v = _correct(order, inc, kp, km)
        eps = one_run_epsilon_lower_bound(canaries=m, guesses=kp + km, correct=v, delta=delta,
                                          confidence=confidence, tests=len(pairs))
        if best is None or eps > best.epsilon_lower_bound:
            best = OneRunTest(eps, m, kp + km, v, kp, km, confidence, delta, len(pairs))
    return best


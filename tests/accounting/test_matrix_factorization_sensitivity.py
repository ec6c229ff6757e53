"""Prefix sensitivities S_t of matrix-factorization strategies: a brute force over every
participation pattern on small T (float64 dense C^T C of the released rows), monotonicity,
jax_privacy's numbers, and the refusals of schemas the theory does not cover."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ppml_fast.accounting import matrix_factorization as mf
from ppml_fast.accounting.matrix_factorization import Participation


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PPML_FAST_CACHE", str(tmp_path))  # optimise_banded's disk cache

T = 11
STRATEGIES = {
    "identity": lambda: mf.identity(T),
    "tree": lambda: mf.tree(T),
    "banded_pos": lambda: mf.banded([1.0, 0.5, 0.3], T),
    # C^T C with negative entries: the |C^T C| sum is then only an upper bound
    "banded_neg": lambda: mf.banded([1.0, 0.8, -0.6, 0.3], T, column_normalize=True),
    "banded_rising": lambda: mf.banded([0.3, 1.0, 0.8], T),  # not non-increasing
    "optimized": lambda: mf.optimize_banded(T, 3, use_cache=False),
}
SCHEMAS = {
    "single": Participation("single"),
    "epoch1": Participation("every_epoch", steps_per_epoch=1),
    "epoch2": Participation("every_epoch", steps_per_epoch=2),
    "epoch3": Participation("every_epoch", steps_per_epoch=3),
    "epoch4": Participation("every_epoch", steps_per_epoch=4),
    "epoch20": Participation("every_epoch", steps_per_epoch=20),
    "shuffled2": Participation("shuffled", steps_per_epoch=2),
    "shuffled3": Participation("shuffled", steps_per_epoch=3),
    "shuffled5": Participation("shuffled", steps_per_epoch=5),
    "minsep4": Participation("min_separated", min_separation=4),
    "minsep5_k2": Participation("min_separated", min_separation=5, max_participations=2),
    "minsep1_k3": Participation("min_separated", min_separation=1, max_participations=3),
    "cyclic4": Participation("cyclic_poisson", min_separation=4, sample_rate=0.5),
}


def _patterns(p: Participation, n: int) -> list[list[int]]:
    if p.kind == "single":
        return [[j] for j in range(n)]
    if p.kind in ("every_epoch", "cyclic_poisson"):
        per = p.steps_per_epoch if p.kind == "every_epoch" else p.min_separation
        return [list(range(i, n, per)) for i in range(min(per, n))]
    if p.kind == "shuffled":  # at most one step per epoch; the full choices suffice (below)
        per = p.steps_per_epoch
        return [list(c) for c in itertools.product(*[range(e, min(e + per, n)) for e in range(0, n, per)])]
    k = p.participations(n)
    out = []
    for r in range(1, k + 1):
        for combo in itertools.combinations(range(n), r):
            if all(b - a >= p.min_separation for a, b in zip(combo, combo[1:])):
                out.append(list(combo))
    return out


def _released(s, t):
    C = s.matrix()
    rows = s.release_step() <= t if s.kind == "tree" else np.arange(s.steps) <= t
    return C[rows]


def _brute(s, p):
    """(max over patterns of sum |X_t[pi, pi]|, max over patterns and signs g in {-1, 1}^pi of
    g^T X_t g (a lower bound on the true squared sensitivity)) for every t. For "shuffled" only
    the patterns with a step in every epoch: both maxima are reached there when X_t >= 0 (every
    term >= 0), and the bound's maximum always is (every |X| term >= 0)."""
    bound, lower = [], []
    pats = _patterns(p, s.steps)
    for t in range(s.steps):
        Ct = _released(s, t)
        X = Ct.T @ Ct
        bound.append(max(np.abs(X[np.ix_(q, q)]).sum() for q in pats))
        best = 0.0
        for q in pats:
            sub = X[np.ix_(q, q)]
            for signs in itertools.product((1.0, -1.0), repeat=len(q) - 1):
                g = np.array((1.0,) + signs)
                best = max(best, g @ sub @ g)
        lower.append(best)
    return np.array(bound), np.array(lower)


def _covered(name: str, p: Participation) -> bool:
    if name == "tree":
        return p.kind != "cyclic_poisson"
    bands = 1 if name == "identity" else STRATEGIES[name]().bands
    if p.kind == "cyclic_poisson":
        return bands <= p.min_separation
    if p.kind == "min_separated":
        return bands <= p.min_separation
    if p.kind == "shuffled":
        return bands - 1 <= p.steps_per_epoch
    return True


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_prefix_sensitivity_against_brute_force(name, schema):
    s, p = STRATEGIES[name](), SCHEMAS[schema]
    if not _covered(name, p):
        with pytest.raises(ValueError, match="bands <= min_separation|not banded|steps_per_epoch >= bands - 1"):
            s.sensitivity_sq_prefix(0, p)
        return
    S = np.array([s.sensitivity_sq_prefix(t, p) for t in range(T)])
    bound, lower = _brute(s, p)
    assert s.sensitivity_sq_prefix(-1, p) == 0.0
    assert np.all(np.diff(S) >= 0) and S[0] > 0  # non-decreasing
    assert np.all(S >= lower - 1e-12)  # never below the true sensitivity
    running = np.maximum.accumulate(bound)
    if name == "tree" and p.kind in ("min_separated", "shuffled"):
        assert np.all(S >= running - 1e-12)  # a packing bound (X >= 0: brute = exact)
        if p.participations(T) == 1:
            np.testing.assert_allclose(S, running)
    else:  # exactly the contract's bound: the running max of sum |X_t[pi, pi]|
        np.testing.assert_allclose(S, running, rtol=1e-12, atol=1e-12)
    if name in ("identity", "tree", "banded_pos", "optimized") or p.kind in ("single", "min_separated"):
        np.testing.assert_allclose(lower, bound, rtol=1e-12)  # where the theory says exact, it is


def test_negative_gram_bound_is_strictly_conservative():
    """banded_neg under every-epoch with period 1 < bands (C^T C's off-diagonals +, -, + at
    distances 1, 2, 3: no signs make them all count positively): sum |X| > the best signed
    pattern, so the brute-force test above can tell an exact value from the bound."""
    s, p = STRATEGIES["banded_neg"](), SCHEMAS["epoch1"]
    bound, lower = _brute(s, p)
    assert bound[-1] > lower[-1] + 0.1
    assert s.sensitivity_sq_prefix(T - 1, p) == pytest.approx(bound.max())


@pytest.mark.parametrize("T_", [40, 257])
def test_tree_sensitivities_closed_forms(T_):
    s = mf.tree(T_)
    single = Participation("single")
    for t in range(T_):  # one node per level: floor(log2(t + 1)) + 1
        assert s.sensitivity_sq_prefix(t, single) == (t + 1).bit_length()
    # every step (period 1): sum over released nodes of size^2
    p1 = Participation("every_epoch", steps_per_epoch=1)
    levels = range((T_).bit_length())
    assert s.sensitivity_sq_prefix(T_ - 1, p1) == sum((T_ // 2**h) * 4**h for h in levels)


# --- jax_privacy's numbers (jax_privacy @ 8967688, matrix_factorization/sensitivity.py and
# toeplitz.py, float64; computed with jax 0.10 in a scratch environment) ------------------------
def test_against_jax_privacy_fixed_epoch_and_min_sep():
    neg = mf.banded([1.0, -0.7, 0.4, -0.2], 12)  # sensitivity.fixed_epoch_sensitivity(C, epochs)**2
    for epochs, ref in ((2, 3.38), (3, 5.070000000000001), (6, 15.339999999999998)):
        p = Participation("every_epoch", steps_per_epoch=12 // epochs)
        assert neg.sensitivity_sq_prefix(11, p) == pytest.approx(ref, rel=1e-12)
    pos = mf.banded([1.0, 0.5, 0.3], 12)  # sensitivity.get_sensitivity_banded(C, 3, 2)**2
    assert pos.sensitivity_sq_prefix(11, Participation("min_separated", min_separation=3,
                                                       max_participations=2)) == pytest.approx(2.68)


def test_against_jax_privacy_toeplitz_min_sep_of_optimized_strategy():
    # toeplitz.minsep_sensitivity_squared(optimize_banded_toeplitz(1000, 16), 16, n=1000)
    s = mf.banded(mf.optimize_banded(1000, 16).coefficients, 1000)  # not column-normalised
    p = Participation("min_separated", min_separation=16)
    assert s.sensitivity_sq_prefix(999, p) == pytest.approx(62.691063963352796, rel=1e-8)
    # column-normalised: every column has norm 1, ceil(1000 / 16) = 63 participations
    assert mf.optimize_banded(1000, 16).sensitivity_sq_prefix(999, p) == pytest.approx(63.0, rel=1e-12)
    # a cap on participations, 2b apart (jax_privacy: 3.0000000000000013)
    p3 = Participation("min_separated", min_separation=32, max_participations=3)
    assert s.sensitivity_sq_prefix(999, p3) == pytest.approx(3.0, rel=1e-12)


def test_large_T_min_separated_matches_every_epoch_for_unit_columns():
    """T = 4000, b = 32: min-separated with separation 100 (40 participations at most) equals the
    every-epoch value with period 100 for unit columns, and the single value is 1."""
    s = mf.optimize_banded(4000, 32)
    a = s.sensitivity_sq_prefix(3999, Participation("min_separated", min_separation=100))
    b = s.sensitivity_sq_prefix(3999, Participation("every_epoch", steps_per_epoch=100))
    assert a == pytest.approx(40.0, rel=1e-12) and b == pytest.approx(40.0, rel=1e-12)
    assert s.sensitivity_sq_prefix(3999, Participation("single")) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("T_, b, p", [(64, 4, 8), (64, 8, 7), (4000, 32, 100), (1000, 16, 1000)])
def test_shuffled_lies_between_fixed_order_and_min_separated(T_, b, p):
    """Fixed order's patterns are shuffled patterns, which are 1-separated patterns with at most
    one per epoch: the sensitivities are ordered. For unit columns and C^T C >= 0, a shuffled
    pattern adds at most 2 |X[j, k]| <= 2 per pair of neighbouring epochs: S <= 3 k."""
    k = -(-T_ // p)
    fixed = Participation("every_epoch", steps_per_epoch=p)
    shuf = Participation("shuffled", steps_per_epoch=p)
    sep1 = Participation("min_separated", min_separation=1, max_participations=k)
    s, tr = mf.optimize_banded(T_, b), mf.tree(T_)
    a, c = s.sensitivity_sq_prefix(T_ - 1, fixed), s.sensitivity_sq_prefix(T_ - 1, shuf)
    if p >= b:  # else fixed order has neighbouring participations in one band too
        assert a == pytest.approx(k, rel=1e-12)
        assert (c > 1.2 * a) == (k > 1)  # shuffling costs: neighbouring epochs' steps can be adjacent
    assert a - 1e-9 <= c <= 3 * k
    ta, tb, tc = (tr.sensitivity_sq_prefix(T_ - 1, q) for q in (fixed, shuf, sep1))
    assert ta <= tb <= tc


# --- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("call, err, match", [
    (lambda: mf.tree(8).step_event(0, 1.0, Participation("cyclic_poisson", min_separation=2, sample_rate=0.1)),
     ValueError, "tree is not banded"),
    (lambda: mf.banded([1.0, 0.5, 0.2], 8).step_event(
        0, 1.0, Participation("cyclic_poisson", min_separation=2, sample_rate=0.1)),
     ValueError, "bands <= min_separation"),
    (lambda: mf.identity(8).step_event(0, 1.0, Participation("cyclic_poisson", min_separation=9, sample_rate=0.1)),
     ValueError, "min_separation <= steps"),
    (lambda: mf.banded([1.0, 0.5, 0.2], 8).sensitivity_sq_prefix(7, Participation("min_separated", min_separation=2)),
     ValueError, "bands <= min_separation"),
    (lambda: mf.banded([1.0, 0.5, 0.2, 0.1], 8).sensitivity_sq_prefix(7, Participation("shuffled", steps_per_epoch=2)),
     ValueError, "steps_per_epoch >= bands - 1"),
    (lambda: mf.identity(8).sensitivity_sq_prefix(8, Participation("single")), ValueError, "t must be in"),
    (lambda: mf.identity(8).sensitivity_sq_prefix(-2, Participation("single")), ValueError, "t must be in"),
    (lambda: mf.identity(8).sensitivity_sq_prefix(1.0, Participation("single")), TypeError, "t must be an int"),
    (lambda: mf.identity(8).sensitivity_sq_prefix(1, "single"), TypeError, "participation must be a Participation"),
    (lambda: mf.identity(8).step_event(-1, 1.0, Participation("single")), ValueError, "t must be in"),
    (lambda: mf.identity(8).step_event(0, 0.0, Participation("single")), ValueError, "noise_multiplier"),
    (lambda: mf.identity(8).step_event(0, float("inf"), Participation("single")), ValueError, "noise_multiplier"),
    (lambda: mf.identity(8).step_event(0, "1", Participation("single")), TypeError, "noise_multiplier"),
    (lambda: mf.identity(8).event(1.0, Participation("single"), steps=9), ValueError, "steps must be in"),
])
def test_refusals(call, err, match):
    with pytest.raises(err, match=match):
        call()

"""matrix_factorization strategies: rows and the noise recursion against dense float64 algebra, the
tree's prefix nodes against the explicit prefix-sum matrix, expected errors against ||A C^{-1}||_F^2,
Participation validation and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import solve_triangular

from ppml_fast.accounting import matrix_factorization as mf
from ppml_fast.accounting.matrix_factorization import Participation


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PPML_FAST_CACHE", str(tmp_path))  # optimise_banded's disk cache

STRATEGIES = [
    lambda T: mf.identity(T),
    lambda T: mf.banded([1.0, 0.5, 0.3], T),
    lambda T: mf.banded([2.0, -1.4, 0.8, -0.4], T, column_normalize=True),
    lambda T: mf.banded(mf.optimize_banded(T, 4, use_cache=False).coefficients, T),
    lambda T: mf.optimize_banded(T, 4, use_cache=False),
]


def _recursion(strategy, z):
    """The contract's generator: w_t = (z_t - sum_{j>=1} C[t, t-j] w_{t-j}) / C[t, t]."""
    w = np.zeros_like(z)
    for t in range(strategy.steps):
        r = strategy.row(t)
        w[t] = (z[t] - sum(r[j] * w[t - j] for j in range(1, r.size))) / r[0]
    return w


@pytest.mark.parametrize("make", STRATEGIES)
@pytest.mark.parametrize("T", [4, 5, 17])
def test_banded_rows_and_recursion_match_dense_solve(make, T):
    s = make(T)
    C = s.matrix()
    for t in range(T):  # row(t) is C's band, diagonal first
        k = min(s.bands, t + 1)
        np.testing.assert_array_equal(s.row(t), C[t, t - np.arange(k)])
        assert np.all(C[t, : t - k + 1] == 0) and np.all(C[t, t + 1:] == 0)
    z = np.random.default_rng(T).standard_normal((T, 3))
    w = _recursion(s, z)
    np.testing.assert_allclose(w, np.linalg.solve(C, z), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.noise_matrix(), solve_triangular(C, np.eye(T), lower=True), atol=1e-12)


@pytest.mark.parametrize("make", STRATEGIES)
@pytest.mark.parametrize("T", [4, 6, 33])
def test_banded_expected_error_is_frobenius_norm_of_A_Cinv(make, T):
    s = make(T)
    B = np.tri(T) @ np.linalg.inv(s.matrix())
    np.testing.assert_allclose(s.expected_error(), np.sum(B * B), rtol=1e-10)
    np.testing.assert_allclose(s.max_column_norm(), np.linalg.norm(s.matrix(), axis=0).max(), rtol=1e-12)


def test_column_normalize_gives_unit_columns_and_lower_error():
    c = [1.0, 0.6, 0.2]
    plain, normed = mf.banded(c, 9), mf.banded(c, 9, column_normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed.matrix(), axis=0), np.ones(9), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(plain.matrix(), axis=0)[-1], 1.0)  # the last column: c_0
    # against C / ||c|| (max column norm 1 too; its inverse, hence its error, scales by ||c||, ||c||^2)
    assert normed.expected_error() < plain.expected_error() * np.dot(c, c)


@pytest.mark.parametrize("T", [1, 2, 3, 7, 8, 13, 64, 100])
def test_tree_prefix_nodes_reconstruct_prefix_noise(T):
    s = mf.tree(T)
    C = s.matrix()  # nodes x T
    rel = s.release_step()
    assert s.num_nodes == C.shape[0] < 2 * T
    rng = np.random.default_rng(T)
    z = rng.standard_normal((s.num_nodes, 2))
    for t in range(T):
        nodes = s.prefix_nodes(t)
        assert len(set(nodes)) == len(nodes) and all(0 <= n < 2 * T for n in nodes)
        assert np.all(rel[nodes] <= t)  # only released nodes
        # the nodes partition steps 0..t exactly: their rows of C sum to the indicator of [0, t]
        np.testing.assert_array_equal(C[nodes].sum(axis=0), (np.arange(T) <= t).astype(float))
    assert s.prefix_nodes(-1) == []
    # w = differences of the prefix noises; cumsum(w) = B z with B (T x nodes) the prefix incidence
    B = np.zeros((T, s.num_nodes))
    for t in range(T):
        B[t, s.prefix_nodes(t)] = 1.0
    w = s.noise_matrix() @ z
    np.testing.assert_allclose(np.cumsum(w, axis=0), B @ z, atol=1e-12)
    np.testing.assert_allclose(B @ C, np.tri(T), atol=0)  # A = B C: a factorisation of prefix sums
    assert s.expected_error() == np.sum(B * B)
    assert s.max_column_norm() ** 2 == pytest.approx(np.max(np.sum(C * C, axis=0)))


def test_identity_is_dp_sgd():
    s = mf.identity(6)
    assert s.kind == "identity" and s.bands == 1 and s.steps == 6
    np.testing.assert_array_equal(s.matrix(), np.eye(6))
    assert s.expected_error() == 21.0  # ||A||_F^2 = T (T + 1) / 2


def test_strategies_are_immutable():
    s = mf.banded([1.0, 0.5], 4)
    with pytest.raises(AttributeError):
        s.steps = 5
    with pytest.raises(ValueError):
        s.coefficients[0] = 3.0
    r = s.row(2)
    r[0] = 9.0
    assert s.row(2)[0] == 1.0


# --- Participation ---------------------------------------------------------------------------
def test_participation_valid():
    assert Participation("single").participations(10) == 1
    assert Participation("every_epoch", steps_per_epoch=4).participations(10) == 3
    assert Participation("shuffled", steps_per_epoch=4).participations(10) == 3
    assert Participation("shuffled", steps_per_epoch=4).period(10) is None
    assert Participation("min_separated", min_separation=3).participations(10) == 4
    assert Participation("min_separated", min_separation=3, max_participations=2).participations(10) == 2
    p = Participation("cyclic_poisson", min_separation=4, sample_rate=0.25)
    assert p.period(10) == 4 and p.sample_rate == 0.25
    assert hash(p) == hash(Participation("cyclic_poisson", min_separation=4, sample_rate=0.25))


@pytest.mark.parametrize("args, kwargs, err, match", [
    (("epochs",), {}, ValueError, "kind must be one of"),
    (("every_epoch",), {}, ValueError, "needs steps_per_epoch"),
    (("every_epoch",), {"steps_per_epoch": 0}, ValueError, "steps_per_epoch must be >= 1"),
    (("every_epoch",), {"steps_per_epoch": 2.0}, TypeError, "steps_per_epoch must be an int"),
    (("every_epoch",), {"steps_per_epoch": True}, TypeError, "steps_per_epoch must be an int"),
    (("single",), {"min_separation": 3}, ValueError, "takes only no arguments"),
    (("shuffled",), {}, ValueError, "needs steps_per_epoch"),
    (("shuffled",), {"steps_per_epoch": 3, "max_participations": 2}, ValueError, "takes only"),
    (("min_separated",), {}, ValueError, "needs min_separation"),
    (("min_separated",), {"min_separation": 2, "max_participations": 0}, ValueError, "max_participations"),
    (("min_separated",), {"min_separation": 2, "sample_rate": 0.1}, ValueError, "takes only"),
    (("cyclic_poisson",), {"min_separation": 2}, ValueError, "needs sample_rate"),
    (("cyclic_poisson",), {"min_separation": 2, "sample_rate": 0.0}, ValueError, r"sample_rate must be in \(0, 1\]"),
    (("cyclic_poisson",), {"min_separation": 2, "sample_rate": float("nan")}, ValueError, "NaN"),
    (("cyclic_poisson",), {"min_separation": 2, "sample_rate": 1.5}, ValueError, "sample_rate"),
])
def test_participation_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        Participation(*args, **kwargs)


# --- constructors: bad input -----------------------------------------------------------------
@pytest.mark.parametrize("call, err, match", [
    (lambda: mf.identity(0), ValueError, "steps must be in"),
    (lambda: mf.tree(2.5), TypeError, "steps must be an int"),
    (lambda: mf.banded([], 4), ValueError, "non-empty"),
    (lambda: mf.banded([[1.0]], 4), ValueError, "1-D"),
    (lambda: mf.banded([0.0, 1.0], 4), ValueError, r"coefficients\[0\]"),
    (lambda: mf.banded([-1.0], 4), ValueError, r"coefficients\[0\]"),
    (lambda: mf.banded([1.0, np.inf], 4), ValueError, "finite"),
    (lambda: mf.banded([1.0, "a"], 4), (TypeError, ValueError), "coefficients"),
    (lambda: mf.banded([1.0, 0.5, 0.2], 2), ValueError, "bands"),
    (lambda: mf.banded([1.0], 2, column_normalize=1), TypeError, "column_normalize"),
    (lambda: mf.optimize_banded(8, 9), ValueError, "bands must be in"),
    (lambda: mf.optimize_banded(8, 0), ValueError, "bands must be in"),
    (lambda: mf.optimize_banded(8, 2.0), TypeError, "bands must be an int"),
    (lambda: mf.banded([1.0], 4).row(4), ValueError, "t must be in"),
    (lambda: mf.banded([1.0], 4).row(-1), ValueError, "t must be in"),
    (lambda: mf.tree(4).prefix_nodes(4), ValueError, "t must be in"),
    (lambda: mf.tree(4).prefix_nodes(-2), ValueError, "t must be in"),
    (lambda: mf.tree(5000).matrix(), ValueError, "dense matrices"),
])
def test_constructors_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()

"""The privacy-utility benchmark of issue 19 (ppml_fast.benchmarks.privacy_utility) at CI size:
every method hits its target epsilon from below, its accounting agrees with dp_accounting on the
same event, and its one-run audit does not refute the claim; and the audit's scorer does find
leaks where the noise is smaller than claimed (so the audit can fail)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent, SelfComposedEvent
from ppml_fast.accounting import matrix_factorization as mf
from ppml_fast.audit import one_run_audit
from ppml_fast.benchmarks import privacy_audit
from ppml_fast.benchmarks import privacy_utility as pu

METHODS = {"dpsgd_poisson", "dpsgd_shuffle", "tree", "bandmf_fixed", "bandmf_cyclic"}


@pytest.fixture(scope="module")
def quick():
    return pu.run(pu.quick_tasks(), epsilons=(3.0,), seeds=(0,), audit_canaries=100, cyclic_bands=2)


def test_quick_table_structure(quick):
    rows = quick["rows"]
    assert {r["method"] for r in rows} == METHODS and len(rows) == len(METHODS)
    for r in rows:
        assert 0.0 <= r["accuracy_mean"] <= 1.0 and r["seeds"] == 1
        assert r["sigma"] > 0 and r["steps"] == 4 and r["analysis"]
        assert r["audit"] is not None and r["audit"]["canaries"] == 100
    table = pu.format_table(quick)
    for m in METHODS:
        assert m in table
    assert "ABOVE CLAIM" not in table


def test_quick_targets_met_and_cross_checked(quick):
    for r in quick["runs"]:
        assert r["epsilon"] <= r["target_epsilon"], r  # calibrated from below
        assert r["epsilon"] >= 0.97 * r["target_epsilon"], r  # and not far below (tolerance 1%)
        c = r["crosscheck"]
        assert c["ppml_fast_pld"] == pytest.approx(r["epsilon"], rel=1e-3), (r["method"], c)
        assert c["dp_accounting_pld"] == pytest.approx(r["epsilon"], rel=1e-3), (r["method"], c)
    sigmas = {r["method"]: r["sigma"] for r in quick["rows"]}
    # fixed-order BandMF with b = K: a record's columns never overlap, S = epochs = 1, the same
    # Gaussian as the shuffled DP-SGD account; the tree's sensitivity is larger (S = 3 at T = 4)
    assert sigmas["bandmf_fixed"] == pytest.approx(sigmas["dpsgd_shuffle"], rel=1e-6)
    assert sigmas["tree"] == pytest.approx(sigmas["dpsgd_shuffle"] * math.sqrt(3), rel=0.02)


def test_quick_audits_do_not_exceed_claims(quick):
    for r in quick["rows"]:
        assert r["audit"]["epsilon_lower_bound"] <= r["epsilon"], r


def test_quick_noise_is_the_claimed_factorization(quick):
    """What the optimizer added at the coordinates of canaries that never joined, whitened by the
    strategy's covariance sigma^2 M M^T, has variance 1 (4 steps x ~50 canaries: the sample
    variance's sd is ~0.1; 5 sd allowed): a noise std off by 25% or more fails."""
    for r in quick["rows"]:
        assert abs(r["audit"]["whitened_noise_var"] - 1.0) < 0.5, r


# -- the audit's scorer, on simulated observations y = u + s w (w with the mechanism's covariance)

def _bound(kind, sigma_true, sigma_scored, *, strategy=None, T=64, K=8, q=0.25, parts=4, m=1000, seed=0):
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    joins, known = privacy_audit.plan_joins(kind, steps=T, canaries=m, included=included, rng=rng,
                                            steps_per_epoch=K, sample_rate=q, parts=parts)
    M = None if strategy is None else strategy.noise_matrix()
    w = rng.standard_normal((T, m)) if M is None else M @ rng.standard_normal((M.shape[1], m))
    y = joins.astype(float) + sigma_true * w
    sc = privacy_audit.scores(kind, y, known, sigma=sigma_scored, noise_matrix=M, sample_rate=q, parts=parts)
    return one_run_audit(sc, included, delta=1e-5).epsilon_lower_bound


@pytest.mark.parametrize("kind", ["poisson", "every_epoch", "shuffled", "cyclic_poisson"])
def test_scorer_finds_noise_smaller_than_claimed(kind):
    """The claim is computed for sigma = 4 (4 sqrt(S) for the non-amplified schemas); the
    simulated mechanism adds sigma = 0.3: the audit must refute it (the benchmark's audit can
    fail), and with the claimed noise it must not."""
    T, K, q, b = 64, 8, 0.25, 4
    claimed = 4.0
    if kind == "poisson":
        strategy, claim_ev = None, SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(4.0)), T)
    elif kind == "cyclic_poisson":
        strategy = mf.optimize_banded(T, b)
        zeta = strategy.max_column_norm()
        claim_ev = SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(4.0 / zeta)), T // b)
    else:
        strategy = mf.tree(T) if kind == "every_epoch" else None
        part = mf.Participation(kind, steps_per_epoch=K)
        S = T // K if strategy is None else strategy.sensitivity_sq_prefix(T - 1, part)
        claimed = 4.0 * math.sqrt(S)  # a claim of about 1.2 (a one-run audit reaches ~5 at most)
        claim_ev = GaussianEvent(claimed / math.sqrt(S))
    claim = PLDAccountant().compose(claim_ev).get_epsilon(1e-5)
    leaked = _bound(kind, 0.3, 0.3, strategy=strategy, T=T, K=K, q=q, parts=b)
    assert leaked > claim + 0.5, (kind, leaked, claim)
    honest = _bound(kind, claimed, claimed, strategy=strategy, T=T, K=K, q=q, parts=b, seed=1)
    assert honest <= claim, (kind, honest, claim)


def test_cli_only_privacy_utility_dispatches(monkeypatch):
    from ppml_fast import cli

    seen = []
    monkeypatch.setattr(pu, "main", lambda argv=None: seen.append(argv) or 0)
    assert cli.main(["bench", "--only", "privacy-utility", "--quick"]) == 0
    assert seen == [["--quick"]]

"""Secure aggregation under dropout (issue 18 item 2): with 100 clients and 30% dropout the run
completes every round (a round that cannot unmask is retried over its survivors, else recorded
as skipped with its reason), the aggregate of each completed round is the plain sum of its
survivors within the quantisation bound, DP + SecAgg completes with DP-FedAvg's epsilon, and the
derived graph degree and threshold meet their target failure probability (Monte Carlo with a
fixed seed, thresholds from the binomial)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import binom

from ppml_fast.federated import DPFedAvgFixed, FedAvg, FitResult, run_simulation
from ppml_fast.federated.simulation import Simulation
from ppml_fast.federated.secagg import (SecAggAborted, SecAggError, SecAggFedAvg, SecAggParams,
                                        SecAggRound, design, harary_graph)
from ppml_fast.federated.secagg.design import round_failure_probability
from ppml_fast.federated.types import ClientProxy

from ._sim_helpers import make_clients, tiny_model

KW = dict(progress=False, dropout=0.3, lr=0.1, seed=1)


@pytest.fixture(scope="module")
def clients100():
    return make_clients(100, 2000)  # 20 examples each: equal weights, as SecAggFedAvg's


def test_default_settings_complete_every_round_and_match_fedavg(clients100):
    kw = dict(KW, rounds=4, clients_per_round=30)
    plain = run_simulation(tiny_model, clients100, FedAvg(), **kw)
    secure = run_simulation(tiny_model, clients100, SecAggFedAvg(clip_range=1.0, seed=0), **kw)
    assert len(secure.rounds) == 4 and secure.stopped == "rounds"
    for row in secure.rounds:
        assert row["skipped"] is False or (row["skipped"] is True and "aborted" in row["skip_reason"])
        assert "secagg_aborted" not in row["metrics"] or row["skipped"] is True
    assert sum(len(r["dropped"]) for r in secure.rounds) > 0
    assert [r["clients"] for r in secure.rounds] == [r["clients"] for r in plain.rounds]
    assert torch.allclose(secure.parameters, plain.parameters, atol=1e-5, rtol=0)


def test_aggregate_equals_plain_sum_of_survivors_within_bound():
    # 100 selected, 30 dropped after sharing: the derived design (complete graph, t = 51 at
    # d = 0.3) unmasks 70; a float64 reference of the survivors' sum
    p, gen = 257, torch.Generator().manual_seed(3)
    updates = {c: torch.randn(p, generator=gen, dtype=torch.float64) * 0.3 for c in range(100)}
    dropped = set(np.random.default_rng(4).choice(100, 30, replace=False).tolist())
    results = [(ClientProxy(c), FitResult(update=updates[c].float(), num_examples=1))
               for c in range(100) if c not in dropped]
    failures = [(ClientProxy(c), "dropout") for c in sorted(dropped)]
    strategy = SecAggFedAvg(clip_range=1.0, seed=5)
    new, metrics = strategy.aggregate_fit(1, torch.zeros(p), results, failures)
    assert metrics["secagg_survivors"] == 70 and metrics["secagg_dropped"] == 30
    assert metrics["secagg_threshold"] == 51 and metrics["secagg_retried"] == 0.0
    expected = torch.stack([updates[c].float().double().clamp(-1, 1) for c in range(100)
                            if c not in dropped]).sum(0) / 70
    bound = metrics["secagg_error_bound"] / 70 + 1e-6  # the sum's bound over 70, float32 rounding
    assert float((new.double() - expected).abs().max()) < bound


def test_aborted_rounds_are_skipped_with_a_reason_and_change_nothing(clients100):
    # threshold 0.9 of 20 and no retry: most rounds at 30% dropout cannot unmask
    strategy = SecAggFedAvg(clip_range=1.0, seed=0, reconstruction_threshold=0.9, retry=False)
    with Simulation(tiny_model, clients100, strategy, rounds=6, clients_per_round=20, **KW) as sim:
        while True:
            before = sim.parameters.clone()
            row = sim.step()
            if row is None:
                break
            assert torch.equal(sim.parameters, before) == row["skipped"]  # skipped: unchanged
    h = sim.history
    assert len(h.rounds) == 6 and h.stopped == "rounds"
    skipped = [r for r in h.rounds if r["skipped"]]
    assert skipped, "the test needs at least one aborted round"
    for r in skipped:
        assert r["skip_reason"].startswith(f"secure aggregation round {r['round']} aborted")
        assert "below the threshold" in r["skip_reason"] and r["metrics"]["secagg_aborted"] == 1.0
    # the same run with the retry: no round is lost, and the model is FedAvg's
    plain = run_simulation(tiny_model, clients100, FedAvg(), rounds=6, clients_per_round=20, **KW)
    retry = run_simulation(tiny_model, clients100,
                           SecAggFedAvg(clip_range=1.0, seed=0, reconstruction_threshold=0.9),
                           rounds=6, clients_per_round=20, **KW)
    assert not any(r["skipped"] for r in retry.rounds)
    assert sum(r["metrics"]["secagg_retried"] for r in retry.rounds) == len(skipped)
    assert torch.allclose(retry.parameters, plain.parameters, atol=1e-5, rtol=0)


def test_skipped_round_leaves_the_parameters_unchanged():
    p = 16
    results = [(ClientProxy(c), FitResult(update=torch.full((p,), 0.1), num_examples=1)) for c in range(3)]
    failures = [(ClientProxy(c), "dropout") for c in range(3, 10)]
    strategy = SecAggFedAvg(clip_range=1.0, seed=0, retry=False)
    with pytest.raises(SecAggAborted, match="round 1 aborted"):
        strategy.aggregate_fit(1, torch.ones(p), results, failures)
    one = results[:1]
    with pytest.raises(SecAggAborted, match="1 client\\(s\\) sent masked inputs, too few to retry"):
        SecAggFedAvg(clip_range=1.0, seed=0).aggregate_fit(2, torch.ones(p), one, failures)


def test_twenty_clients_per_round_complete(clients100):
    h = run_simulation(tiny_model, clients100, SecAggFedAvg(clip_range=1.0), rounds=8,
                       clients_per_round=20, **KW)
    assert len(h.rounds) == 8 and h.stopped == "rounds"
    assert all(not r["skipped"] for r in h.rounds)  # every failed run was retried over survivors
    assert all(r["metrics"]["secagg_threshold"] == 11 for r in h.rounds if not r["metrics"]["secagg_retried"])


def test_dp_secagg_at_30_percent_dropout_completes_with_dp_fedavgs_epsilon(clients100):
    kw = dict(KW, rounds=4, clients_per_round=20, delta=1e-5)

    def dp():  # a noise seed: both runs draw the same noise
        return DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.5, seed=8)

    plain = run_simulation(tiny_model, clients100, dp(), **kw)
    secure = run_simulation(tiny_model, clients100, SecAggFedAvg(dp(), seed=5), **kw)
    assert len(secure.rounds) == 4 and not any(r["skipped"] for r in secure.rounds)
    eps = [r["epsilon"] for r in secure.rounds]
    assert eps == [r["epsilon"] for r in plain.rounds] and 0 < eps[0] < eps[-1] < float("inf")
    assert torch.allclose(secure.parameters, plain.parameters, atol=1e-5, rtol=0)


@pytest.mark.parametrize("survivors", [0, 1, 2])
def test_dp_release_exists_for_every_number_of_survivors(survivors):
    # one, two or no survivors of 5 sampled: the release is DP-FedAvg's (same noise seed), and
    # the round is accounted exactly once
    p = 40
    results = [(ClientProxy(c), FitResult(update=torch.full((p,), 0.3 * (c + 1)), num_examples=1))
               for c in range(survivors)]
    failures = [(ClientProxy(c), "dropout") for c in range(survivors, 5)]
    proxies = [ClientProxy(c) for c in range(5)]

    def dp():
        s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.5, seed=11)
        s.setup(num_available_clients=5, clients_per_round=5)
        return s

    plain, inner = dp(), dp()
    secure = SecAggFedAvg(inner, seed=2)
    plain.configure_fit(1, torch.zeros(p), proxies, 5, np.random.default_rng(0))
    secure.configure_fit(1, torch.zeros(p), proxies, 5, np.random.default_rng(0))
    want, _ = plain.aggregate_fit(1, torch.zeros(p), results, failures)
    got, metrics = secure.aggregate_fit(1, torch.zeros(p), results, failures)
    assert inner.rounds == plain.rounds == 1 and inner.epsilon(1e-5) == plain.epsilon(1e-5)
    assert float((got - want).abs().max()) < 1e-5
    assert metrics.get("secagg_lone_survivor", 0.0) == (1.0 if survivors == 1 else 0.0)


def _monte_carlo_failures(n: int, k, t: int, d: float, trials: int, seed: int) -> int:
    """Rounds (of ``trials``) in which some client has fewer than t surviving share holders."""
    rng = np.random.default_rng(seed)
    rb = random.Random(seed).randbytes
    fails = 0
    for _ in range(trials):
        if k is None:
            alive = rng.random(n) >= d
            fails += int(alive.sum() < t)
            continue
        g = harary_graph(list(range(n)), k, rb)
        nbrs = np.array([sorted(g[u]) for u in range(n)])
        alive = rng.random(n) >= d
        holders_alive = alive[nbrs].sum(1) + alive  # a survivor holds its own share
        fails += int((holders_alive < t).any())
    return fails


@pytest.mark.parametrize("n, d, target", [(100, 0.3, 0.05), (60, 0.3, 0.05), (30, 0.3, 0.05)])
def test_derived_parameters_meet_the_target_failure_probability(n, d, target):
    got = design(n, dropout=d, failure_probability=target)
    assert got.meets_target and got.failure_bound <= target and got.threshold > (
        (n if got.neighbours is None else got.neighbours + 1) / 2)
    trials = 1500
    fails = _monte_carlo_failures(n, got.neighbours, got.threshold, d, trials, seed=n)
    # P[Bin(trials, target) > limit] <= 1e-6: exceeding it means the bound does not hold
    assert fails <= binom.ppf(1 - 1e-6, trials, target)
    if got.neighbours is None:  # exact for the complete graph: two-sided
        lo, hi = binom.ppf(1e-6, trials, got.failure_bound), binom.ppf(1 - 1e-6, trials, got.failure_bound)
        assert lo <= fails <= hi
    else:  # the smallest degree: k - 2 at its lowest valid threshold misses the target
        k2 = got.neighbours - 2
        assert round_failure_probability(n, k2, (k2 + 1) // 2 + 1, d) > target


def test_design_without_a_feasible_degree_takes_the_complete_graph():
    got = design(20, dropout=0.3, failure_probability=1e-6)
    assert got.neighbours is None and got.threshold == 11 and not got.meets_target
    assert got.failure_bound == pytest.approx(binom.cdf(10, 20, 0.7), rel=1e-12)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    (dict(dropout=0.1, failure_probability=0.0), ValueError, r"failure_probability must be in \(0, 1\)"),
    (dict(dropout=0.1, corrupt_fraction=-0.1), ValueError, "corrupt_fraction"),
    (dict(dropout="x"), TypeError, "dropout must be a finite real number"),
])
def test_design_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        design(10, **kwargs)
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        design(1, dropout=0.1)


def test_server_aborts_before_any_share_when_a_neighbourhood_is_short():
    # k = 4, t = 4 of 5 holders; two neighbours of client 0 drop before masking: its self mask
    # could not be removed, and the server stops before asking anyone for shares
    rb = random.Random(10).randbytes
    params = SecAggParams.create(list(range(10)), vector_length=9, clip_range=1.0, threshold=4,
                                 neighbours=4, randbytes=rb)
    near = sorted(params.graph[0])[:2]
    ups = [torch.zeros(9) for _ in range(10)]
    with pytest.raises(SecAggError, match="before unmasking \\(no share is revealed\\)"):
        SecAggRound(params, randbytes=rb).run(ups, drop_before_masking=near)

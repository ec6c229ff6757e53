"""DP-FedAvg with fixed clipping (McMahan et al. 2018): Poisson sampling of clients, clipping to
C, noise std σC/(qN) added once from the seeded stream, the inner strategy stepping with the
noised mean, and user-level accounting with the shared accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ppml_fast.federated.dp.fixed as fixed_mod
from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent, RDPAccountant
from ppml_fast.federated import (ClientProxy, DPFedAvgFixed, FedAdam, FedAvg, FedMedian, FedProx,
                                 FedTrimmedAvg, FitResult, Krum)
from ppml_fast.ops import add_gaussian_noise_


def _proxies(n):
    return [ClientProxy(i) for i in range(n)]


def _results(instructions, updates):
    return [(p, FitResult(update=updates[p.cid], num_examples=1 + p.cid, metrics={"loss": 1.0}))
            for p, _ in instructions]


def _round(strategy, rnd, params, proxies, num_clients, updates, seed=0):
    ins = strategy.configure_fit(rnd, params, proxies, num_clients, np.random.default_rng([seed, rnd]))
    return ins, strategy.aggregate_fit(rnd, params, _results(ins, updates), [])


# ------------------------------------------------------------------ sampling

def test_sampling_is_poisson_with_rate_num_clients_over_n():
    n, k, rounds = 400, 40, 300
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)
    counts, per_client = [], np.zeros(n)
    for r in range(rounds):
        ins = s.configure_fit(r + 1, torch.zeros(3), _proxies(n), k, np.random.default_rng([7, r]))
        counts.append(len(ins))
        for p, _ in ins:
            per_client[p.cid] += 1
    assert s.sampling_rate == pytest.approx(0.1) and s.expected_clients == pytest.approx(40)
    counts = np.array(counts)
    # Binomial(400, 0.1): mean 40, variance 36 (a fixed-size sample would have variance 0)
    assert abs(counts.mean() - 40) < 4 * 6 / math.sqrt(rounds)
    assert 0.7 * 36 < counts.var(ddof=1) < 1.3 * 36
    # every client at rate q: Binomial(300, 0.1) per client, mean 30, sd 5.2
    assert abs(per_client.mean() - 30) < 0.5
    assert per_client.min() > 30 - 6 * 5.2 and per_client.max() < 30 + 6 * 5.2


def test_empty_round_is_allowed_and_releases_noise_only():
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, seed=3)
    empty = None
    for r in range(50):  # q = 0.1 over 10 clients: P(empty) = 0.35 per round
        ins = s.configure_fit(r + 1, torch.zeros(4), _proxies(10), 1, np.random.default_rng(r))
        if not ins:
            empty = r + 1
            break
    assert empty is not None
    params = torch.zeros(1000)
    new, metrics = s.aggregate_fit(empty, params, [], [])
    assert s.rounds == 1 and metrics["dp_noise_std"] == pytest.approx(1.0)  # σC/(qN) = 1/1
    assert 0.9 < float(new.std()) < 1.1


def test_inner_extras_reach_the_sampled_clients():
    s = DPFedAvgFixed(FedProx(proximal_mu=0.3), noise_multiplier=1.0, clip_norm=1.0)
    ins = s.configure_fit(1, torch.zeros(3), _proxies(50), 25, np.random.default_rng(0))
    assert ins and all(cfg == {"proximal_mu": 0.3} for _, cfg in ins)
    assert [p.cid for p, _ in ins] == sorted(p.cid for p, _ in ins)


# ------------------------------------------------------------------ clipping and noise

def test_every_update_is_clipped_to_c_and_the_aggregate_is_sum_plus_noise_over_qn(monkeypatch):
    n, p, c, sigma = 8, 50, 1.5, 0.9
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 0.5, 1.0, 1.4, 2.0, 5.0, 30.0, 1e3])
    raw = torch.randn(n, p, generator=g)
    updates = raw / raw.norm(dim=1, keepdim=True) * scales[:, None]
    seen = []
    real = fixed_mod.weighted_aggregate

    def spy(u, w, **kw):  # observe what the op clips, and check its output
        out, norms = real(u, w, **kw)
        seen.append((u.clone(), w.clone(), kw["clip_norm"], norms))
        return out, norms

    monkeypatch.setattr(fixed_mod, "weighted_aggregate", spy)
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=sigma, clip_norm=c, seed=11)
    params = torch.randn(p, generator=g)
    ins, (new, metrics) = _round(s, 1, params, _proxies(n), n, updates)  # q = 1: everyone
    assert len(ins) == n and len(seen) == 1
    u, w, clip, norms = seen[0]
    assert clip == c and torch.equal(w, torch.ones(n, dtype=torch.float64))  # equal weights
    torch.testing.assert_close(norms, updates.double().norm(dim=1), rtol=1e-6, atol=0)
    clipped = u.double() * torch.clamp(c / norms, max=1.0)[:, None]
    assert bool((clipped.norm(dim=1) <= c * (1 + 1e-9)).all())
    assert torch.equal(s.last_update_norms, norms)
    # the released mean: (sum of clipped + N(0, (σC)^2)) / (qN), noise from Philox(seed, offset 0)
    noise = torch.zeros(p, dtype=torch.float32)
    add_gaussian_noise_(noise, sigma * c, seed=11, offset=0)
    want = params.double() + (clipped.sum(0) + noise.double()) / n
    torch.testing.assert_close(new.double(), want, rtol=0, atol=1e-5)
    assert metrics["dp_noise_std"] == pytest.approx(sigma * c / n)


def test_one_huge_update_moves_the_model_by_exactly_c_over_qn():
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=1e-9, clip_norm=0.25, seed=0)
    u = torch.full((100,), 1e3)
    _, (new, _) = _round(s, 1, torch.zeros(100), _proxies(4), 4, {i: u for i in range(4)})
    # 4 identical clipped updates summed over qN = 4: norm C
    assert float(new.norm()) == pytest.approx(0.25, rel=1e-5)


def test_noise_std_is_sigma_c_over_qn_and_moves_on_every_round():
    p, n, k, sigma, c = 200_000, 50, 10, 1.3, 0.7
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=sigma, clip_norm=c, seed=17)
    zeros = {i: torch.zeros(p) for i in range(n)}
    _, (a, _) = _round(s, 1, torch.zeros(p), _proxies(n), k, zeros)
    _, (b, _) = _round(s, 2, torch.zeros(p), _proxies(n), k, zeros)
    want = sigma * c / (k / n * n)
    for x in (a, b):  # sample std: relative standard error 1/sqrt(2P) = 0.16%
        assert float(x.std()) == pytest.approx(want, rel=0.01)
        assert abs(float(x.mean())) < 5 * want / math.sqrt(p)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(p)
    # the same user noise seed gives the same noise; without one the key is OS entropy (the
    # round's seeded rng never keys noise: issue 15 item 1)
    s2 = DPFedAvgFixed(FedAvg(), noise_multiplier=sigma, clip_norm=c, seed=17)
    _, (a2, _) = _round(s2, 1, torch.zeros(p), _proxies(n), k, zeros)
    assert torch.equal(a, a2)
    s3 = DPFedAvgFixed(FedAvg(), noise_multiplier=sigma, clip_norm=c)
    _, (a3, _) = _round(s3, 1, torch.zeros(p), _proxies(n), k, zeros)
    assert not torch.equal(a, a3)


def test_secure_mode_noise_has_the_right_std_and_is_not_reproducible():
    p = 100_000
    outs = []
    for _ in range(2):
        s = DPFedAvgFixed(FedAvg(), noise_multiplier=2.0, clip_norm=0.5, secure_mode=True)
        _, (x, _) = _round(s, 1, torch.zeros(p), _proxies(4), 2, {i: torch.zeros(p) for i in range(4)})
        assert float(x.std()) == pytest.approx(2.0 * 0.5 / 2, rel=0.02)
        outs.append(x)
    assert not torch.equal(outs[0], outs[1])


def test_inner_server_optimizer_steps_with_the_noised_mean():
    p = 20
    updates = {i: torch.randn(p, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    a = DPFedAvgFixed(FedAvg(), noise_multiplier=0.5, clip_norm=1.0, seed=4)
    b = DPFedAvgFixed(FedAdam(eta=0.1), noise_multiplier=0.5, clip_norm=1.0, seed=4)
    params = torch.zeros(p)
    _, (new_avg, _) = _round(a, 1, params, _proxies(6), 3, updates)
    _, (new_adam, _) = _round(b, 1, params, _proxies(6), 3, updates)
    delta = new_avg - params  # FedAvg adds the noised mean; FedAdam's first step follows its sign
    ref = FedAdam(eta=0.1)
    want, _ = ref.aggregate_fit(1, params, [(ClientProxy(0), FitResult(update=delta, num_examples=1))], [])
    torch.testing.assert_close(new_adam, want)


# ------------------------------------------------------------------ accounting

@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_the_accountants_for_the_composed_rounds(accountant):
    n, k, sigma, delta = 100, 20, 1.1, 1e-5
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=sigma, clip_norm=1.0, accountant=accountant)
    assert s.epsilon(delta) == 0.0
    zeros = {i: torch.zeros(5) for i in range(n)}
    ref_cls = RDPAccountant if accountant == "rdp" else PLDAccountant
    event = PoissonSampledEvent(0.2, GaussianEvent(sigma))
    for r in range(1, 4):
        _round(s, r, torch.zeros(5), _proxies(n), k, zeros)
        want = ref_cls().compose(event, r).get_epsilon(delta)
        assert s.epsilon(delta) == pytest.approx(want, rel=1e-12)
    assert s.accountant.events == [("gaussian", 0.2, sigma, 3)]  # one entry per run of rounds


def test_epsilon_matches_dp_accounting_rdp():
    dp_accounting = pytest.importorskip("dp_accounting")
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.05,
                      accountant="rdp")  # explicit since the default became "pld" (issue 17 item 3)
    ours = s.epsilon(1e-5, rounds_ahead=100)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=0.03)  # their orders differ from ours


def test_epsilon_rounds_ahead_does_not_mutate_and_predicts_the_next_rounds():
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)
    zeros = {i: torch.zeros(5) for i in range(40)}
    _round(s, 1, torch.zeros(5), _proxies(40), 8, zeros)
    before = s.state_dict()
    ahead = s.epsilon(1e-5, rounds_ahead=2)
    assert s.state_dict() == before and ahead > s.epsilon(1e-5)
    _round(s, 2, torch.zeros(5), _proxies(40), 8, zeros)
    _round(s, 3, torch.zeros(5), _proxies(40), 8, zeros)
    assert s.epsilon(1e-5) == pytest.approx(ahead, rel=1e-12)


def test_rounds_ahead_before_the_first_round_needs_sampling_rate():
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        s.epsilon(1e-5, rounds_ahead=1)
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.1)
    want = PLDAccountant().compose(PoissonSampledEvent(0.1, GaussianEvent(1.0))).get_epsilon(1e-5)
    assert s.epsilon(1e-5, rounds_ahead=1) == pytest.approx(want)  # the default, PLD (issue 17 item 3)
    with pytest.raises(ValueError, match="sampling_rate"):  # 10 of 50 is q = 0.2, not 0.1
        s.configure_fit(1, torch.zeros(2), _proxies(50), 10, np.random.default_rng(0))


def test_state_dict_round_trip_continues_the_same_noise_and_accounting():
    # continue_noise=True: the caller vouches that no round was released after the state (the
    # default re-keys: tests/federated/test_dp_fedavg_resume.py)
    zeros = {i: torch.zeros(64) for i in range(10)}
    a = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, seed=9)
    _round(a, 1, torch.zeros(64), _proxies(10), 5, zeros)
    b = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)
    b.load_state_dict(a.state_dict(), continue_noise=True)
    assert b.epsilon(1e-5) == a.epsilon(1e-5)
    _, (xa, _) = _round(a, 2, torch.zeros(64), _proxies(10), 5, zeros)
    _, (xb, _) = _round(b, 2, torch.zeros(64), _proxies(10), 5, zeros)
    assert torch.equal(xa, xb)
    with pytest.raises(ValueError, match="state"):
        b.load_state_dict({"accountant_name": "pld"})  # the default's name (issue 17 item 3), nothing else


# ------------------------------------------------------------------ refusals and bad input

@pytest.mark.parametrize("inner", [FedMedian(), FedTrimmedAvg(beta=0.2), Krum(num_malicious_clients=1)])
def test_robust_inner_strategies_are_refused(inner):
    with pytest.raises(ValueError, match="mean-type"):
        DPFedAvgFixed(inner, noise_multiplier=1.0, clip_norm=1.0)


def test_nested_dp_wrappers_are_refused():
    inner = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="privacy"):
        DPFedAvgFixed(inner, noise_multiplier=1.0, clip_norm=1.0)


@pytest.mark.parametrize("kwargs,name", [
    ({"noise_multiplier": 0.0}, "noise_multiplier"), ({"noise_multiplier": float("nan")}, "noise_multiplier"),
    ({"noise_multiplier": "1"}, "noise_multiplier"), ({"clip_norm": -1.0}, "clip_norm"),
    ({"clip_norm": float("inf")}, "clip_norm"), ({"sampling_rate": 1.5}, "sampling_rate"),
    ({"sampling_rate": 0.0}, "sampling_rate"), ({"accountant": "moments"}, "accountant"),
    ({"seed": -1}, "seed"), ({"secure_mode": 1}, "secure_mode"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"noise_multiplier": 1.0, "clip_norm": 1.0, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        DPFedAvgFixed(FedAvg(), **args)
    with pytest.raises(TypeError, match="strategy"):
        DPFedAvgFixed("FedAvg", noise_multiplier=1.0, clip_norm=1.0)


def test_bad_calls_leave_the_state_unchanged():
    s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="configure_fit"):
        s.aggregate_fit(1, torch.zeros(3), [], [])
    with pytest.raises(ValueError, match="rounds_ahead"):
        s.epsilon(1e-5, rounds_ahead=-1)
    with pytest.raises(ValueError, match="delta"):
        s.epsilon(0.0)
    with pytest.raises(ValueError, match="num_clients"):
        s.configure_fit(1, torch.zeros(3), _proxies(5), 0, np.random.default_rng(0))
    s.configure_fit(1, torch.zeros(3), _proxies(5), 5, np.random.default_rng(0))
    before = s.state_dict()
    bad = [(ClientProxy(0), FitResult(update=torch.zeros(4), num_examples=1))]
    with pytest.raises(ValueError, match="entries"):
        s.aggregate_fit(1, torch.zeros(3), bad, [])
    assert s.state_dict() == before and s.rounds == 0

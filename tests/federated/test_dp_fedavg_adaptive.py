"""DP-FedAvg with adaptive clipping (Andrew et al. 2021): C tracks the target quantile of the
update norms, the update's noise multiplier is σ_Δ = (z^-2 - (2σ_b)^-2)^(-1/2), and the
accounting charges one PoissonSampled(q, Gaussian(z)) per round."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent, RDPAccountant
from ppml_fast.federated import ClientProxy, DPFedAvgAdaptive, FedAvg, FitResult
from ppml_fast.federated.dp.adaptive import update_noise_multiplier


def _proxies(n):
    return [ClientProxy(i) for i in range(n)]


def _run(strategy, updates, num_clients, rounds, seed=0):
    n, p = updates.shape
    params = torch.zeros(p)
    clips = []
    for r in range(1, rounds + 1):
        ins = strategy.configure_fit(r, params, _proxies(n), num_clients, np.random.default_rng([seed, r]))
        res = [(c, FitResult(update=updates[c.cid], num_examples=1)) for c, _ in ins]
        _, metrics = strategy.aggregate_fit(r, params, res, [])
        clips.append(metrics["dp_clip_norm"])
    return clips


@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_clip_norm_moves_to_the_target_quantile_of_the_update_norms(gamma):
    n, p = 500, 8
    g = torch.Generator().manual_seed(1)
    norms = torch.exp(0.5 * torch.randn(n, generator=g))  # log-normal population, median 1
    direction = torch.randn(n, p, generator=g)
    updates = direction / direction.norm(dim=1, keepdim=True) * norms[:, None]
    s = DPFedAvgAdaptive(FedAvg(), noise_multiplier=0.5, initial_clip_norm=0.1,
                         target_clipped_quantile=gamma, clip_norm_lr=0.2, seed=3)
    clips = _run(s, updates, num_clients=100, rounds=100)
    target = float(torch.quantile(norms, gamma))
    assert clips[0] == pytest.approx(0.1)
    assert clips[10] > 0.2  # all clipped at first: C grows by exp(0.2 * gamma) a round, 0.27 after 10
    late = np.array(clips[-30:])
    assert abs(math.log(float(np.exp(np.log(late).mean())) / target)) < 0.12
    # the fraction the final C leaves unclipped is near the target
    assert abs(float((norms <= s.clip_norm).double().mean()) - gamma) < 0.08


def test_update_noise_multiplier_is_andrew_et_al_theorem_1():
    z, sb = 1.0, 2.0
    sd = update_noise_multiplier(z, sb)
    assert sd == pytest.approx((z ** -2 - (2 * sb) ** -2) ** -0.5)
    # the two Gaussian releases together cost one Gaussian at z: RDP adds alpha / (2 sigma^2)
    both = RDPAccountant().compose(GaussianEvent(sd)).compose(GaussianEvent(2 * sb))
    one = RDPAccountant().compose(GaussianEvent(z))
    np.testing.assert_allclose(both.rdp, one.rdp, rtol=1e-12)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        update_noise_multiplier(1.0, 0.5)


def test_noise_and_accounting_use_sigma_delta_and_z():
    n, k, p, z = 200, 40, 100_000, 1.2
    s = DPFedAvgAdaptive(FedAvg(), noise_multiplier=z, initial_clip_norm=0.5, seed=2)
    ins = s.configure_fit(1, torch.zeros(p), _proxies(n), k, np.random.default_rng(0))
    res = [(c, FitResult(update=torch.zeros(p), num_examples=1)) for c, _ in ins]
    new, metrics = s.aggregate_fit(1, torch.zeros(p), res, [])
    sb = k / 20  # default clipped_count_stddev = qN / 20
    sd = update_noise_multiplier(z, sb)
    assert sd > z
    assert float(new.std()) == pytest.approx(sd * 0.5 / k, rel=0.01)
    assert metrics["dp_noise_std"] == pytest.approx(sd * 0.5 / k)
    assert s.accountant.events == [("gaussian", 0.2, z, 1)]
    want = PLDAccountant().compose(PoissonSampledEvent(0.2, GaussianEvent(z))).get_epsilon(1e-5)
    assert s.epsilon(1e-5) == pytest.approx(want, rel=1e-12)  # the default, PLD (issue 17 item 3)
    # every norm is 0 <= C: the noised unclipped fraction is near 1 and C shrinks
    assert abs(metrics["dp_unclipped_fraction"] - 1.0) < 5 * sb / k
    assert metrics["dp_next_clip_norm"] < 0.5 and s.clip_norm == metrics["dp_next_clip_norm"]


def test_same_seed_same_clip_norm_trajectory_and_state_round_trip():
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(60, 4, generator=g)
    kw = dict(noise_multiplier=0.3, initial_clip_norm=0.2, seed=8)
    a = _run(DPFedAvgAdaptive(FedAvg(), **kw), updates, 20, 6)
    s = DPFedAvgAdaptive(FedAvg(), **kw)
    b = _run(s, updates, 20, 6)
    assert a == b
    t = DPFedAvgAdaptive(FedAvg(), **kw)
    t.load_state_dict(s.state_dict())
    assert t.clip_norm == s.clip_norm and t.epsilon(1e-5) == s.epsilon(1e-5)


def test_small_default_count_noise_is_refused_naming_clipped_count_stddev():
    s = DPFedAvgAdaptive(FedAvg(), noise_multiplier=1.0)
    # 5 expected clients: sigma_b = 0.25, 2 sigma_b = 0.5 < z = 1
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        s.configure_fit(1, torch.zeros(2), _proxies(20), 5, np.random.default_rng(0))
    assert s.sampling_rate is None and s.rounds == 0
    ok = DPFedAvgAdaptive(FedAvg(), noise_multiplier=1.0, clipped_count_stddev=1.0)
    chosen = ok.configure_fit(1, torch.zeros(2), _proxies(20), 5, np.random.default_rng(0))
    assert {p.cid for p, _ in chosen} <= set(range(20)) and ok.sampling_rate == 0.25


@pytest.mark.parametrize("kwargs,name", [
    ({"target_clipped_quantile": 1.5}, "target_clipped_quantile"),
    ({"target_clipped_quantile": "0.5"}, "target_clipped_quantile"),
    ({"clip_norm_lr": 0.0}, "clip_norm_lr"), ({"initial_clip_norm": -0.1}, "initial_clip_norm"),
    ({"clipped_count_stddev": 0.0}, "clipped_count_stddev"),
    ({"clipped_count_stddev": 0.4}, "clipped_count_stddev"),  # 2 * 0.4 < z = 1
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"noise_multiplier": 1.0, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        DPFedAvgAdaptive(FedAvg(), **args)

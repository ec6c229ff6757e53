"""DPFTRLFedAvg (issue 19 item 2): user-level DP-FTRL with banded-MF or tree noise, clients
picked with min separation instead of Poisson sampling. A small simulation keeps every client's
picks >= b rounds apart and reports the strategy's epsilon; the round's noise is sigma C w_r / K
from the reserved offsets; a round past the plan is refused; state holds no noise and resumes
as a new segment with the clients' picks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppml_fast.accounting import GaussianEvent, PLDAccountant, RDPAccountant
from ppml_fast.accounting import matrix_factorization as mf
from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.federated import ClientProxy, DPFTRLFedAvg, FedAvg, FitResult, run_simulation
from ppml_fast.privacy.correlated_noise import CorrelatedNoise
from tests.federated._sim_helpers import eval_set, make_clients, tiny_model

SIGMA, CLIP = 1.0, 0.5


def _recording(strategy):
    picks = []
    configure = strategy.configure_fit

    def record(rnd, parameters, clients, num_clients, rng):
        out = configure(rnd, parameters, clients, num_clients, rng)
        picks.append(sorted(c.cid for c, _ in out))
        return out

    strategy.configure_fit = record
    return picks


@pytest.mark.parametrize("mechanism,bands", [("banded_mf", 4), ("tree", None)])
def test_simulation_keeps_separation_and_reports_the_strategys_epsilon(mechanism, bands):
    rounds = 8
    strategy = DPFTRLFedAvg(FedAvg(), noise_multiplier=SIGMA, clip_norm=CLIP, rounds=rounds,
                            mechanism=mechanism, bands=bands, min_separation=4, accountant="rdp")
    picks = _recording(strategy)
    h = run_simulation(tiny_model, make_clients(12), strategy, rounds=rounds, clients_per_round=3,
                       lr=0.1, batch_size=16, seed=1, eval_dataset=eval_set(), progress=False,
                       delta=1e-5)
    assert len(h.rounds) == rounds and all(len(p) == 3 for p in picks)
    when: dict[int, list[int]] = {}
    for r, cids in enumerate(picks):
        for c in cids:
            when.setdefault(c, []).append(r)
    assert all(b - a >= 4 for rs in when.values() for a, b in zip(rs, rs[1:]))
    part = mf.Participation("min_separated", min_separation=4)
    matrix = mf.tree(rounds) if mechanism == "tree" else mf.optimize_banded(rounds, bands)
    for r, row in enumerate(h.rounds):
        S = matrix.sensitivity_sq_prefix(r, part)
        want = RDPAccountant().compose(GaussianEvent(SIGMA / math.sqrt(S))).get_epsilon(1e-5)
        assert row["epsilon"] == pytest.approx(want, rel=1e-9)
        assert row["metrics"]["dp_noise_std"] == pytest.approx(SIGMA * CLIP / 3)
    assert strategy.epsilon(1e-5, rounds_ahead=1) == math.inf  # past the plan
    with pytest.raises(PrivacyError, match="plan has 8 steps"):
        strategy.configure_fit(9, h.parameters, [ClientProxy(i) for i in range(12)], 3,
                               np.random.default_rng(0))


def test_round_noise_is_sigma_c_w_over_k_from_the_reserved_offsets():
    rounds, P, K = 6, 50, 4
    strategy = DPFTRLFedAvg(FedAvg(), noise_multiplier=SIGMA, clip_norm=CLIP, rounds=rounds,
                            bands=2, seed=9)
    strategy.setup(num_available_clients=40, clients_per_round=K)
    ref = CorrelatedNoise(strategy.correlated.strategy, strategy.correlated.participation)
    params = torch.zeros(P)
    rng = np.random.default_rng(0)
    proxies = [ClientProxy(i) for i in range(40)]
    for r in range(rounds):
        picked = strategy.configure_fit(r + 1, params, proxies, K, rng)
        zero = [(c, FitResult(update=torch.zeros(P), num_examples=5, metrics={})) for c, _ in picked]
        start = strategy.offset
        new, _ = strategy.aggregate_fit(r + 1, params, zero, [])
        w = ref.draw([torch.zeros(P)], seed=9, offset=start, secure=False)[0]
        ref.commit(1.0)
        torch.testing.assert_close(new - params, w * SIGMA * CLIP / K, rtol=1e-6, atol=1e-7)
        params = new


def test_state_round_trip_never_holds_noise_and_resumes_a_new_segment():
    strategy = DPFTRLFedAvg(FedAvg(), noise_multiplier=SIGMA, clip_norm=CLIP, rounds=6, bands=2)
    strategy.setup(num_available_clients=8, clients_per_round=2)
    rng = np.random.default_rng(0)
    proxies = [ClientProxy(i) for i in range(8)]
    params = torch.zeros(10)
    for r in range(3):
        picked = strategy.configure_fit(r + 1, params, proxies, 2, rng)
        res = [(c, FitResult(update=torch.ones(10), num_examples=1, metrics={})) for c, _ in picked]
        params, _ = strategy.aggregate_fit(r + 1, params, res, [])
    state = strategy.state_dict()
    assert state["seed"] is None  # an OS key never leaves the process

    def tensors(o):
        return isinstance(o, torch.Tensor) or (isinstance(o, dict) and any(tensors(v) for v in o.values())) \
            or (isinstance(o, list) and any(tensors(v) for v in o))

    assert not tensors(state)
    other = DPFTRLFedAvg(FedAvg(), noise_multiplier=SIGMA, clip_norm=CLIP, rounds=6, bands=2)
    other.load_state_dict(state)
    assert other.rounds == 3 and other.correlated.segment_start == 3
    assert other.eligible(proxies) == strategy.eligible(proxies)
    assert other.epsilon(1e-5) == pytest.approx(strategy.epsilon(1e-5), rel=1e-12)
    assert other.seed != strategy.seed and other.reproducible_noise is None  # re-keyed
    seeded = DPFTRLFedAvg(FedAvg(), noise_multiplier=SIGMA, clip_norm=CLIP, rounds=6, bands=2, seed=4)
    seeded.load_state_dict(dict(state, seed=4, seed_given=True))
    assert seeded.seed != 4  # a seeded state too: its next offsets may have been used after the save
    with pytest.raises(ValueError, match="another noise plan"):
        DPFTRLFedAvg(FedAvg(), noise_multiplier=SIGMA, clip_norm=CLIP, rounds=7, bands=2).load_state_dict(state)


def test_arguments_refused():
    with pytest.raises(ValueError, match="needs bands="):
        DPFTRLFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, rounds=4)
    with pytest.raises(ValueError, match="bands <= min_separation"):
        DPFTRLFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, rounds=8, bands=4, min_separation=2)
    with pytest.raises(ValueError, match="mechanism must be one of"):
        DPFTRLFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, rounds=4, mechanism="gaussian")
    with pytest.raises(ValueError, match="rounds must be an int"):
        DPFTRLFedAvg(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, rounds=0, bands=1)


def test_max_participations_caps_the_picks_and_empty_rounds_still_release_noise():
    strategy = DPFTRLFedAvg(FedAvg(), noise_multiplier=SIGMA, clip_norm=CLIP, rounds=6,
                            mechanism="tree", max_participations=1)
    strategy.setup(num_available_clients=8, clients_per_round=2)
    rng = np.random.default_rng(0)
    proxies = [ClientProxy(i) for i in range(8)]
    params, seen = torch.zeros(5), []
    for r in range(6):
        picked = strategy.configure_fit(r + 1, params, proxies, 2, rng)
        seen += [c.cid for c, _ in picked]
        res = [(c, FitResult(update=torch.ones(5), num_examples=1, metrics={})) for c, _ in picked]
        new, _ = strategy.aggregate_fit(r + 1, params, res, [])
        assert not torch.equal(new, params)  # noise even when nobody was eligible
        params = new
    assert sorted(seen) == list(range(8))  # each client once, rounds 5 and 6 empty
    part = mf.Participation("min_separated", min_separation=1, max_participations=1)
    S = mf.tree(6).sensitivity_sq_prefix(5, part)
    want = PLDAccountant().compose(GaussianEvent(SIGMA / math.sqrt(S))).get_epsilon(1e-5)
    assert strategy.epsilon(1e-5) == pytest.approx(want, rel=1e-2)

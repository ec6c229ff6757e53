"""Issue 15, items 1 and 2 in federated learning. run_simulation(seed=0) with
DPFedAvgFixed / DPFedAvgAdaptive(seed=None) keyed the server's noise from the simulation seed,
so two runs on neighbouring data drew the same noise and an outsider recovered the exact clipped
sum; LocalDP's non-secure noise was keyed from the server's per-client seed. Now noise keys
come from OS entropy unless a noise seed is given, and then the History says so. In secure mode
clients are sampled from the OS CSPRNG, and a seed is an error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppml_fast.federated import (
    Client,
    DPFedAvgAdaptive,
    DPFedAvgFixed,
    FedAvg,
    LocalDP,
    run_simulation,
)
from ppml_fast.federated.types import ClientProxy, FitResult
from ppml_fast.noise_keys import REPRODUCIBLE_NOISE

from ._sim_helpers import make_clients, tiny_model


def _fixed(seed=None):
    return DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.5, seed=seed)


def _adaptive(seed=None):
    return DPFedAvgAdaptive(FedAvg(), noise_multiplier=1.0, clipped_count_stddev=2.0, seed=seed)


def _run(strategy, clients=None, **kw):
    clients = clients if clients is not None else make_clients(6, 60)
    return run_simulation(tiny_model, clients, strategy, rounds=2, clients_per_round=3, seed=0,
                          progress=False, **kw)


@pytest.mark.parametrize("make", [_fixed, _adaptive], ids=["fixed", "adaptive"])
def test_server_noise_is_not_keyed_from_the_simulation_seed(make):
    a, b = _run(make()), _run(make())
    # same seed: same clients sampled each round (sampling stays seeded) ...
    assert [r["clients"] for r in a.rounds] == [r["clients"] for r in b.rounds]
    # ... but fresh noise: the old code gave identical parameters (noise keyed from seed=0)
    assert not torch.equal(a.parameters, b.parameters)
    assert a.notes == [] and a.to_dict()["notes"] == []


@pytest.mark.parametrize("make", [_fixed, _adaptive], ids=["fixed", "adaptive"])
def test_a_user_noise_seed_is_reproducible_and_says_so(make):
    a, b = _run(make(seed=11)), _run(make(seed=11))
    assert torch.equal(a.parameters, b.parameters)
    assert a.notes == [REPRODUCIBLE_NOISE]
    assert REPRODUCIBLE_NOISE in a.to_json()


def test_an_outsider_cannot_subtract_the_noise_of_neighbouring_runs():
    # the measured attack: two runs on neighbouring data (one client's data changed) with the
    # same simulation seed; with noise keyed from the seed, the difference of the released
    # sums was the exact difference of the clipped sums (error 6.5e-8 vs a noise norm of 1.93)
    def released(clients):
        strategy = _fixed()
        out = []
        orig = strategy.release_sum

        def spy(server_round, parameters, total, norms, failures):
            pre = total.clone()
            res = orig(server_round, parameters, total, norms, failures)
            out.append((pre, total.clone() * strategy.expected_clients))
            return res

        strategy.release_sum = spy
        _run(strategy, clients)
        return out

    base = make_clients(6, 60)
    neighbour = make_clients(6, 60)
    x0, y0 = neighbour[0]._x, neighbour[0]._y
    neighbour[0] = Client(torch.utils.data.TensorDataset(x0[:-1], y0[:-1]))  # one record removed
    r1, r2 = released(base), released(neighbour)
    for (pre1, noisy1), (pre2, noisy2) in zip(r1, r2):
        recovered = (noisy1 - noisy2) - (pre1 - pre2)  # noise1 - noise2
        assert float(recovered.norm()) > 0.5, "the two runs drew the same noise"


def test_local_dp_noise_is_not_keyed_from_the_servers_seed():
    clients = make_clients(3, 30)
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    a = _run(FedAvg(), clients=clients, local_dp=dp)
    b = _run(FedAvg(), clients=make_clients(3, 30), local_dp=dp)
    assert not torch.equal(a.parameters, b.parameters)  # equal before: keyed by config["seed"]
    assert a.notes == []
    seeded = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, noise_seed=4)
    c = _run(FedAvg(), clients=make_clients(3, 30), local_dp=seeded)
    d = _run(FedAvg(), clients=make_clients(3, 30), local_dp=seeded)
    assert torch.equal(c.parameters, d.parameters)
    assert c.notes == [REPRODUCIBLE_NOISE]


def test_seeds_with_secure_mode_are_errors():
    with pytest.raises(ValueError, match="secure mode"):
        DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, secure_mode=True, seed=3)
    with pytest.raises(ValueError, match="secure mode"):
        DPFedAvgAdaptive(FedAvg(), noise_multiplier=1.0, secure_mode=True, seed=3)
    with pytest.raises(ValueError, match="secure mode"):
        LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, secure_mode=True, noise_seed=3)
    # and without a seed secure mode runs
    DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, secure_mode=True)


def test_secure_client_sampling_does_not_follow_the_simulation_rng():
    proxies = [ClientProxy(i) for i in range(200)]
    params = torch.zeros(4)
    picks = []
    for secure in (False, False, True, True):
        s = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, secure_mode=secure)
        out = s.configure_fit(1, params, proxies, 100, np.random.default_rng([0, 1, 0]))
        picks.append(sorted(c.cid for c, _ in out))
    assert picks[0] == picks[1]  # seeded sampling (simulation) is reproducible
    assert picks[2] != picks[3]  # secure: 2^-200 chance of equality; before, both were picks[0]
    assert picks[2] != picks[0]


def test_state_round_trip_keeps_the_key_kind():
    s = _fixed()
    s2 = _fixed(seed=5)
    assert s.state_dict()["seed"] is None  # an OS-drawn key never leaves the process
    for src in (s, s2):
        dst = _fixed()
        dst.load_state_dict(src.state_dict())  # re-keyed (test_dp_fedavg_resume.py)
        assert dst.seed != src.seed and dst.reproducible_noise == src.reproducible_noise
    dst = _fixed()
    dst.load_state_dict(s2.state_dict(), continue_noise=True)
    assert (dst.seed, dst.offset, dst.reproducible_noise) == (s2.seed, s2.offset, s2.reproducible_noise)
    old = s2.state_dict()
    del old["seed_given"]  # a state from before: its seed may be the simulation's
    dst = _fixed()
    dst.load_state_dict(old)
    assert dst.reproducible_noise == REPRODUCIBLE_NOISE


def test_release_reserves_offsets_from_its_stream():
    s = _fixed(seed=2)
    s.setup(num_available_clients=4, clients_per_round=2)
    s.configure_fit(1, torch.zeros(6), [ClientProxy(i) for i in range(4)], 2,
                    np.random.default_rng(0))
    res = [(ClientProxy(0), FitResult(update=torch.ones(6), num_examples=1, metrics={}))]
    s.aggregate_fit(1, torch.zeros(6), res, [])
    assert s.offset == 3  # 6 elements, 3 Philox blocks


def test_secure_aggregation_refuses_a_seed_with_secure_dp_and_notes_seeded_masks():
    from ppml_fast.federated.secagg import SecAggFedAvg

    secure = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, secure_mode=True)
    with pytest.raises(ValueError, match="secure-mode"):
        SecAggFedAvg(secure, seed=3)
    SecAggFedAvg(DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, secure_mode=True))
    inner = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)
    h = run_simulation(tiny_model, make_clients(4, 40), SecAggFedAvg(inner, seed=3), rounds=1,
                       clients_per_round=4, seed=0, progress=False)  # q = 1: all four sampled
    assert len(h.notes) == 1 and "masks" in h.notes[0]

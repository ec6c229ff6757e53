"""DP end to end through ``run_simulation`` on digits: user-level ε per round from
DPFedAvgFixed and the stop at max_epsilon; local DP-SGD clients that report ε and refuse
past their budget ("budget" in the History)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent
from ppml_fast.datasets import digits
from ppml_fast.federated import Client, DPFedAvgFixed, FedAvg, LocalDP, iid_partition, run_simulation
from ppml_fast.federated.dp.local import local_dp_steps

pytest.importorskip("sklearn")


def _model():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def data():
    train, test = digits(seed=0)
    return iid_partition(train, 40, seed=0), test


@pytest.mark.parametrize("given_rate", [True, False], ids=["sampling_rate", "from_setup"])
def test_dp_fedavg_reports_epsilon_per_round_and_stops_at_max_epsilon(data, given_rate):
    # without sampling_rate, the simulation's Strategy.setup tells the wrapper q before round 1
    parts, test = data
    clients = [Client(p, cid=i) for i, p in enumerate(parts)]
    sigma, q, delta = 2.0, 10 / 40, 1e-5  # 10 expected clients per round of 40
    # the default accountant, PLD (issue 17 item 3; it was RDP)
    eps = [PLDAccountant().compose(PoissonSampledEvent(q, GaussianEvent(sigma)), r).get_epsilon(delta)
           for r in range(1, 4)]
    runs = []
    for _ in range(2):
        strategy = DPFedAvgFixed(FedAvg(), noise_multiplier=sigma, clip_norm=0.5,
                                 sampling_rate=q if given_rate else None, seed=12)
        runs.append(run_simulation(
            _model, clients, strategy, rounds=10, clients_per_round=10, lr=0.1, batch_size=16,
            seed=3, max_epsilon=(eps[1] + eps[2]) / 2, delta=delta, eval_dataset=test,
            progress=False))  # min_clients: the wrapper's min_fit_clients = 0
    h = runs[0]
    assert h.stopped == "max_epsilon" and len(h.rounds) == 2
    for r, row in enumerate(h.rounds):
        assert row["epsilon"] == pytest.approx(eps[r], rel=1e-12)
        assert row["metrics"]["dp_noise_std"] == pytest.approx(sigma * 0.5 / 10)
        assert 0.0 <= row["accuracy"] <= 1.0
    assert [r["epsilon"] for r in runs[1].rounds] == [r["epsilon"] for r in h.rounds]
    assert torch.equal(runs[1].parameters, h.parameters)  # same noise seed, same noise, same model


def test_local_dp_clients_report_epsilon_and_refuse_past_their_budget(data):
    parts, test = data
    clients = [Client(p, cid=i) for i, p in enumerate(parts[:4])]
    n = clients[0].num_examples
    q, steps = local_dp_steps(n, 16, 1)
    event = PoissonSampledEvent(q, GaussianEvent(1.0))
    # the default accountant, PLD (issue 17 item 3; it was RDP)
    e1, e2, e3 = (PLDAccountant().compose(event, k * steps).get_epsilon(1e-5) for k in (1, 2, 3))
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, max_epsilon=(e2 + e3) / 2)
    h = run_simulation(_model, clients, FedAvg(), rounds=3, clients_per_round=4, lr=0.1, batch_size=16,
                       seed=1, local_dp=dp, eval_dataset=test, progress=False)
    assert {local_dp_steps(c.num_examples, 16, 1) for c in clients} == {(q, steps)}
    assert h.rounds[0]["epsilon"] == pytest.approx(e1, rel=1e-9)
    assert h.rounds[1]["epsilon"] == pytest.approx(e2, rel=1e-9)
    third = h.rounds[2]
    assert third["skipped"] and {d["reason"] for d in third["dropped"]} == {"budget"}
    assert len(third["dropped"]) == 4


def test_setup_rejects_a_sampling_rate_that_disagrees(data):
    parts, _ = data
    strategy = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.5, sampling_rate=0.5)
    with pytest.raises(ValueError, match="sampling_rate"):
        strategy.setup(num_available_clients=40, clients_per_round=10)
    assert strategy.sampling_rate == 0.5


def test_min_clients_is_refused_with_a_dp_strategy(data):
    parts, _ = data
    clients = [Client(p, cid=i) for i, p in enumerate(parts)]
    strategy = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.5)
    with pytest.raises(ValueError, match="min_clients"):
        run_simulation(_model, clients, strategy, rounds=2, clients_per_round=10, min_clients=3,
                       progress=False)


def test_secure_local_dp_is_not_reproducible_from_the_servers_seed(data):
    # secure_mode: the device's own entropy for noise and batches, so the same seed gives a
    # different model (the server cannot regenerate the noise); same epsilon
    parts, _ = data
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, secure_mode=True)
    runs = [run_simulation(_model, [Client(p, cid=i) for i, p in enumerate(parts[:4])], FedAvg(),
                           rounds=1, clients_per_round=4, local_dp=dp, seed=5, progress=False)
            for _ in range(2)]
    assert not torch.equal(runs[0].parameters, runs[1].parameters)
    assert runs[0].rounds[0]["epsilon"] == runs[1].rounds[0]["epsilon"] > 0

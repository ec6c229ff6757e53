"""Robust aggregation that reports what it did (issue 18 item 6, in the round loop): one client
sending 3e38 no longer turns the global model into inf (the round fails with a reason, the
parameters stay); the clients a robust strategy left out are in the History."""

from __future__ import annotations

import json

import pytest
import torch

from ppml_fast.federated import (Bulyan, Client, FaultTolerantFedAvg, FedAvg, FitResult, Krum,
                                 ParameterLayout, Simulation, run_simulation)

from ._sim_helpers import RaisingClient, make_clients, tiny_model


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


def _data(c):
    return torch.utils.data.TensorDataset(c._x, c._y)


class Huge(Client):
    """A finite update (it passes the per-client check) that overflows any mean: 3e38 everywhere."""

    def fit(self, parameters, config):
        res = super().fit(parameters, config)
        return FitResult(torch.full_like(res.update, 3e38), res.num_examples, res.metrics)


def _p0():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny_model()
    return ParameterLayout.of(model).flatten(model)


def _run(clients, strategy, **kw):
    kw = {"rounds": 2, "clients_per_round": len(clients), "lr": 0.2, "batch_size": 8, "progress": False, **kw}
    return run_simulation(tiny_model, clients, strategy, **kw)


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_a_non_finite_aggregate_fails_the_round_and_keeps_the_model(backend):
    # round 1: the mean of 3e38 and three small updates is finite (and absurd); round 2: the
    # others' training from it overflows (their updates are dropped as non-finite), the huge
    # client's 3e38 on top of 7.5e37-scale parameters is inf: that round fails, the model stays
    base = make_clients(4)
    clients = [Huge(_data(base[0]))] + base[1:]
    with Simulation(tiny_model, clients, FedAvg(), rounds=3, clients_per_round=4, lr=0.2, batch_size=8,
                    progress=False, backend=backend) as sim:
        first = sim.step()
        after_first = sim.parameters.clone()
        assert first["skipped"] is False and torch.isfinite(after_first).all()
        for _ in range(2):
            row = sim.step()
            assert row["skipped"] is True and row["skip_reason"].startswith("non-finite aggregate")
            assert torch.equal(sim.parameters, after_first)
    assert torch.equal(sim.history.parameters, after_first)
    assert json.loads(sim.history.to_json())["rounds"][1]["skipped"] is True


def test_krum_and_bulyan_exclusions_in_the_history():
    base = make_clients(8)
    clients = [Huge(_data(base[0]))] + base[1:]
    h = _run(clients, Krum(num_malicious_clients=1), rounds=1)
    row = h.rounds[0]
    assert row["skipped"] is False and torch.isfinite(h.parameters).all()
    assert len(row["excluded"]) == 7 and 0 in {e["cid"] for e in row["excluded"]}
    base = make_clients(7)
    h = _run([Huge(_data(base[0]))] + base[1:], Bulyan(num_malicious_clients=1), rounds=1)
    row = h.rounds[0]
    left = {e["cid"] for e in row["excluded"] if e["rule"] == "bulyan_selection"}
    assert 0 in left and len(left) == 2 and torch.isfinite(h.parameters).all()


def test_fault_tolerant_declines_a_round_with_too_many_failures():
    base = make_clients(4)
    clients = [RaisingClient(_data(c)) for c in base[:3]] + base[3:]
    h = _run(clients, FaultTolerantFedAvg(), rounds=1)
    row = h.rounds[0]
    assert row["skipped"] is True and "completion rate 0.25" in row["skip_reason"]
    assert torch.equal(h.parameters, _p0())
    h = _run(clients, FaultTolerantFedAvg(min_completion_rate_fit=0.25), rounds=1)
    assert h.rounds[0]["skipped"] is False and not torch.equal(h.parameters, _p0())

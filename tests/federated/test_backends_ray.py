"""The Ray backend on a local 2-CPU Ray (one simulation: each one starts its actors, and an
actor's start imports torch): the same History as the sequential backend, a client's failure
reported from its worker, and client state (a local-DP accountant) kept on the workers across
rounds."""

from __future__ import annotations

import pytest
import torch

from ppml_fast.federated import FedAvg, RayBackend, run_simulation

from ._sim_helpers import RaisingClient, make_clients, tiny_model

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _clients():
    clients = make_clients(6)  # fresh ones per run: local DP keeps state in the client
    clients[2] = RaisingClient(torch.utils.data.TensorDataset(clients[2]._x, clients[2]._y))
    return clients


def test_ray_equals_sequential_with_faults_and_client_state():
    from ppml_fast.federated.dp import local
    dp = local.LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    kw = dict(rounds=3, clients_per_round=5, lr=0.2, batch_size=8, dropout=0.2, seed=1, local_dp=dp,
              progress=False)
    seq = run_simulation(tiny_model, _clients(), FedAvg(), backend="sequential", **kw)
    backend = RayBackend(num_workers=2)
    ray_clients = _clients()
    par = run_simulation(tiny_model, ray_clients, FedAvg(), backend=backend, **kw)
    torch.testing.assert_close(par.parameters, seq.parameters, rtol=1e-6, atol=1e-7)
    assert len(par.rounds) == len(seq.rounds) == 3
    for a, b in zip(par.rounds, seq.rounds):
        assert (a["clients"], a["dropped"]) == (b["clients"], b["dropped"])
        assert a["epsilon"] == pytest.approx(b["epsilon"])
    eps = [r["epsilon"] for r in par.rounds]
    assert 0 < eps[0] < eps[1] < eps[2]  # the clients' accountants persist on their workers
    assert "RuntimeError: boom" in {d["reason"] for r in par.rounds for d in r["dropped"]}
    assert par.settings["backend"] == "ray" and backend._workers == [] and ray.is_initialized()
    # the workers' local-DP state came back to the driver's clients: a second run composes on it
    spent = [c._local_dp.epsilon(1e-5) for c in ray_clients if getattr(c, "_local_dp", None)]
    assert spent and max(spent) == pytest.approx(eps[-1])

"""The Ray backend on a local 2-CPU Ray (one simulation: each one starts its actors, and an
actor's start imports torch): the same History as the sequential backend, a client's failure
reported from its worker, and client state (a local-DP accountant) kept on the workers across
rounds; a local-DP client that fails mid-fit reports its spend from its worker, and a worker that
dies leaves a conservative bound on its clients' spend."""

from __future__ import annotations

import math

import pytest
import torch

from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent, RDPAccountant
from ppml_fast.federated import FedAvg, LocalDP, ParameterLayout, RayBackend, run_simulation
from ppml_fast.federated.dp.local import local_dp_steps

from ._sim_helpers import FailsAfterSteps, RaisingClient, make_clients, tiny_model

ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def local_ray(ray_cluster):
    """The session's local Ray (tests/conftest.py), started once."""
    yield ray_cluster


def _clients():
    clients = make_clients(6)  # fresh ones per run: local DP keeps state in the client
    clients[2] = RaisingClient(torch.utils.data.TensorDataset(clients[2]._x, clients[2]._y))
    return clients


def test_ray_equals_sequential_with_faults_and_client_state():
    from ppml_fast.federated.dp import local
    # noise_seed: without it each fit's noise key comes from OS entropy (DESIGN.md, privacy
    # invariant 3) and no two runs can match; with it, key = SHA-256(noise_seed, config seed)
    dp = local.LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, noise_seed=7)
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


def test_ray_reports_a_failed_clients_spend_and_bounds_a_dead_workers():
    def eps(q, steps):
        return RDPAccountant().compose(PoissonSampledEvent(q, GaussianEvent(1.0)), steps).get_epsilon(1e-5)

    base = make_clients(2)  # 60 examples each
    clients = [FailsAfterSteps(torch.utils.data.TensorDataset(base[0]._x, base[0]._y)), base[1]]
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp")  # as eps()
    model = tiny_model()
    params = ParameterLayout.of(model).flatten(model)
    q, steps = local_dp_steps(60, 8, 1)

    def cfgs(seed):
        return [{"seed": seed + i, "batch_size": 8, "lr": 0.2, "local_dp": dp} for i in range(2)]

    backend = RayBackend(num_workers=1)
    backend.setup(clients, tiny_model)
    try:
        out = backend.fit([0, 1], params, cfgs(1))
        # client 0 raised after 2 full-batch steps: its worker reports them, the driver keeps them
        assert "device lost at step 3" in str(out[0].error)
        assert out[0].epsilon == pytest.approx(eps(1.0, 2), rel=1e-12)
        assert clients[0].local_epsilon(1e-5) == pytest.approx(eps(1.0, 2), rel=1e-12)
        assert out[1].epsilon is None and out[1].result.metrics["epsilon"] == pytest.approx(eps(q, steps))
        ray.kill(backend._workers[0])
        out = backend.fit([0, 1], params, cfgs(3))
        # the worker died mid-round: each of its clients is recorded with its whole fit composed;
        # client 0 trains its own way (it overrides fit), so its spend is unknown: inf
        assert all(isinstance(o.error, ray.exceptions.RayActorError) for o in out)
        assert out[0].epsilon == math.inf
        assert out[1].epsilon == pytest.approx(eps(q, 2 * steps), rel=1e-12)
        assert clients[1].local_epsilon(1e-5) == pytest.approx(eps(q, 2 * steps), rel=1e-12)
        out = backend.fit([0, 1], params, cfgs(5))
        # later rounds send nothing to the dead worker: nothing trained, nothing more recorded
        assert all("died in an earlier round" in str(o.error) and o.epsilon is None for o in out)
        assert clients[1].local_epsilon(1e-5) == pytest.approx(eps(q, 2 * steps), rel=1e-12)
    finally:
        backend.close()

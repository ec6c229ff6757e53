"""Our strategies against Flower 1.42's own strategy objects: Flower aggregates the clients'
full parameters ``w + u_k`` (as ``FitRes``), ours the updates ``u_k`` and ``w``; the new global
parameters must agree, round after round for the stateful ones. Skipped without flwr."""

from __future__ import annotations

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server import strategy as fl  # noqa: E402

from ppml_fast.federated import (ClientProxy, FedAdagrad, FedAdam, FedAvgM, FedMedian,  # noqa: E402
                                 FedProx, FedTrimmedAvg, FedYogi, FitResult, Krum)

SPLIT = (6, 13)  # Flower sees three "layers": w[:6], w[6:13], w[13:]


def _layers(v: np.ndarray) -> list:
    return [a.copy() for a in np.split(v.astype(np.float32), SPLIT)]


def _flower_round(strategy, w: np.ndarray, u: np.ndarray, n, server_round: int) -> np.ndarray:
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(_layers(w + u[k])), int(n[k]), {}))
               for k in range(len(u))]
    params, _ = strategy.aggregate_fit(server_round, results, [])
    return np.concatenate(parameters_to_ndarrays(params))


def _ours_round(strategy, w: np.ndarray, u: np.ndarray, n, server_round: int) -> np.ndarray:
    results = [(ClientProxy(k), FitResult(update=torch.from_numpy(u[k]), num_examples=int(n[k])))
               for k in range(len(u))]
    new, _ = strategy.aggregate_fit(server_round, torch.from_numpy(w), results, [])
    return new.numpy()


def _compare(ours, make_theirs, k=8, p=20, rounds=3, seed=0, rtol=1e-5, atol=1e-5):
    """``make_theirs(initial_parameters)`` builds the Flower strategy: the stateful ones keep
    the global model (FedAvgM in ``initial_parameters``, FedOpt in ``current_weights``) and
    must start from our starting point."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 40, size=k)
    w = rng.normal(size=p).astype(np.float32)
    theirs = make_theirs(ndarrays_to_parameters(_layers(w)))
    for t in range(1, rounds + 1):
        u = rng.normal(scale=0.3, size=(k, p)).astype(np.float32)
        a = _ours_round(ours, w, u, n, t)
        b = _flower_round(theirs, w, u, n, t)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"round {t}")
        w = a  # both continue from the same global parameters


def test_fedavgm_matches_flower():
    _compare(FedAvgM(server_learning_rate=0.8, server_momentum=0.9),
             lambda i: fl.FedAvgM(initial_parameters=i, server_learning_rate=0.8, server_momentum=0.9))


@pytest.mark.parametrize("ours,theirs", [
    (lambda: FedAdam(), lambda i: fl.FedAdam(initial_parameters=i)),
    (lambda: FedAdam(eta=0.05, beta_1=0.5, beta_2=0.9, tau=1e-3),
     lambda i: fl.FedAdam(initial_parameters=i, eta=0.05, beta_1=0.5, beta_2=0.9, tau=1e-3)),
    (lambda: FedYogi(), lambda i: fl.FedYogi(initial_parameters=i)),
    (lambda: FedAdagrad(), lambda i: fl.FedAdagrad(initial_parameters=i)),
    (lambda: FedAdagrad(eta=0.3, tau=0.01), lambda i: fl.FedAdagrad(initial_parameters=i, eta=0.3, tau=0.01)),
])
def test_fedopt_family_matches_flower(ours, theirs):
    _compare(ours(), theirs, rounds=4)


@pytest.mark.parametrize("k", [7, 8])
def test_fedmedian_matches_flower(k):
    _compare(FedMedian(), lambda i: fl.FedMedian(), k=k, rounds=1)


@pytest.mark.parametrize("k,beta", [(10, 0.2), (9, 0.3), (4, 0.0)])
def test_fedtrimmedavg_matches_flower(k, beta):
    _compare(FedTrimmedAvg(beta=beta), lambda i: fl.FedTrimmedAvg(beta=beta), k=k, rounds=1)


@pytest.mark.parametrize("k,f,m", [(9, 2, 0), (9, 3, 0), (10, 2, 5), (7, 1, 7)])
def test_krum_matches_flower(k, f, m):
    _compare(Krum(num_malicious_clients=f, num_clients_to_keep=m),
             lambda i: fl.Krum(num_malicious_clients=f, num_clients_to_keep=m), k=k, rounds=2, seed=k + f + m)


def test_fedprox_matches_flower_aggregation_and_config():
    _compare(FedProx(proximal_mu=0.3), lambda i: fl.FedProx(proximal_mu=0.3), rounds=1)
    pairs = FedProx(proximal_mu=0.3).configure_fit(1, torch.zeros(2), [ClientProxy(0)], 1,
                                                   np.random.default_rng(0))
    assert pairs[0][1]["proximal_mu"] == fl.FedProx(proximal_mu=0.3).proximal_mu

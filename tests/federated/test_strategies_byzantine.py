"""Byzantine clients (Blanchard et al. 2017; Yin et al. 2018): a few clients send scaled (x100)
or sign-flipped updates. The robust strategies stay close to the honest clients' mean; FedAvg
is dragged away by an amount the attack fixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppml_fast.federated import ClientProxy, FedAvg, FedMedian, FedTrimmedAvg, FitResult, Krum

K, F, P = 20, 3, 50
SIGMA = 0.1  # honest spread per coordinate, against a mean with unit-scale coordinates


def _round(attack: str):
    rng = np.random.default_rng(11)
    mu = rng.normal(size=P)
    honest = (mu + SIGMA * rng.normal(size=(K, P))).astype(np.float32)
    sent = honest.copy()
    bad = rng.choice(K, size=F, replace=False)
    sent[bad] = 100.0 * honest[bad] if attack == "scale" else -honest[bad]
    good = np.setdiff1d(np.arange(K), bad)
    results = [(ClientProxy(k), FitResult(update=torch.from_numpy(sent[k]), num_examples=30))
               for k in range(K)]
    return results, honest[good], honest[good].astype(np.float64).mean(0)


def _rel_err(strategy, results, target):
    w, _ = strategy.aggregate_fit(1, torch.zeros(P), results, [])
    return float(np.linalg.norm(w.numpy() - target) / np.linalg.norm(target)), w.numpy()


@pytest.mark.parametrize("attack", ["scale", "sign"])
def test_robust_strategies_resist_byzantine_clients(attack):
    results, honest, target = _round(attack)
    # FedAvg: the mean moves by F/K * (100 - 1) (scale) or F/K * 2 (sign) times the attackers'
    # mean honest update, i.e. ~15 or ~0.3 relative
    fedavg, _ = _rel_err(FedAvg(), results, target)
    assert fedavg > (5.0 if attack == "scale" else 0.2)
    # order statistics: F < K/2 outliers shift each coordinate by a few honest quantiles,
    # O(SIGMA / |mu_i|) ~ 0.1 relative at most
    for strategy in (FedMedian(), FedTrimmedAvg(beta=0.2)):
        err, _ = _rel_err(strategy, results, target)
        assert err < 0.1, (type(strategy).__name__, err)
    # Krum picks one honest update (within SIGMA * sqrt(P) of the mean, ~0.1 relative)
    err, w = _rel_err(Krum(num_malicious_clients=F), results, target)
    assert any(np.array_equal(w, h) for h in honest) and err < 0.2
    # Multi-Krum keeping K - F averages exactly the honest updates
    err, _ = _rel_err(Krum(num_malicious_clients=F, num_clients_to_keep=K - F), results, target)
    assert err < 1e-6

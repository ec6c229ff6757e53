"""FedAvg with full participation, one full-batch local step and equal client data is one
step of centralised SGD on the union of the clients' data (McMahan et al. 2017, section 2:
FedSGD), through real ``Client.fit`` calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ppml_fast.federated import Client, ClientProxy, FedAvg, ParameterLayout, iid_partition


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _union(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _fedavg_round(clients, sizes_equal_batch, lr=0.2):
    model = _model()
    layout = ParameterLayout.of(model)
    w0 = layout.flatten(model)
    strategy = FedAvg()
    proxies = [ClientProxy(i) for i in range(len(clients))]
    pairs = strategy.configure_fit(1, w0, proxies, len(proxies), np.random.default_rng(0))
    assert [p.cid for p, _ in pairs] == list(range(len(clients)))  # full participation
    results = []
    for proxy, extra in pairs:
        c = clients[proxy.cid]
        cfg = {"model": model, "seed": 5, "lr": lr, "local_epochs": 1,
               "batch_size": c.num_examples if sizes_equal_batch else 10 ** 6, **extra}
        results.append((proxy, c.fit(w0, cfg)))
    w1, _ = strategy.aggregate_fit(1, w0, results, [])
    return w0, w1, layout


def _centralised_step(dataset, w0, layout, lr=0.2):
    model = _model()
    layout.load(model, w0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = dataset.tensors
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return layout.flatten(model)


def test_fedavg_one_step_full_participation_equals_centralised_sgd():
    union = _union()
    parts = iid_partition(union, 4, seed=1)
    assert {len(p) for p in parts} == {12}  # equal data
    clients = [Client(p, cid=i) for i, p in enumerate(parts)]
    w0, w1, layout = _fedavg_round(clients, True)
    central = _centralised_step(union, w0, layout)
    torch.testing.assert_close(w1, central, rtol=1e-5, atol=1e-6)
    assert float((w1 - w0).norm()) > 1e-2  # a real step was taken


@pytest.mark.parametrize("sizes", [(5, 11, 20, 12)])
def test_weighting_by_examples_keeps_the_equivalence_with_unequal_data(sizes):
    """With unequal sizes the example-weighted mean of per-client mean gradients is still the
    union's mean gradient; an unweighted mean would not be."""
    union = _union(sum(sizes))
    bounds = np.cumsum((0,) + sizes)
    x, y = union.tensors
    clients = [Client(TensorDataset(x[a:b], y[a:b]), cid=i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    w0, w1, layout = _fedavg_round(clients, False)
    central = _centralised_step(union, w0, layout)
    torch.testing.assert_close(w1, central, rtol=1e-5, atol=1e-6)

"""Client, ParameterLayout and the result types: local SGD against a hand-written float64 loop,
the layout round trip, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from ppml_fast.federated import Client, ClientProxy, EvalResult, FitResult, ParameterLayout
from ppml_fast.federated.client import fit_settings


def _data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_layout_round_trip_and_views():
    m = _model()
    layout = ParameterLayout.of(m)
    flat = layout.flatten(m)
    assert flat.shape == (layout.numel,) and layout.numel == 5 * 4 + 4 + 4 * 3 + 3
    m2 = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    layout.load(m2, flat)
    assert torch.equal(layout.flatten(m2), flat)
    views = layout.unflatten(flat)
    assert views["0.weight"].shape == (4, 5) and views["0.weight"].data_ptr() == flat.data_ptr()


def test_layout_includes_float_buffers_only():
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    layout = ParameterLayout.of(m)
    assert "1.running_mean" in layout.names and "1.num_batches_tracked" not in layout.names
    assert layout.trainable[layout.names.index("1.running_mean")] is False


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_fit_is_local_sgd(mu):
    ds = _data()
    client = Client(Subset(ds, list(range(3, 20))), cid=4)
    m = _model()
    layout = ParameterLayout.of(m)
    w0 = layout.flatten(m)
    cfg = {"model": m, "seed": 7, "lr": 0.1, "batch_size": 5, "local_epochs": 2, "proximal_mu": mu}
    res = client.fit(w0, cfg)
    assert res.num_examples == 17 and "loss" in res.metrics

    # reference: the documented loop in float64
    x, y = ds.tensors[0][3:20].double(), ds.tensors[1][3:20]
    ref = _model().double()
    layout.load(ref, w0.double())
    anchors = [p.detach().clone() for p in ref.parameters()]
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        perm = torch.randperm(17, generator=gen)
        for s in range(0, 17, 5):
            idx = perm[s:s + 5]
            loss = nn.functional.cross_entropy(ref(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, list(ref.parameters()))
            with torch.no_grad():
                for p, g, a in zip(ref.parameters(), grads, anchors):
                    p -= 0.1 * (g + mu * (p - a))
    expected = torch.cat([p.detach().reshape(-1) for p in ref.parameters()]) - w0.double()
    torch.testing.assert_close(res.update.double(), expected, rtol=1e-4, atol=1e-5)


def test_evaluate_reports_loss_and_accuracy():
    ds = _data()
    client = Client(ds)
    m = _model()
    w = ParameterLayout.of(m).flatten(m)
    r = client.evaluate(w, {"model": m})
    with torch.no_grad():
        out = m(ds.tensors[0])
    assert r.num_examples == 23
    assert r.loss == pytest.approx(float(nn.functional.cross_entropy(out, ds.tensors[1])), rel=1e-5)
    assert r.metrics["accuracy"] == pytest.approx(float((out.argmax(1) == ds.tensors[1]).float().mean()))


def test_bad_input_names_the_argument():
    m = _model()
    client = Client(_data())
    w = ParameterLayout.of(m).flatten(m)
    with pytest.raises(ValueError, match="seed"):
        client.fit(w, {"model": m})
    with pytest.raises(ValueError, match="lr"):
        client.fit(w, {"model": m, "seed": 0, "lr": -1.0})
    with pytest.raises(TypeError, match="batch_size"):
        fit_settings({"seed": 0, "batch_size": 2.5})
    with pytest.raises(ValueError, match="parameters"):
        client.fit(w[:-1], {"model": m, "seed": 0})
    with pytest.raises(ValueError, match="model"):
        client.fit(w, {"seed": 0})
    with pytest.raises(TypeError, match="dataset"):
        Client([1, 2, 3])
    with pytest.raises(ValueError, match="update"):
        FitResult(torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="num_examples"):
        FitResult(torch.zeros(2), -1)
    with pytest.raises(TypeError, match="metrics"):
        EvalResult(1.0, 2, {"acc": "high"})
    with pytest.raises(ValueError, match="cid"):
        ClientProxy(-1)


def test_results_expose_no_data():
    client = Client(_data())
    m = _model()
    res = client.fit(ParameterLayout.of(m).flatten(m), {"model": m, "seed": 0})
    assert set(vars(res)) == {"update", "num_examples", "metrics"}

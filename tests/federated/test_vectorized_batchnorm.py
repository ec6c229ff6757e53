"""Vectorized backend exactness with BatchNorm(track_running_stats=False) (issue 18 item 5):
the padded rows of the stacked batches do not enter the batch statistics, so each client's
update equals the sequential backend's (the reference) within float rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ppml_fast.datasets import synthetic_classification
from ppml_fast.federated import (Client, FedAvg, ParameterLayout, SequentialBackend, VectorizedBackend,
                                 run_simulation)
from ppml_fast.federated.backends.masked_norm import MaskSlot, MaskedBatchNorm

from ._sim_helpers import FEATURES


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


def mlp_bn():
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(),
                         nn.Linear(8, 3))


def conv_bn():
    return nn.Sequential(nn.Conv2d(1, 3, 2), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


def _fit(backend, clients, configs, model_fn):
    torch.manual_seed(0)
    m = model_fn()
    params = ParameterLayout.of(m).flatten(m)
    backend.setup(clients, model_fn)
    return backend.fit(list(range(len(clients))), params, configs)


SIZES = (5, 8, 11, 14, 20, 26, 33, 40, 3)  # unequal: padded batches; none n % 6 == 1


def _clients(model_fn, sizes=SIZES, seed=3):
    data = synthetic_classification(sum(sizes), features=FEATURES, classes=3, seed=seed)
    x, y = data.tensors
    if model_fn is conv_bn:  # 6 features -> a 1 x 3 x 3 image (zero-padded)
        x = torch.cat([x, torch.zeros(len(x), 3)], 1).view(-1, 1, 3, 3)
    out, start = [], 0
    for n in sizes:
        out.append(Client(TensorDataset(x[start:start + n], y[start:start + n])))
        start += n
    return out


@pytest.mark.parametrize("model_fn", [mlp_bn, conv_bn])
@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_batchnorm_vectorized_equals_sequential(model_fn, chunk_size):
    clients = _clients(model_fn)
    sizes = [c.num_examples for c in clients]
    b = 6
    assert len(set(sizes)) > 2 and not any(n % b == 1 for n in sizes)  # padding, no one-row batch
    configs = [{"seed": 7 * i + 1, "lr": 0.3, "batch_size": b, "local_epochs": 2} for i in range(len(clients))]
    seq = _fit(SequentialBackend(), clients, configs, model_fn)
    vec = _fit(VectorizedBackend(chunk_size=chunk_size), clients, configs, model_fn)
    worst = 0.0
    for s, v in zip(seq, vec):
        assert s.error is None and v.error is None
        worst = max(worst, float((s.result.update - v.result.update).abs().max()))
        assert v.result.metrics["loss"] == pytest.approx(s.result.metrics["loss"], rel=1e-5)
    assert worst < 2e-6, worst  # padded rows in the statistics: about 1e-3


def test_a_client_with_one_row_batches_trains_as_its_own_fit():
    clients = _clients(mlp_bn)
    sizes = [c.num_examples for c in clients]
    b = 7  # 8 and 40 leave one-row batches, the others do not
    configs = [{"seed": i + 1, "lr": 0.3, "batch_size": b} for i in range(len(clients))]
    seq = _fit(SequentialBackend(), clients, configs, mlp_bn)
    vec = _fit(VectorizedBackend(), clients, configs, mlp_bn)
    for n, s, v in zip(sizes, seq, vec):
        if n % b == 1:  # BatchNorm refuses one value per channel in training: both raise alike
            assert s.error is not None and type(v.error) is type(s.error) and str(v.error) == str(s.error)
        else:
            torch.testing.assert_close(v.result.update, s.result.update, rtol=1e-5, atol=2e-6)


def test_masked_batch_norm_against_float64_reference():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    x = torch.randn(7, 4, 3, 5)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    slot = MaskSlot()
    masked = MaskedBatchNorm(bn, slot)
    slot.mask = mask
    got = masked(x)[mask]
    ref = nn.functional.batch_norm(x[mask].double(), None, None, bn.weight.double(), bn.bias.double(),
                                   training=True, eps=bn.eps)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    slot.mask = torch.zeros(7, dtype=torch.bool)  # an all-padded step: finite, no NaN
    assert torch.isfinite(masked(x)).all()


def test_batchnorm_simulation_agrees_across_backends():
    clients = _clients(mlp_bn, sizes=SIZES[:6])
    kw = {"rounds": 2, "clients_per_round": 6, "lr": 0.3, "batch_size": 6, "progress": False}
    a = run_simulation(mlp_bn, clients, FedAvg(), backend="sequential", **kw)
    b = run_simulation(mlp_bn, clients, FedAvg(), backend="vectorized", **kw)
    torch.testing.assert_close(b.parameters, a.parameters, rtol=1e-5, atol=5e-6)

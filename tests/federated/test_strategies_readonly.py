"""Updates are shared, not copied: ``stack_updates`` returns a view when the updates already are
the consecutive rows of one float32 matrix (what the vectorized backend returns for a one-chunk
round) and a copy otherwise; and no strategy writes into the updates it receives or into the
parameters (the Strategy contract), checked for every strategy of the package, the DP wrappers
(whose clipping is the likeliest in-place write) and secure aggregation included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ppml_fast.datasets import synthetic_classification
from ppml_fast.federated import (Client, ClientProxy, DPFedAvgAdaptive, DPFedAvgFixed, FedAdagrad,
                                 FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi,
                                 FitResult, Krum, ParameterLayout, SecAggFedAvg, VectorizedBackend,
                                 quantity_skew_partition)
from ppml_fast.federated.strategy.base import stack_updates

from ._sim_helpers import FEATURES, tiny_model

K, P = 7, 40


def _results(rows) -> list:
    return [(ClientProxy(i), FitResult(update=u, num_examples=3 + i)) for i, u in enumerate(rows)]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ------------------------------------------------------------------ stack_updates


def test_stack_updates_is_a_view_of_one_matrixs_consecutive_rows():
    m = torch.randn(K + 2, P)
    rows = m[1:K + 1].unbind(0)  # rows 1..K of a larger matrix: still consecutive
    stacked = stack_updates(_results(rows))
    assert stacked.shape == (K, P) and stacked.dtype == torch.float32
    assert stacked.data_ptr() == rows[0].data_ptr() and torch.equal(stacked, m[1:K + 1])


@pytest.mark.parametrize("case", ["permuted", "gap", "separate", "float64", "columns", "grad", "negated"])
def test_stack_updates_copies_whatever_is_not_one_matrix_in_order(case):
    m = torch.randn(K + 1, P)
    rows = {
        "permuted": [m[i] for i in [1, 0] + list(range(2, K))],
        "gap": [m[i] for i in [0] + list(range(2, K + 1))],
        "separate": [m[i].clone() for i in range(K)],
        "float64": list(torch.randn(K, P, dtype=torch.float64).unbind(0)),  # one matrix, not float32
        "columns": list(torch.randn(P, K).t().unbind(0)),  # rows with stride K: not contiguous
        "grad": list(torch.randn(K, P, requires_grad=True).unbind(0)),
        # one lazily negated row among consecutive rows: its memory holds minus its values
        "negated": [torch._neg_view(m[i]) if i == 2 else m[i] for i in range(K)],
    }[case]
    stacked = stack_updates(_results(rows))
    assert stacked.shape == (K, P) and stacked.dtype == torch.float32
    assert not _shares_memory(stacked, rows[0])
    torch.testing.assert_close(stacked, torch.stack([r.detach().float() for r in rows]), rtol=0, atol=0)


def test_vectorized_one_chunk_round_hands_over_its_matrix_in_the_callers_order():
    data = synthetic_classification(90, features=FEATURES, classes=3, seed=2)
    clients = [Client(p) for p in quantity_skew_partition(data, 6, alpha=0.5, seed=2)]
    sizes = [c.num_examples for c in clients]
    assert sizes != sorted(sizes)  # a sort by size would reorder these clients
    vec = VectorizedBackend()
    vec.setup(clients, tiny_model)
    model = tiny_model()
    params = ParameterLayout.of(model).flatten(model)
    out = vec.fit(list(range(6)), params, [{"seed": i, "batch_size": 4} for i in range(6)])
    assert [o.result.num_examples for o in out] == sizes
    results = [(ClientProxy(i), o.result) for i, o in enumerate(out)]
    assert stack_updates(results).data_ptr() == out[0].result.update.data_ptr()  # no copy
    # several chunks are sorted by size: the strategy then gets a copy, with the same rows
    chunked = VectorizedBackend(chunk_size=4)
    chunked.setup(clients, tiny_model)
    out2 = chunked.fit(list(range(6)), params, [{"seed": i, "batch_size": 4} for i in range(6)])
    results2 = [(ClientProxy(i), o.result) for i, o in enumerate(out2)]
    assert stack_updates(results2).data_ptr() != out2[0].result.update.data_ptr()
    torch.testing.assert_close(stack_updates(results2), stack_updates(results), rtol=1e-5, atol=1e-7)
    # clients of equal size keep their order through the (stable) sort: all chunks, one matrix
    x, y = data.tensors
    equal = [Client(TensorDataset(x[i * 15:(i + 1) * 15], y[i * 15:(i + 1) * 15])) for i in range(6)]
    chunked.setup(equal, tiny_model)
    out3 = chunked.fit(list(range(6)), params, [{"seed": i, "batch_size": 4} for i in range(6)])
    assert stack_updates([(ClientProxy(i), o.result) for i, o in enumerate(out3)]).data_ptr() \
        == out3[0].result.update.data_ptr()


# ------------------------------------------------------------------ read-only strategies

STRATEGIES = {
    "FedAvg": lambda: FedAvg(),
    "FedProx": lambda: FedProx(proximal_mu=0.1),
    "FedAvgM": lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
    "FedAdam": lambda: FedAdam(eta=0.1),
    "FedYogi": lambda: FedYogi(eta=0.1),
    "FedAdagrad": lambda: FedAdagrad(eta=0.1),
    "FedMedian": lambda: FedMedian(),
    "FedTrimmedAvg": lambda: FedTrimmedAvg(beta=0.2),
    "FedTrimmedAvg-nocut": lambda: FedTrimmedAvg(beta=0.1),  # floor(0.1 K) = 0: the matrix itself
    "Krum": lambda: Krum(num_malicious_clients=1),
    "MultiKrum": lambda: Krum(num_malicious_clients=1, num_clients_to_keep=3),
    "DPFedAvgFixed": lambda: DPFedAvgFixed(FedAvg(), noise_multiplier=0.5, clip_norm=1.0, seed=1),
    "DPFedAvgFixed-FedAdam": lambda: DPFedAvgFixed(FedAdam(eta=0.1), noise_multiplier=0.5, clip_norm=1.0,
                                                   seed=1),
    "DPFedAvgAdaptive": lambda: DPFedAvgAdaptive(FedAvgM(server_momentum=0.5), noise_multiplier=0.5,
                                                 initial_clip_norm=1.0, seed=1),
    "SecAggFedAvg": lambda: SecAggFedAvg(clip_range=1.0, seed=1),
    "SecAggFedAvg-DP": lambda: SecAggFedAvg(DPFedAvgFixed(FedAvg(), noise_multiplier=0.5, clip_norm=1.0,
                                                          seed=1), seed=1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_no_strategy_writes_into_the_updates_or_the_parameters(name, dtype):
    strategy = STRATEGIES[name]()
    strategy.setup(num_available_clients=K, clients_per_round=K)
    proxies = [ClientProxy(i) for i in range(K)]
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(P, generator=gen)
    for rnd in (1, 2):  # the second round has server state (moments, momentum, clip norm)
        # rows of one matrix (float32: the view path of stack_updates); norms ~ 3 > clip_norm 1
        matrix = (torch.randn(K, P, generator=gen) * 0.5).to(dtype)
        results = _results(matrix.unbind(0))
        if dtype == torch.float32:
            assert stack_updates(results).data_ptr() == matrix.data_ptr()
        before, params_before = matrix.clone(), params.clone()
        strategy.configure_fit(rnd, params, proxies, K, np.random.default_rng(rnd))
        new, _ = strategy.aggregate_fit(rnd, params, results, [])
        assert torch.equal(matrix, before), f"{name} wrote into the received updates"
        assert torch.equal(params, params_before), f"{name} wrote into the parameters"
        assert not _shares_memory(new, params) and not _shares_memory(new, matrix)
        assert bool(torch.isfinite(new).all()) and not torch.equal(new, params)
        params = new

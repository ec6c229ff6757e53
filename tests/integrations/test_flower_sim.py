"""The Flower baseline's parts, without starting Ray (a Ray simulation costs ~30 s of start-up on
2 cores; the benchmark itself is run by hand: python -m ppml_fast.benchmarks.flower_sim)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ppml_fast.benchmarks import flower_sim


def test_plain_rounds_and_shards():
    x, y, parts = flower_sim._shards(7, 0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    times = flower_sim.plain_round_times(7, rounds=2, warmup=0)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_local_training_is_one_epoch_of_sgd():
    x, y, parts = flower_sim._shards(20, 0)
    idx = torch.from_numpy(parts[3])
    torch.manual_seed(0)
    start = flower_sim._get(flower_sim.mlp())
    out = flower_sim._local_training(start, x[idx], y[idx], seed=1, batch_size=16, lr=0.1, local_epochs=1)
    assert [a.shape for a in out] == [(64, 64), (64,), (10, 64), (10,)]
    # one epoch of a shard of ~72 samples at batch 16 is 5 steps; the same seed gives the same result
    again = flower_sim._local_training(start, x[idx], y[idx], seed=1, batch_size=16, lr=0.1, local_epochs=1)
    for a, b, s in zip(out, again, start):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, s)


def test_client_fn_is_a_flower_client_fn():
    flwr = pytest.importorskip("flwr")
    from flwr.client import ClientApp
    from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays

    fn = flower_sim._ClientFn(seed=0, batch_size=16, lr=0.1, local_epochs=1)
    ClientApp(client_fn=fn)  # Flower accepts the signature (one `context` argument)
    assert isinstance(pickle.loads(pickle.dumps(fn)), flower_sim._ClientFn)  # Ray ships it by reference
    context = SimpleNamespace(node_config={"partition-id": 2, "num-partitions": 10})
    client = fn(context)
    params = ndarrays_to_parameters(flower_sim._get(flower_sim.mlp()))
    res = client.fit(FitIns(params, {}))
    assert res.status.code == Code.OK
    assert res.num_examples == len(flower_sim._shards(10, 0)[2][2])
    assert [a.shape for a in parameters_to_ndarrays(res.parameters)] == [(64, 64), (64,), (10, 64), (10,)]
    assert flwr.__version__.startswith("1.")


@pytest.mark.parametrize("kwargs,match", [
    ({"num_clients": 0}, "num_clients must be an int >= 1; got 0"),
    ({"num_clients": 3, "rounds": 0}, "rounds must be an int >= 1"),
    ({"num_clients": 3, "warmup": -1}, "warmup must be an int >= 0"),
    ({"num_clients": 3, "client_cpus": 0}, "client_cpus must be > 0"),
])
def test_flower_round_times_checks_arguments(kwargs, match):
    n = kwargs.pop("num_clients")
    with pytest.raises(ValueError, match=match):
        flower_sim.flower_round_times(n, **kwargs)

"""The Ray backend past one machine, on the session's local 2-CPU Ray with two workers: clients built
on the workers from a ClientSpec (the driver's memory does not grow with the data: 1,000 vs 10,000
clients of 17 KB each), partial sums equal to the sequential backend's per-client aggregation
(FedAvg, and DP-FedAvg whose clipping the workers apply), and a worker killed mid-round whose
clients are retried once on the other worker, the round completing as if nothing had happened."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch import nn

from ppml_fast.datasets import synthetic_classification
from ppml_fast.federated import Client, DPFedAvgFixed, FedAvg, RayBackend, run_simulation
from ppml_fast.federated.backends import ClientSpec, SpecClient

from ._sim_helpers import CLASSES, FEATURES, tiny_model

ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def local_ray(ray_cluster):
    yield ray_cluster


def _factory(n: int, features: int, classes: int, slow_shard=None, marker=None, vary=0):
    """factory(shard) -> a Client with ``n + vary * (shard % 4)`` generated examples (seeded by the
    shard: deterministic, as a ClientSpec factory must be); ``slow_shard``'s client blocks in its
    first fit (until its worker is killed) when ``marker`` does not exist yet, then trains normally."""

    class BlocksOnce(Client):
        def fit(self, parameters, config):
            if not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(120)  # killed meanwhile
            return super().fit(parameters, config)

    def make(shard):
        data = synthetic_classification(n + vary * (int(shard) % 4), features=features, classes=classes,
                                        seed=1000 + int(shard))
        return BlocksOnce(data) if shard == slow_shard else data

    return make


def _local_clients(factory, shards):
    return [Client(factory(s), cid=i) for i, s in enumerate(shards)]


def test_spec_partial_sums_equal_sequential_and_a_killed_worker_is_retried(tmp_path):
    marker = str(tmp_path / "started")
    shards = list(range(12))
    # unequal sizes (18 to 54 examples): FedAvg's weights are not the clients' count
    factory = _factory(18, FEATURES, CLASSES, slow_shard=5, marker=marker, vary=12)
    kw = dict(rounds=2, clients_per_round=12, lr=0.3, batch_size=8, seed=3, progress=False)
    reference = _local_clients(_factory(18, FEATURES, CLASSES, vary=12), shards)
    seq = run_simulation(tiny_model, reference, FedAvg(), backend="sequential", **kw)

    strategy = FedAvg()
    backend = RayBackend(num_workers=2, partial_sums_for=strategy)
    spec = ClientSpec(factory=factory, shards=shards)
    killed = []

    def killer():  # ray.kill the worker of shard 5 while it is inside that client's fit
        while not os.path.exists(marker):
            time.sleep(0.05)
        w = backend._home[5]
        killed.append(w)
        ray.kill(backend._workers[w])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    par = run_simulation(tiny_model, spec.clients(), strategy, backend=backend, **kw)
    t.join(5)
    assert killed, "the worker was not killed mid-round"
    # round 1 completed with every client (the killed worker's retried on the other), none dropped
    for a, b in zip(par.rounds, seq.rounds):
        assert a["clients"] == b["clients"] == list(range(12)) and a["dropped"] == [] and not a["skipped"]
    assert backend._dead == set(killed)
    torch.testing.assert_close(par.parameters, seq.parameters, rtol=1e-5, atol=1e-6)
    assert par.rounds[-1]["train_loss"] == pytest.approx(seq.rounds[-1]["train_loss"], rel=1e-5)


def test_dp_partial_sums_clip_per_client_on_the_workers():
    # clip_norm far below the updates' norms: every client's update is clipped; a worker that
    # summed before clipping (or clipped its group's sum) would differ from the server's own
    # per-client clipping by a factor of about the group size
    factory = _factory(40, FEATURES, CLASSES)
    shards = list(range(10))
    kw = dict(rounds=2, clients_per_round=6, lr=0.5, batch_size=8, seed=4, progress=False)

    def dp():
        return DPFedAvgFixed(FedAvg(), noise_multiplier=0.5, clip_norm=0.01, seed=11)

    seq_strategy = dp()
    seq = run_simulation(tiny_model, _local_clients(factory, shards), seq_strategy, backend="sequential", **kw)
    strategy = dp()
    backend = RayBackend(num_workers=2, partial_sums_for=strategy)
    assert backend._mode() == ("clip", 0.01)
    par = run_simulation(tiny_model, ClientSpec(factory=factory, shards=shards).clients(), strategy,
                         backend=backend, **kw)
    assert [r["clients"] for r in par.rounds] == [r["clients"] for r in seq.rounds]
    assert sum(len(r["clients"]) for r in par.rounds) > 4  # Poisson sampling picked some clients
    torch.testing.assert_close(par.parameters, seq.parameters, rtol=1e-5, atol=1e-6)
    assert par.rounds[-1]["epsilon"] == pytest.approx(seq.rounds[-1]["epsilon"])
    assert max(float(n) for n in seq_strategy.last_update_norms) > 10 * 0.01  # clipping did bite


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _driver_growth(num_clients: int, n: int, features: int) -> tuple[int, float]:
    """Peak growth of the driver's RSS (bytes) over one round of ``num_clients`` spec clients,
    sampled every 10 ms, and the round's wall seconds."""
    def model_fn():
        return nn.Linear(features, 4)

    strategy = FedAvg()
    clients = ClientSpec(factory=_factory(n, features, 4), shards=range(num_clients)).clients()
    peak, done = [0], threading.Event()
    base = _rss()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    hist = run_simulation(model_fn, clients, strategy, rounds=1, clients_per_round=num_clients, batch_size=64,
                          lr=0.1, progress=False, backend=RayBackend(num_workers=2, partial_sums_for=strategy))
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    assert len(hist.rounds[0]["clients"]) == num_clients and not hist.rounds[0]["dropped"]
    assert all(isinstance(c, SpecClient) and c._n == n for c in clients[:5])
    return max(peak[0], _rss()) - base, seconds


def test_driver_memory_does_not_grow_with_the_data():
    n, features = 128, 32
    per_client = n * features * 4 + n * 8  # float32 inputs, int64 labels: 16.4 KB
    small, t_small = _driver_growth(1_000, n, features)
    large, t_large = _driver_growth(10_000, n, features)
    data_small, data_large = 1_000 * per_client, 10_000 * per_client
    print(f"\ndriver RSS growth: 1,000 clients {small / 2**20:.1f} MiB ({t_small:.1f} s), 10,000 clients "
          f"{large / 2**20:.1f} MiB ({t_large:.1f} s); their data: {data_small / 2**20:.0f} / "
          f"{data_large / 2**20:.0f} MiB")
    # the driver holds per-client numbers (handles, results, History), never the data: going
    # from 1,000 to 10,000 clients adds 147 MiB of data and must add far less to the driver
    assert large < data_large / 4
    assert large - small < (data_large - data_small) / 4


class _SleepsOnce(Client):
    """Hangs in its first fit (until killed) while ``marker`` does not exist; normal afterwards."""
    marker = ""

    def fit(self, parameters, config):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(120)
        return super().fit(parameters, config)


def test_a_worker_past_its_deadline_is_stopped_and_a_hung_fit_abandoned(tmp_path):
    from ppml_fast.federated import ParameterLayout
    from ._sim_helpers import make_clients
    base = make_clients(4)
    hung = _SleepsOnce(torch.utils.data.TensorDataset(base[1]._x, base[1]._y), cid=1)
    hung.marker = str(tmp_path / "hung")
    clients = [base[0], hung, base[2], base[3]]
    model = tiny_model()
    params = ParameterLayout.of(model).flatten(model)
    cfgs = [{"seed": i, "batch_size": 8, "lr": 0.2} for i in range(4)]
    backend = RayBackend(num_workers=2, round_timeout=6)
    backend.setup(clients, tiny_model)
    try:
        assert backend._home == [0, 1, 0, 1]
        start = time.perf_counter()
        out = backend.fit([0, 1, 2, 3], params, cfgs)
        elapsed = time.perf_counter() - start
        # no per-client deadline: worker 1 (clients 1 and 3) hung until the round's 6 s, was
        # stopped then, and its clients failed with the reason; worker 0 adopted them
        assert 6.0 <= elapsed < 25, elapsed
        assert [o.error is None for o in out] == [True, False, True, False]
        assert all(isinstance(out[p].error, TimeoutError) and "deadline" in str(out[p].error) for p in (1, 3))
        assert backend._dead == {1} and backend._home == [0, 0, 0, 0]
        # the simulation's client_timeout (backend.deadline): worker 0 abandons the hung fit at
        # 2 s as the sequential backend does (seconds = inf: "timeout"), the others train
        os.remove(hung.marker)
        backend.deadline, backend.round_timeout = 2.0, 60.0
        start = time.perf_counter()
        out = backend.fit([0, 1, 2, 3], params, cfgs)
        assert time.perf_counter() - start < 15
        assert out[1].result is None and out[1].error is None and out[1].seconds == float("inf")
        assert backend._dead == {1}
        for p in (0, 2, 3):
            ref = clients[p].fit(params, {**cfgs[p], "model": tiny_model()})
            torch.testing.assert_close(out[p].result.update, ref.update, rtol=1e-5, atol=1e-6)
    finally:
        backend.close()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="factory"):
        ClientSpec(factory="no_colon", shards=[1])
    with pytest.raises(ValueError, match="shards"):
        ClientSpec(factory="m:f", shards=[])
    with pytest.raises(ValueError, match="cids"):
        ClientSpec(factory="m:f", shards=[1, 2], cids=[0])
    with pytest.raises(ValueError, match="num_gpus"):
        RayBackend(num_gpus=-1)
    with pytest.raises(ValueError, match="client_timeout"):
        RayBackend(client_timeout=0)
    with pytest.raises(ValueError, match="retries"):
        RayBackend(retries=2)
    with pytest.raises(TypeError, match="partial_sums_for"):
        RayBackend(partial_sums_for="FedAvg")
    spec = ClientSpec(factory="ppml_fast.datasets:synthetic_classification", shards=[3, 4], cids=[7, 9])
    handles = spec.clients()
    assert [c.cid for c in handles] == [7, 9] and handles[1].shard == 4
    with pytest.raises(RuntimeError, match="Ray worker"):
        handles[0].fit(None, {})
    from ppml_fast.federated import FedMedian, DPFedAvgAdaptive
    assert RayBackend(partial_sums_for=FedMedian())._mode() == (None, None)  # needs each update
    adaptive = DPFedAvgAdaptive(FedAvg(), noise_multiplier=1.0)
    assert RayBackend(partial_sums_for=adaptive)._mode() == (None, None)  # needs each client's norm


def test_partial_sums_for_another_strategy_are_refused_before_ray_starts():
    """RayBackend(partial_sums_for=FedAvg()) in a DP-FedAvg run would sum unclipped updates on the
    workers: refused before any worker or round."""
    from ._sim_helpers import make_clients

    dp = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.1, seed=1)
    with pytest.raises(ValueError, match="partial_sums_for"):
        run_simulation(tiny_model, make_clients(4), dp, rounds=1, clients_per_round=4,
                       backend=RayBackend(partial_sums_for=FedAvg()), progress=False)

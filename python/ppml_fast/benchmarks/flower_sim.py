"""Flower 1.42's own simulation on the federated benchmark task, the baseline of issue 5 item 9.

The task: sklearn's digits (:func:`ppml_fast.datasets.digits`), split IID over N clients
(:func:`ppml_fast.federated.iid_partition`), a torch MLP 64-64-10, every client in every round,
1 local epoch of SGD (batch 16, lr 0.1), FedAvg. Flower runs it as it runs any simulation:
``flwr.simulation.run_simulation`` with a ``ServerApp`` (a ``FedAvg`` strategy) and a
``ClientApp`` (a ``NumPyClient``), each client call executed by a Ray actor (Flower's
``RayBackend``; ``client_cpus`` CPUs per actor decide how many run at once).

A round is timed on the server, from ``configure_fit`` to the end of ``aggregate_fit``: sending
the parameters to N clients, their local training, collecting the results and aggregating. The
first ``warmup`` rounds (actor start-up, imports in the actors) are left out; the result is the
median of the rest. Flower's ``run_simulation`` has no timeout of its own: bound a run from
outside (e.g. ``timeout 600 python -m ppml_fast.benchmarks.flower_sim ...``).

Needs ``flwr`` 1.42 and ``ray`` (``pip install 'ppml_fast[bench]'`` and Ray).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

__all__ = ["flower_round_times", "flower_seconds_per_round", "mlp", "plain_round_times"]


def mlp() -> nn.Module:
    """The benchmark model: 64 inputs, 64 hidden units (ReLU), 10 classes."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@functools.lru_cache(maxsize=4)
def _shards(num_clients: int, seed: int) -> tuple:
    """(x, y) of the training set and each client's indices; computed once per process (each Ray
    actor builds it on its first call, as a Flower client would load its partition)."""
    from ppml_fast.datasets import digits
    from ppml_fast.federated import iid_partition

    train, _ = digits(seed=seed)
    parts = iid_partition(train, num_clients, seed=seed)
    x, y = train.tensors
    return x, y, [np.asarray(p.indices, dtype=np.int64) for p in parts]


def _get(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def _set(model: nn.Module, arrays: list[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays)})


def _local_training(parameters: list[np.ndarray], x: torch.Tensor, y: torch.Tensor, *, seed: int,
                    batch_size: int, lr: float, local_epochs: int) -> list[np.ndarray]:
    """One client's work: SGD over its shuffled data from the global parameters."""
    model = mlp()
    _set(model, parameters)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(local_epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            b = order[start:start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return _get(model)


class _ClientFn:
    """Flower's ``client_fn`` (one ``context`` argument, as ``ClientApp`` requires): the
    NumPyClient of partition ``partition-id``. A module-level class, so Ray pickles it by
    reference with its four settings."""

    def __init__(self, *, seed: int, batch_size: int, lr: float, local_epochs: int) -> None:
        self.seed, self.batch_size, self.lr, self.local_epochs = seed, batch_size, lr, local_epochs

    def __call__(self, context):
        from flwr.client import NumPyClient

        torch.set_num_threads(1)  # one core per actor; several actors share the machine
        seed, batch_size, lr, local_epochs = self.seed, self.batch_size, self.lr, self.local_epochs
        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        x, y, parts = _shards(n, seed)
        idx = torch.from_numpy(parts[pid])
        cx, cy = x[idx], y[idx]

        class DigitsClient(NumPyClient):
            def fit(self, parameters, config):
                out = _local_training(parameters, cx, cy, seed=seed * 100_003 + pid,
                                      batch_size=batch_size, lr=lr, local_epochs=local_epochs)
                return out, len(cy), {}

        return DigitsClient().to_client()


def flower_round_times(
    num_clients: int,
    *,
    rounds: int = 3,
    warmup: int = 1,
    client_cpus: float = 0.5,
    batch_size: int = 16,
    lr: float = 0.1,
    local_epochs: int = 1,
    seed: int = 0,
    ray_num_cpus: Optional[int] = None,
) -> list[float]:
    """Seconds of each of ``warmup + rounds`` rounds of Flower's Ray simulation (see the module
    docstring); the first ``warmup`` entries include start-up costs."""
    for name, value in (("num_clients", num_clients), ("rounds", rounds), ("batch_size", batch_size),
                        ("local_epochs", local_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0; got {warmup!r}")
    if not client_cpus > 0:
        raise ValueError(f"client_cpus must be > 0; got {client_cpus!r}")
    try:
        if importlib.util.find_spec("ray") is None:  # Flower's RayBackend needs it
            raise ImportError("No module named 'ray'")
        from flwr.client import ClientApp
        from flwr.common import ndarrays_to_parameters
        from flwr.server import ServerApp, ServerAppComponents, ServerConfig
        from flwr.server.strategy import FedAvg
        from flwr.simulation import run_simulation
    except ImportError as exc:
        raise ImportError(
            "the Flower baseline needs flwr 1.42 and ray: pip install 'ppml_fast[bench]' ray "
            f"(import failed: {exc})"
        ) from exc
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network calls from Flower

    torch.manual_seed(seed)
    initial = ndarrays_to_parameters(_get(mlp()))
    starts: dict[int, float] = {}
    times: dict[int, float] = {}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            starts[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} client(s) failed: "
                                   f"{failures[0]!r}")
            out = super().aggregate_fit(server_round, results, failures)
            times[server_round] = time.perf_counter() - starts[server_round]
            return out

    def server_fn(context):
        strategy = TimedFedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_clients,
            min_evaluate_clients=0, min_available_clients=num_clients,
            initial_parameters=initial, accept_failures=False,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=warmup + rounds))

    client_app = ClientApp(client_fn=_ClientFn(
        seed=seed, batch_size=batch_size, lr=lr, local_epochs=local_epochs))
    init_args = {"logging_level": "ERROR", "log_to_driver": False}
    if ray_num_cpus is not None:
        init_args["num_cpus"] = int(ray_num_cpus)
    run_simulation(
        server_app=ServerApp(server_fn=server_fn), client_app=client_app,
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
                        "init_args": init_args},
    )
    missing = [r for r in range(1, warmup + rounds + 1) if r not in times]
    if missing:
        raise RuntimeError(f"Flower's simulation ended without finishing rounds {missing}")
    return [times[r] for r in range(1, warmup + rounds + 1)]


def plain_round_times(
    num_clients: int,
    *,
    rounds: int = 3,
    warmup: int = 1,
    batch_size: int = 16,
    lr: float = 0.1,
    local_epochs: int = 1,
    seed: int = 0,
) -> list[float]:
    """The same rounds as a plain in-process loop (one thread): each client's local training in
    turn, then Flower's FedAvg ``aggregate``; a same-run yardstick for the machine's load."""
    from ppml_fast.benchmarks.flower import aggregate

    torch.set_num_threads(1)
    x, y, parts = _shards(num_clients, seed)
    shards = [(x[torch.from_numpy(p)], y[torch.from_numpy(p)]) for p in parts]
    torch.manual_seed(seed)
    params = _get(mlp())
    times = []
    for _ in range(warmup + rounds):
        t0 = time.perf_counter()
        results = [(_local_training(params, cx, cy, seed=seed * 100_003 + pid, batch_size=batch_size,
                                    lr=lr, local_epochs=local_epochs), len(cy))
                   for pid, (cx, cy) in enumerate(shards)]
        params = aggregate(results)
        times.append(time.perf_counter() - t0)
    return times


def flower_seconds_per_round(num_clients: int, *, rounds: int = 3, warmup: int = 1, **kwargs) -> float:
    """Median seconds per round of Flower's simulation after ``warmup`` rounds."""
    return statistics.median(flower_round_times(num_clients, rounds=rounds, warmup=warmup, **kwargs)[warmup:])


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Flower 1.42 simulation: seconds per round on digits")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--client-cpus", type=float, default=0.5)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    plain = plain_round_times(args.clients, rounds=args.rounds, warmup=args.warmup)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    per_round = flower_round_times(args.clients, rounds=args.rounds, warmup=args.warmup,
                                   client_cpus=args.client_cpus)
    flower_s = statistics.median(per_round[args.warmup:])
    plain_s = statistics.median(plain[args.warmup:])
    print(json.dumps({
        "clients": args.clients, "client_cpus": args.client_cpus,
        "round_seconds": [round(t, 4) for t in per_round],
        "median_after_warmup": round(flower_s, 4),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "plain_loop_median": round(plain_s, 4), "flower_over_plain": round(flower_s / plain_s, 1),
        "load_average": os.getloadavg(),
        "flwr": __import__("flwr").__version__, "ray": __import__("ray").__version__,
        "torch_threads_per_actor": 1, "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    # run the importable module's main, so that Ray pickles _ClientFn by its real module name
    # (objects of __main__ cannot be found in the actors)
    from ppml_fast.benchmarks.flower_sim import main as _main

    _main()

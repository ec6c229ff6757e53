"""Benchmark cases of one federated round (issue 5, item 9): ppml_fast's vectorized backend
against its sequential backend, a plain torch loop and Flower 1.42's simulation, in the same run.

The task (the issue's): sklearn's digits, IID over N clients, MLP 64-64-10, FedAvg, every client
in every round, 1 local epoch of SGD with batch 16 and lr 0.1; N = 100 and 1,000. For N = 10,000
digits is too small (~1,400 training samples): that case uses
:func:`ppml_fast.datasets.synthetic_classification` with 32 samples per client (320,000 in all,
64 features, 10 classes), and times the vectorized backend alone (target: < 10 s per round).

One timed call is one round: ``Simulation.step()`` of :mod:`ppml_fast.federated.simulation`
(sampling, local training, fault checks, FedAvg through ``weighted_aggregate``; no evaluation),
on a simulation built once in the impl's preparation. Impls and roles:

- ``vectorized`` (ppml_fast): ``backend=VectorizedBackend(device=...)``;
- ``sequential`` (baseline): ``backend="sequential"``, ``Client.fit`` one by one — target at
  N = 1,000: vectorized >= 10x faster;
- ``plain`` (baseline): a bare torch loop over the clients (optimizer SGD, no framework) plus a
  weighted mean: what any simulation costs at least when clients run one after the other;
- ``flower`` (baseline, costly): Flower 1.42's ``run_simulation`` (Ray actors, ``client_cpus``
  0.5 each) from :mod:`ppml_fast.benchmarks.flower_sim`, run in a background thread and released
  one round per timed call (its actors start in the preparation) — target at N = 1,000:
  vectorized >= 100x faster. Needs ``flwr`` and ``ray``; without them the row is an error (a
  skip in bench/).

``device``: where the vectorized impl trains: ``"cpu"`` or ``"cuda"`` (the argument, else
``$PPML_BENCH_DEVICE``, else the CPU); it trains with torch alone, so CUDA needs a GPU that torch
sees but no CUDA build of ppml_fast (aggregation stays on the CPU). The other impls run on the CPU.

Run alone: ``python -m ppml_fast.benchmarks.federated [--sizes tiny] [--profile quick]
[--device cuda] [--only 1000] [--threads 2]`` prints the table (``--json``: rows as JSON);
``--scale N`` times the vectorized backend alone on N generated clients and reports memory
(:func:`scale_round`), to find the largest N that fits a memory budget.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from ppml_fast.benchmarks.cases import Case, Impl, Inputs, Target

BATCH, LR, EPOCHS, SEED = 16, 0.1, 1, 0
SAMPLES_PER_CLIENT_10K = 32
SIZES = {"full": (100, 1_000, 10_000), "tiny": (5, 10, 40)}
FLOWER_CLIENT_CPUS = 0.5
FLOWER_MAX_ROUNDS = 64  # rounds a Flower impl can be called for (warm-ups and timed runs)


def mlp() -> nn.Module:
    """The benchmark model: 64 inputs, 64 hidden units (ReLU), 10 classes."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _digits_clients(n: int) -> Inputs:
    from ppml_fast.datasets import digits
    from ppml_fast.federated import Client, iid_partition

    train, _ = digits(seed=SEED)
    return {"num_clients": n, "clients": [Client(p) for p in iid_partition(train, n, seed=SEED)]}


def _synthetic_clients(n: int) -> Inputs:
    from ppml_fast.datasets import synthetic_classification
    from ppml_fast.federated import Client

    data = synthetic_classification(n * SAMPLES_PER_CLIENT_10K, features=64, classes=10, seed=SEED)
    x, y = data.tensors
    k = SAMPLES_PER_CLIENT_10K
    return {"num_clients": n, "clients": [
        Client(torch.utils.data.TensorDataset(x[i * k:(i + 1) * k], y[i * k:(i + 1) * k])) for i in range(n)]}


# -- ppml_fast ------------------------------------------------------------------------------------
def _simulation(backend: Any) -> Callable[[Inputs], Callable[[], object]]:
    def make(x: Inputs) -> Callable[[], object]:
        from ppml_fast.federated import FedAvg
        from ppml_fast.federated.simulation import Simulation

        b = backend() if callable(backend) else backend
        sim = Simulation(mlp, x["clients"], FedAvg(), rounds=10**9, clients_per_round=x["num_clients"],
                         backend=b, local_epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=SEED, progress=False)
        return sim.step

    return make


def _vectorized(device: str) -> Callable[[Inputs], Callable[[], object]]:
    from ppml_fast.federated import VectorizedBackend

    return _simulation(lambda: VectorizedBackend(device=device))


# -- plain torch loop -----------------------------------------------------------------------------
def _plain(x: Inputs) -> Callable[[], object]:
    """Each client: load the global weights, SGD over its shuffled batches; then the mean of the
    trained weights weighted by example counts (no framework, no checks)."""
    shards = [(c._x, c._y) for c in x["clients"]]  # benchmark code: reads the clients' data directly
    torch.manual_seed(SEED)
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(SEED)
    total = sum(len(y) for _, y in shards)

    def one_round() -> None:
        acc = {k: torch.zeros_like(v) for k, v in state.items()}
        for cx, cy in shards:
            model.load_state_dict(state)
            for _ in range(EPOCHS):
                order = torch.randperm(len(cy), generator=gen)
                for s in range(0, len(cy), BATCH):
                    b = order[s:s + BATCH]
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(cx[b]), cy[b]).backward()
                    opt.step()
            for k, v in model.state_dict().items():
                acc[k].add_(v, alpha=len(cy) / total)
        state.update(acc)

    return one_round


# -- Flower 1.42 ----------------------------------------------------------------------------------
class _FlowerRounds:
    """State shared by Flower's server thread and the timed callable: the callable releases one
    round (``go``) and waits for its aggregation (``done``); ``close`` lets the remaining rounds
    run empty so that Flower ends its simulation (and its Ray) and the thread exits."""

    def __init__(self) -> None:
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.stopping = False
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None

    def step(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            raise RuntimeError(f"Flower's simulation is not running (error: {self.error!r})")
        self.go.release()
        while not self.done.acquire(timeout=1.0):
            if not self.thread.is_alive():
                raise RuntimeError(f"Flower's simulation stopped during a round (error: {self.error!r})")
        if self.error is not None:
            raise RuntimeError(f"Flower round failed: {self.error!r}")

    def close(self) -> None:
        self.stopping = True
        for _ in range(FLOWER_MAX_ROUNDS + 1):
            self.go.release()
        if self.thread is not None:
            self.thread.join(timeout=120)


class _FlowerStep:
    """The timed callable: one Flower round per call (a finalizer stops Flower when it goes)."""

    def __init__(self, rounds: _FlowerRounds) -> None:
        self._rounds = rounds
        weakref.finalize(self, rounds.close)

    def __call__(self) -> None:
        self._rounds.step()


def _flower(x: Inputs) -> Callable[[], object]:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ImportError("the Flower baseline needs ray (Flower's simulation runs on it)")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network calls from Flower
    from flwr.client import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from ppml_fast.benchmarks import flower_sim

    n, state = x["num_clients"], _FlowerRounds()
    torch.manual_seed(SEED)
    initial = ndarrays_to_parameters(flower_sim._get(flower_sim.mlp()))

    class SteppedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            state.go.acquire()
            if state.stopping:
                return []
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            try:
                if failures:
                    state.error = RuntimeError(f"{len(failures)} client(s) failed: {failures[0]!r}")
                return super().aggregate_fit(server_round, results, failures)
            finally:
                state.done.release()

    def server_fn(context):
        strategy = SteppedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                                 min_evaluate_clients=0, min_available_clients=n,
                                 initial_parameters=initial, accept_failures=False)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=FLOWER_MAX_ROUNDS))

    client_app = ClientApp(client_fn=flower_sim._ClientFn(seed=SEED, batch_size=BATCH, lr=LR,
                                                          local_epochs=EPOCHS))

    def run() -> None:
        try:
            run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=client_app,
                           num_supernodes=n,
                           backend_config={"client_resources": {"num_cpus": FLOWER_CLIENT_CPUS, "num_gpus": 0.0},
                                           "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
        except BaseException as e:  # reported by the next step()
            state.error = e
        finally:
            state.done.release()

    state.thread = threading.Thread(target=run, name="flower-simulation", daemon=True)
    state.thread.start()
    step = _FlowerStep(state)
    step()  # the first round starts the actors: preparation, not timed
    return step


def _device(device: Optional[str]) -> str:
    from ppml_fast.benchmarks.device import DEVICE_ENV, DEVICES

    source = "device"
    if device is None:
        device, source = os.environ.get(DEVICE_ENV, "cpu") or "cpu", DEVICE_ENV
    if device not in DEVICES:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, DEVICES))}; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{source} is 'cuda' but torch sees no CUDA GPU (torch {torch.__version__})")
    return device


# -- the table ------------------------------------------------------------------------------------
def federated_cases(sizes: str = "full", device: Optional[str] = None) -> list[Case]:
    """One-round cases for N = 100, 1,000 (digits) and 10,000 (generated; vectorized only);
    ``"tiny"``: 5, 10 and 40 clients, for tests of the harness."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {', '.join(map(repr, SIZES))}; got {sizes!r}")
    device = _device(device)
    small, mid, large = SIZES[sizes]
    cases = []
    for n in (small, mid):
        full_target = sizes == "full" and n == 1_000
        cases.append(Case(
            f"federated-round-{n}",
            f"one FedAvg round, digits IID over {n:,} clients, MLP 64-64-10, batch {BATCH}",
            lambda n=n: _digits_clients(n), (
                Impl("vectorized", f"ppml_fast vectorized ({device})", _vectorized(device), role="ppml_fast"),
                Impl("sequential", "ppml_fast sequential", _simulation("sequential"),
                     target=Target(">=", 10.0) if full_target else None),
                Impl("plain", "plain torch loop", _plain),
                Impl("flower", f"Flower 1.42 simulation (Ray, {FLOWER_CLIENT_CPUS} CPU/client)", _flower,
                     costly=True, target=Target(">=", 100.0) if full_target else None),
            )))
    cases.append(Case(
        f"federated-round-{large}",
        f"one FedAvg round, {large:,} clients x {SAMPLES_PER_CLIENT_10K} generated samples"
        + (" (target < 10 s)" if sizes == "full" else ""),
        lambda: _synthetic_clients(large), (
            Impl("vectorized", f"ppml_fast vectorized ({device})", _vectorized(device), role="ppml_fast"),
        )))
    return cases


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def scale_round(num_clients: int, *, device: Optional[str] = None, rounds: int = 2,
                chunk_size: int = 1024) -> dict[str, Any]:
    """Seconds per round of the vectorized backend on ``num_clients`` generated clients (32
    samples each; the N = 10,000 case's task, any N), the first round left out, and memory:
    the peak resident set's growth over the rounds (Linux: ``VmHWM`` minus ``VmRSS`` before,
    clients already built) and, on CUDA, ``torch.cuda.max_memory_allocated``."""
    import time

    from ppml_fast.federated import FedAvg, VectorizedBackend
    from ppml_fast.federated.simulation import Simulation

    device = _device(device)
    clients = _synthetic_clients(num_clients)["clients"]
    rss_before = _rss_mib("VmRSS")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sim = Simulation(mlp, clients, FedAvg(), rounds=rounds + 1, clients_per_round=num_clients,
                     backend=VectorizedBackend(device=device, chunk_size=chunk_size), local_epochs=EPOCHS,
                     batch_size=BATCH, lr=LR, seed=SEED, progress=False)
    with sim:
        sim.step()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            sim.step()
            times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"clients": num_clients, "device": device, "chunk_size": chunk_size,
                           "seconds_per_round": min(times), "torch_threads": torch.get_num_threads(),
                           "peak_rss_growth_mib": round(_rss_mib("VmHWM") - rss_before, 1)}
    if device == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from ppml_fast.benchmarks import PROFILES, format_table, machine_info, run_cases, to_json

    p = argparse.ArgumentParser(description="seconds per federated round: vectorized, sequential, "
                                            "plain torch, Flower 1.42")
    p.add_argument("--sizes", choices=tuple(SIZES), default="full")
    p.add_argument("--profile", choices=tuple(PROFILES), default="full")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--only", action="append", default=[], help="keep cases whose key contains this")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--scale", type=int, default=None, metavar="N",
                   help="instead of the cases: seconds per round and memory of the vectorized backend "
                        "on N generated clients (32 samples each)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.scale is not None:
        print(json.dumps(scale_round(args.scale, device=args.device)))
        return
    cases = [c for c in federated_cases(args.sizes, args.device)
             if not args.only or any(o in c.key for o in args.only)]
    rows = run_cases(cases, PROFILES[args.profile], progress=lambda m: print(m, file=sys.stderr, flush=True))
    meta = machine_info(profile=args.profile, sizes=args.sizes, device=_device(args.device),
                        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(to_json(rows, meta) if args.json else format_table(rows, meta))


if __name__ == "__main__":
    # the importable module's main, so that Ray pickles Flower's client_fn by its module name
    from ppml_fast.benchmarks.federated import main as _main

    _main()

"""Client groups on Ray workers, on one machine or many: each worker (a Ray actor,
:class:`~.ray_worker.RayWorker`) holds a fixed group of clients and trains the selected ones of
its group together with the vectorized backend (one by one where it refuses, e.g. local DP).

Where the clients come from:
- ``Client`` objects (they hold their data): sent to their worker once, in :meth:`RayBackend.setup`;
- :class:`~.ray_specs.ClientSpec` (``spec.clients()``: data-less handles): each worker builds its
  clients itself with ``factory(shard)``; the data never passes through the driver, whose memory
  does not depend on the data's size.
Each round only the parameters (one ``ray.put``) and the configs travel to the workers.

What comes back: by default each client's update. With ``partial_sums_for=strategy`` and a
strategy that aggregates a weighted mean (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad,
FaultTolerantFedAvg, exactly these classes), a worker returns one partial weighted sum
``S = sum n_i u_i`` and ``W = sum n_i`` for the clients it trained together, plus each client's
numbers (examples, metrics, time, ε); the driver hands every one of those clients the group's mean
``S / W`` (one shared tensor) with its own ``n_i``, and any weighted mean over the clients is then
``sum_g W_g (S_g / W_g) / sum_g W_g = sum_i n_i u_i / sum_i n_i``: the strategy's aggregate is the
one it computes from the individual updates, within float rounding. For ``DPFedAvgFixed`` (exactly
that class, any inner strategy) a worker clips each update to the server's clip norm
``C = strategy.round_clip_norm()`` before summing (``S = sum clip_C(u_i)``, ``W`` = count) and every
client carries ``S / W``: a mean of vectors of norm <= C has norm <= C, so the server's own
clipping leaves it (at most shrinks it by float rounding) and its unit-weight sum is
``sum_i clip_C(u_i)``, the DP-FedAvg sum (McMahan et al. 2018, Alg. 1) whose sensitivity C its
noise is calibrated to. What a carrier does not give: a client's own update and norm, so the
strategy's ``last_update_norms`` are the carriers' norms. Every other strategy (robust ones,
adaptive clipping, which needs each client's norm, secure aggregation) gets per-client updates.

Faults. A worker call has a deadline, ``min(round_timeout, client_timeout x its clients)`` seconds
after the round's calls were sent (None: no limit; ``client_timeout`` defaults to the simulation's
``run_simulation(client_timeout=...)``, which the worker also applies to each one-by-one fit, as
the sequential backend does, :mod:`ppml_fast.federated.deadline`); a worker that misses it is
killed and its clients of that round fail with ``TimeoutError`` (reason ``"timeout"`` when the
simulation has a ``client_timeout``). A worker that dies (or is killed) is replaced for
its clients by the live workers, which adopt them (a spec's clients are rebuilt there from their
shards, object clients re-sent from the driver), and its clients of that round are retried once
there (``retries=1``) within the round's deadline. A client's state changed by training (a local-DP
accountant and noise offset) lives on its worker, as on a device, and is copied back to the driver
after each fit; for a client whose call failed (its worker died, was killed, or raised), the driver
records the conservative bound of :func:`~ppml_fast.federated.dp.local.state_after_lost_fit` (the
whole fit composed; ``inf`` for a client whose class overrides ``fit`` or whose size its worker
never reported) and a retry starts from that state, so no lost step is ever uncounted. With no live
worker left, the clients fail at once in later rounds, without being sent anywhere.

GPUs: ``num_gpus`` per worker reserves them with Ray and trains the vectorized groups there
(``device="cuda"``); the one-by-one fallback trains on the CPU.

Multi-node launch (Ray is optional: ``pip install 'ppml_fast[ray]'`` on every node; the model
function and a spec's factory must be importable on every node)::

    head$    ray start --head --port=6379
    node$    ray start --address=<head-ip>:6379            # on each other machine
    driver$  python -c "...run_simulation(model_fn, ClientSpec(factory='mypkg.data:make_client',
                         shards=range(100_000)).clients(), FedAvg(),
                         backend=RayBackend(address='auto', num_workers=16, partial_sums_for=strategy),
                         ...)"

When Ray is not running yet, :meth:`setup` starts it (``ray.init(address=address, **init_kwargs)``:
a local instance when ``address`` is None) and :meth:`close` shuts it down again; an instance
started by the caller is left running.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..client import Client, fit_settings
from ..dp.local import LocalDP, LocalDPState, state_after_lost_fit
from ..types import FitResult
from .base import Backend, Outcome
from .ray_specs import ClientSpec, SpecClient
from .ray_worker import RayWorker, portable

__all__ = ["ClientSpec", "RayBackend", "SpecClient", "import_ray"]

_MEAN_TYPES = ("FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "FaultTolerantFedAvg")


def import_ray():
    """The ``ray`` module, or ImportError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("backend 'ray' needs Ray, an optional dependency: "
                          "pip install 'ppml_fast[ray]'") from e
    return ray


def _lost_fit(client: Client, config: Mapping[str, Any]) -> tuple[Optional[LocalDPState], Optional[float]]:
    """(state, spent ε) to record for a local-DP client whose worker was lost during its fit: the
    conservative bound of ``state_after_lost_fit``; (None, None) without local DP. A client that
    trains its own way (its class overrides ``fit``) or whose size is unknown: (None, inf)."""
    local_dp = config.get("local_dp")
    if not isinstance(local_dp, LocalDP):
        return None, None
    if isinstance(client, SpecClient):
        if not client._default_fit or client._n is None:
            return None, math.inf
    elif type(client).fit is not Client.fit:
        return None, math.inf
    try:
        s = fit_settings(config)
    except Exception:  # Client.fit refuses such a config before training: nothing spent
        return None, client.local_epsilon(local_dp.delta)
    state = state_after_lost_fit(client._local_dp, local_dp, client.num_examples, s["batch_size"],
                                 s["local_epochs"])
    return state, state.epsilon(local_dp.delta)


def _limit(name: str, v: Any) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v) > 0 or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number of seconds > 0 or None; got {v!r}")
    return float(v)


class RayBackend(Backend):
    """Clients split round-robin over ``num_workers`` Ray actors (module docstring).

    Args:
        num_workers: number of actors (default: the cluster's CPUs // ``cpus_per_worker``).
        cpus_per_worker: CPUs per actor, also its torch thread count.
        num_gpus: GPUs per actor (a fraction shares one); > 0 trains the vectorized groups on CUDA.
        address: the Ray cluster to join when Ray is not initialised (``"auto"``: the one
            ``ray start`` runs on this machine; ``"ray://host:10001"``: a remote one; None: start a
            local instance).
        client_timeout: seconds per client of a worker call (its deadline is this times its
            clients, capped by ``round_timeout``); None: the simulation's ``client_timeout``.
        round_timeout: seconds for all of a round's worker calls, retries included; None: no limit.
        retries: times a dead worker's clients are retried on another worker in the same round (0 or 1).
        partial_sums_for: the strategy object passed to ``run_simulation`` (the same object: the
            backend cannot see which strategy aggregates, and partial sums made for FedAvg are not
            clipped as a DP wrapper needs); when it is mean-type or ``DPFedAvgFixed``, workers
            return partial sums instead of updates (module docstring). None: per-client updates.
        init_kwargs: other arguments of ``ray.init`` when this backend has to start Ray.
    """

    name = "ray"

    def __init__(self, *, num_workers: Optional[int] = None, cpus_per_worker: int = 1, num_gpus: float = 0.0,
                 address: Optional[str] = None, client_timeout: Optional[float] = None,
                 round_timeout: Optional[float] = None, retries: int = 1, partial_sums_for: Any = None,
                 init_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        for arg, v in (("num_workers", num_workers), ("cpus_per_worker", cpus_per_worker)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{arg} must be an int >= 1; got {v!r}")
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, numbers.Real) or not 0 <= float(num_gpus) < math.inf:
            raise ValueError(f"num_gpus must be a number >= 0; got {num_gpus!r}")
        if retries not in (0, 1) or isinstance(retries, bool):
            raise ValueError(f"retries must be 0 or 1; got {retries!r}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str or None; got {type(address).__name__}")
        if partial_sums_for is not None:
            from ..strategy.base import Strategy
            if not isinstance(partial_sums_for, Strategy):
                raise TypeError("partial_sums_for must be the run's ppml_fast.federated.Strategy or None; "
                                f"got {type(partial_sums_for).__name__}")
        self.num_workers = num_workers
        self.cpus_per_worker = int(cpus_per_worker)
        self.num_gpus = float(num_gpus)
        self.address = address
        self.client_timeout = _limit("client_timeout", client_timeout)
        self.round_timeout = _limit("round_timeout", round_timeout)
        self.retries = int(retries)
        self.partial_sums_for = partial_sums_for
        default = {"log_to_driver": False} if address else {"include_dashboard": False, "log_to_driver": False}
        self.init_kwargs = dict(init_kwargs or default)
        self._workers: list = []
        self._dead: set[int] = set()  # workers lost (died, or killed at a deadline)
        self._pending: list = []  # adoptions not answered yet
        self._started_ray = False

    # ------------------------------------------------------------------ setup

    def setup(self, clients: Sequence[Client], model_fn: Callable[[], nn.Module]) -> None:
        super().setup(clients, model_fn)
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
            self._started_ray = True
        n = self.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.cpus_per_worker)
        n = min(n, len(self.clients))
        actor = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.num_gpus)(RayWorker)
        device = "cuda" if self.num_gpus > 0 else "cpu"
        self._workers = [actor.remote(model_fn, self.cpus_per_worker, device) for _ in range(n)]
        self._dead = set()
        self._pending: list = []
        self._home = [i % n for i in range(len(self.clients))]  # client i's worker
        self._adopted([x for w in range(n) for x in self._adopt(w, list(range(w, len(self.clients), n)))])

    def _adopt(self, w: int, indices: list[int]) -> list[tuple[Any, list]]:
        """Send worker ``w`` the clients at ``indices`` (objects, or a spec's shard ids, with the
        driver's local-DP state); returns (ref, entries) pairs for :meth:`_adopted`."""
        specs: dict[int, tuple[Any, list]] = {}
        objects = []
        for i in indices:
            c = self.clients[i]
            if isinstance(c, SpecClient):
                specs.setdefault(id(c.spec), (c.spec.factory, []))[1].append((i, (c.shard, c.cid), c._local_dp))
            else:
                objects.append((i, c, c._local_dp))
        sent = [(self._workers[w].add.remote(objects), objects)] if objects else []
        return sent + [(self._workers[w].add.remote(entries, factory), entries)
                       for factory, entries in specs.values()]

    def _adopted(self, sent: list[tuple[Any, list]], wait: bool = True) -> None:
        """Record what the workers report of each adopted spec client (its size, and whether it
        trains with ``Client.fit``: the conservative record of a lost fit needs both). ``wait``:
        block until every adoption is answered; else (an adopter may be busy training: its next
        call queues behind the adoption anyway) record the answers that are there and keep the
        rest for later (until then a lost fit of such a client counts as unbounded spend)."""
        ray = import_ray()
        self._pending += sent
        if not self._pending:
            return
        refs = [ref for ref, _ in self._pending]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)[0])
        keep = []
        for ref, entries in self._pending:
            if ref not in ready:
                keep.append((ref, entries))
                continue
            try:
                answer = ray.get(ref)
            except Exception:  # at setup: raised (e.g. the factory failed); later: the adopter
                if wait:       # died, and its fit calls fail and are handled there
                    raise
                continue
            for (i, _, _), (n, default_fit) in zip(entries, answer):
                c = self.clients[i]
                if isinstance(c, SpecClient):
                    c._n, c._default_fit = n, default_fit
        self._pending = keep

    # ------------------------------------------------------------------ fit

    def _mode(self) -> tuple[Optional[str], Optional[float]]:
        s = self.partial_sums_for
        if s is None:
            return None, None
        from ..dp.fixed import DPFedAvgFixed
        if type(s) is DPFedAvgFixed:
            return "clip", float(s.round_clip_norm())
        if type(s).__name__ in _MEAN_TYPES and type(s).__module__.startswith("ppml_fast.federated.strategy"):
            return "mean", None
        return None, None

    def fit(self, indices: Sequence[int], parameters: torch.Tensor,
            configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        ray = import_ray()
        mode, clip = self._mode()
        self._adopted([], wait=False)
        params_ref = ray.put(parameters)
        outcomes: list[Optional[Outcome]] = [None] * len(indices)
        todo = [(pos, i, {k: v for k, v in config.items() if k not in ("model", "model_fn")})
                for pos, (i, config) in enumerate(zip(indices, configs))]  # the worker has its model
        start = time.perf_counter()
        for attempt in range(1 + self.retries):
            if attempt and self.round_timeout is not None and time.perf_counter() >= start + self.round_timeout:
                break  # no time left for a retry: those clients keep their worker's error
            todo = self._run(todo, params_ref, mode, clip, outcomes, start, retry=attempt < self.retries)
            if not todo:
                break
        return outcomes  # type: ignore[return-value]

    def _run(self, todo: list, params_ref: Any, mode: Optional[str], clip: Optional[float],
             outcomes: list, start: float, retry: bool) -> list:
        """One pass: send each live worker its clients of ``todo``, collect answers until the
        deadlines; fill ``outcomes``. Returns the items to retry (their worker died, and a live
        worker adopted them)."""
        ray = import_ray()
        plan: dict[int, list] = {}
        for item in todo:
            plan.setdefault(self._home[item[1]], []).append(item)
        calls, deadline = {}, {}
        round_end = math.inf if self.round_timeout is None else start + self.round_timeout
        for w, items in plan.items():
            if w in self._dead:  # sent nothing: these clients did not train
                error = RuntimeError(f"Ray worker {w} died in an earlier round; its clients cannot train")
                for pos, _, _ in items:
                    outcomes[pos] = Outcome(None, error, 0.0)
                continue
            limit = self.client_timeout if self.client_timeout is not None else self.deadline
            ref = self._workers[w].fit.remote([i for _, i, _ in items], params_ref, [c for _, _, c in items],
                                              mode, clip, limit)
            calls[ref] = w
            per = math.inf if limit is None else limit * len(items)
            deadline[ref] = min(round_end, time.perf_counter() + per)
        retry_items, pending = [], list(calls)
        while pending:
            wait = max(0.0, min(deadline[r] for r in pending) - time.perf_counter())
            ready, pending = ray.wait(pending, num_returns=1, timeout=None if math.isinf(wait) else wait)
            for ref in ready:
                w = calls[ref]
                try:
                    answer = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError) as e:  # the worker is gone
                    self._fail(w, plan[w], e, outcomes)
                    if self._lose(w) and retry:
                        retry_items.extend(plan[w])
                    continue
                except Exception as e:  # the worker's code raised: its clients fail with it
                    self._fail(w, plan[w], e, outcomes)
                    continue
                self._collect(plan[w], answer, mode, outcomes)
            now = time.perf_counter()
            for ref in [r for r in pending if deadline[r] <= now]:
                w = calls[ref]
                pending.remove(ref)
                ray.kill(self._workers[w])  # hung or too slow: it cannot be interrupted otherwise
                limit = deadline[ref] - start
                self._fail(w, plan[w], TimeoutError(f"Ray worker {w} missed its deadline ({limit:.3g} s after "
                                                    f"the round started); it was stopped"), outcomes,
                           late=self.deadline is not None)
                self._lose(w)
        return retry_items

    def _fail(self, w: int, items: list, error: BaseException, outcomes: list, late: bool = False) -> None:
        """The clients of a failed call: the error, and for local DP the conservative record (the
        call may have trained them before it failed; its report of their state never came)."""
        error = portable(error)
        for pos, i, config in items:  # whatever failed, the worker's report of the fit is lost
            state, spent = _lost_fit(self.clients[i], config)
            if state is not None:
                self.clients[i]._local_dp = state
            # late, under the simulation's client_timeout: no error and infinite time, which the
            # simulation reads as "timeout" (as the sequential backend's abandoned fits)
            outcomes[pos] = Outcome(None, None, math.inf, epsilon=spent) if late else \
                Outcome(None, error, 0.0, epsilon=spent)

    def _lose(self, w: int) -> bool:
        """Worker ``w`` is gone: the live workers adopt its clients. False when none is left."""
        self._dead.add(w)
        live = [v for v in range(len(self._workers)) if v not in self._dead]
        if not live:
            return False
        moved = [i for i, h in enumerate(self._home) if h == w]
        sent = []
        for k, v in enumerate(live):
            share = moved[k::len(live)]
            for i in share:
                self._home[i] = v
            if share:
                sent.extend(self._adopt(v, share))
        self._adopted(sent, wait=False)
        return True

    def _collect(self, items: list, answer: dict, mode: Optional[str], outcomes: list) -> None:
        carrier = None
        if answer["count"]:
            total, weight = answer["sum"], answer["weight"]
            carrier = (total / weight if weight > 0 else total).to(torch.float32)
        for (pos, i, _), (result, error, seconds, finite, spent, state, summed) in zip(items, answer["clients"]):
            if summed:  # one shared tensor: the group's mean (module docstring)
                n, metrics = result
                result = FitResult(update=carrier, num_examples=n, metrics=metrics)
            outcomes[pos] = Outcome(result, error, seconds, finite, epsilon=spent)
            if state is not None:  # the client's local-DP accountant and noise offset: kept on the
                # driver's Client too, so a retry, a rebuild or a later simulation goes on from them
                self.clients[i]._local_dp = state

    def close(self) -> None:
        if not self._workers and not self._started_ray:
            return
        ray = import_ray()
        for w in self._workers:
            ray.kill(w)
        self._workers = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

"""Client groups on Ray workers: each worker (a Ray actor) holds a fixed group of clients and
runs ``Client.fit`` on the selected ones of its group, one after the other, as the sequential
backend does.

The clients (with their data) go to the workers once, in :meth:`RayBackend.setup`
(``ray.put`` of each group); each round only the parameters (one ``ray.put``) and the configs
travel. A client's state changed by training (a local-DP accountant and noise offset) lives on
its worker, as on a device, and is copied back to the driver's ``Client`` after each fit, so
that a later simulation with the same clients composes with it. A client that raised reports,
from its worker, the ε its accountant has spent (:func:`~.base.failed_client_epsilon`). A worker
that dies takes its clients' state with it: for each of its clients in that round, the driver
records the conservative bound of :func:`~ppml_fast.federated.dp.local.state_after_lost_fit` (the
whole fit composed) as the client's state and spent ε (``inf`` for a client whose class
overrides ``fit``: how it trains is not known to the driver); in later rounds the dead worker's
clients fail at once, without being sent to it (nothing trained, nothing more spent).

Ray is optional: ``pip install 'ppml_fast[ray]'``. When Ray is not running yet, :meth:`setup`
starts a local instance (``ray.init(**init_kwargs)``) and :meth:`close` shuts it down again; an
instance started by the caller is left running.
"""

from __future__ import annotations

import math
import numbers
import pickle
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..client import Client, fit_settings
from ..dp.local import LocalDP, LocalDPState, state_after_lost_fit
from .base import Backend, Outcome, fit_one, make_model

__all__ = ["RayBackend", "import_ray"]


def import_ray():
    """The ``ray`` module, or ImportError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("backend 'ray' needs Ray, an optional dependency: "
                          "pip install 'ppml_fast[ray]'") from e
    return ray


def _portable(e: BaseException) -> BaseException:
    """``e`` if it pickles (it travels back to the driver), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Worker:
    """The body of one Ray actor: a group of clients and a scratch model."""

    def __init__(self, clients: list[Client], model_fn: Callable[[], nn.Module], threads: int) -> None:
        torch.set_num_threads(threads)
        self.clients = clients
        self.model = make_model(model_fn)

    def fit(self, local: list[int], parameters: torch.Tensor,
            configs: list[dict]) -> list[tuple[Any, Optional[BaseException], float, Any, Optional[float]]]:
        out = []
        for j, config in zip(local, configs):
            o = fit_one(self.clients[j], parameters, {**config, "model": self.model})
            out.append((o.result, None if o.error is None else _portable(o.error), o.seconds,
                        getattr(self.clients[j], "_local_dp", None), o.epsilon))
        return out


def _lost_fit(client: Client, config: Mapping[str, Any]) -> tuple[Optional[LocalDPState], Optional[float]]:
    """(state, spent ε) to record for a local-DP client whose worker died during its fit: the
    conservative bound of ``state_after_lost_fit``; (None, None) without local DP. A client
    whose class overrides ``fit`` may train other than its config says, so its spend is
    unknown: (None, inf)."""
    local_dp = config.get("local_dp")
    if not isinstance(local_dp, LocalDP):
        return None, None
    if type(client).fit is not Client.fit:
        return None, math.inf
    try:
        s = fit_settings(config)
    except Exception:  # Client.fit refuses such a config before training: nothing spent
        return None, client.local_epsilon(local_dp.delta)
    state = state_after_lost_fit(client._local_dp, local_dp, client.num_examples, s["batch_size"],
                                 s["local_epochs"])
    return state, state.epsilon(local_dp.delta)


class RayBackend(Backend):
    """Clients split round-robin over ``num_workers`` Ray actors (default: the cluster's CPUs).

    Args:
        num_workers: number of actors (each reserves ``cpus_per_worker`` CPUs).
        cpus_per_worker: CPUs per actor, also its torch thread count.
        init_kwargs: arguments of ``ray.init`` when this backend has to start Ray.
    """

    name = "ray"

    def __init__(self, *, num_workers: Optional[int] = None, cpus_per_worker: int = 1,
                 init_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        for arg, v in (("num_workers", num_workers), ("cpus_per_worker", cpus_per_worker)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{arg} must be an int >= 1; got {v!r}")
        self.num_workers = num_workers
        self.cpus_per_worker = int(cpus_per_worker)
        self.init_kwargs = dict(init_kwargs or {"include_dashboard": False, "log_to_driver": False})
        self._workers: list = []
        self._dead: set[int] = set()  # workers that died (their clients' state went with them)
        self._started_ray = False

    def setup(self, clients: Sequence[Client], model_fn: Callable[[], nn.Module]) -> None:
        super().setup(clients, model_fn)
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(**self.init_kwargs)
            self._started_ray = True
        n = self.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.cpus_per_worker)
        n = min(n, len(self.clients))
        actor = ray.remote(num_cpus=self.cpus_per_worker)(_Worker)
        self._home = [(i % n, i // n) for i in range(len(self.clients))]  # (worker, position there)
        self._workers = [
            actor.remote(ray.put(self.clients[w::n]), model_fn, self.cpus_per_worker) for w in range(n)
        ]
        self._dead = set()

    def fit(self, indices: Sequence[int], parameters: torch.Tensor,
            configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        ray = import_ray()
        params_ref = ray.put(parameters)
        plan: dict[int, list[tuple[int, int, dict]]] = {}
        for pos, (i, config) in enumerate(zip(indices, configs)):
            w, j = self._home[i]
            lean = {k: v for k, v in config.items() if k not in ("model", "model_fn")}  # the worker has its model
            plan.setdefault(w, []).append((pos, j, lean))
        calls = {w: self._workers[w].fit.remote([j for _, j, _ in items], params_ref,
                                                [c for _, _, c in items])
                 for w, items in plan.items() if w not in self._dead}
        outcomes: list[Optional[Outcome]] = [None] * len(indices)
        for w in plan.keys() & self._dead:  # sent nothing: these clients did not train
            error = RuntimeError(f"Ray worker {w} died in an earlier round; its clients cannot train")
            for pos, _, _ in plan[w]:
                outcomes[pos] = Outcome(None, error, 0.0)
        for w, ref in calls.items():
            start = time.perf_counter()
            try:
                answers = ray.get(ref)
            except Exception as e:  # the worker failed: its clients all fail with it
                if isinstance(e, ray.exceptions.RayActorError):
                    self._dead.add(w)
                error, seconds = _portable(e), time.perf_counter() - start
                answers = [(None, error, seconds, *_lost_fit(self.clients[indices[pos]], config))
                           for pos, _, config in plan[w]]
            for (pos, _, _), (result, error, seconds, state, spent) in zip(plan[w], answers):
                outcomes[pos] = Outcome(result, error, seconds, epsilon=spent)
                if state is not None:  # the client's local-DP accountant and noise offset: kept on
                    # the driver's Client too, so a later simulation with these clients goes on
                    # from them (not from a fresh accountant and offset 0)
                    self.clients[indices[pos]]._local_dp = state
        return outcomes  # type: ignore[return-value]

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

"""Client groups on Ray workers: each worker (a Ray actor) holds a fixed group of clients and
runs ``Client.fit`` on the selected ones of its group, one after the other, as the sequential
backend does.

The clients (with their data) go to the workers once, in :meth:`RayBackend.setup`
(``ray.put`` of each group); each round only the parameters (one ``ray.put``) and the configs
travel. A client's state changed by training (a local-DP accountant and noise offset) lives on
its worker, as on a device, and is copied back to the driver's ``Client`` after each fit, so
that a later simulation with the same clients composes with it. Ray is optional: ``pip install 'ppml_fast[ray]'``. When Ray is not
running yet, :meth:`setup` starts a local instance (``ray.init(**init_kwargs)``) and
:meth:`close` shuts it down again; an instance started by the caller is left running.
"""

from __future__ import annotations

import numbers
import pickle
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..client import Client
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
            configs: list[dict]) -> list[tuple[Any, Optional[BaseException], float, Any]]:
        out = []
        for j, config in zip(local, configs):
            o = fit_one(self.clients[j], parameters, {**config, "model": self.model})
            out.append((o.result, None if o.error is None else _portable(o.error), o.seconds,
                        getattr(self.clients[j], "_local_dp", None)))
        return out


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
                 for w, items in plan.items()}
        outcomes: list[Optional[Outcome]] = [None] * len(indices)
        for w, ref in calls.items():
            start = time.perf_counter()
            try:
                answers = ray.get(ref)
            except Exception as e:  # the worker itself died: its clients all fail with it
                answers = [(None, _portable(e), time.perf_counter() - start, None)] * len(plan[w])
            for (pos, _, _), (result, error, seconds, state) in zip(plan[w], answers):
                outcomes[pos] = Outcome(result, error, seconds)
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

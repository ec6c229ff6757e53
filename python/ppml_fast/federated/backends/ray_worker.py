"""The body of one :class:`~.ray_backend.RayBackend` actor: it holds a group of clients (sent as
objects, or built here from a :class:`~.ray_specs.ClientSpec`'s factory and shard ids), trains the
selected ones, and answers per client plus, in partial-sum mode, one sum for the whole group.

Training: the vectorized backend (:mod:`.vectorized`) over the worker's clients, so a worker
trains its group together; what it refuses falls back to ``Client.fit`` one by one, as the
sequential backend does: a model it cannot train (set once, at the first fit), a config with
``local_dp`` or a loss other than cross-entropy, and clients whose class overrides ``fit``.

Partial sums (``mode``): the clients trained together by the vectorized backend that succeeded
with a finite update enter one sum, and only that sum travels back:
- ``"mean"``: ``S = sum_i n_i u_i`` (float64) and ``W = sum_i n_i`` (``n_i``: examples);
- ``"clip"``: ``S = sum_i clip_C(u_i)`` and ``W`` = the number of clients, each update clipped to
  L2 norm ``C`` (the server's clip norm) by the native ``weighted_aggregate`` op, the same
  clipping DP-FedAvg applies on the server (McMahan et al. 2018, Alg. 1).
Those clients all report the group's mean time (their updates are in one sum: a deadline drops all
of them or none, so the sum never holds a client the simulation left out). Every other client
(fallback, failed, non-finite) answers with its own update, as without partial sums.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ppml_fast.ops import weighted_aggregate

from ..client import Client
from ..deadline import DeadlineRunner
from .base import Outcome
from .ray_specs import build_client
from .vectorized import VectorizedBackend

__all__ = ["RayWorker", "portable"]


def portable(e: BaseException) -> BaseException:
    """``e`` if it pickles (it travels back to the driver), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class RayWorker:
    """One actor: ``clients`` by key, a scratch model, a vectorized backend over the clients."""

    def __init__(self, model_fn: Callable[[], nn.Module], threads: int, device: str = "cpu") -> None:
        torch.set_num_threads(threads)
        self.model_fn, self.device = model_fn, device
        self._runner = DeadlineRunner(model_fn)  # one-by-one fits, abandoned at a deadline
        self.clients: dict[int, Client] = {}
        self._vec: Any = None  # VectorizedBackend over self._order, False if it refused the model
        self._order: list[int] = []

    def add(self, entries: list[tuple[int, Any, Any]], factory: Any = None) -> list[tuple[int, bool]]:
        """Adopt clients: ``(key, client, local_dp_state)`` with a Client object, or
        ``(key, (shard, cid), local_dp_state)`` built here by ``factory``. Returns, per entry,
        (num_examples, whether it trains with ``Client.fit``) for the driver's records."""
        out = []
        for key, what, state in entries:
            c = what if isinstance(what, Client) else build_client(factory, what[0], what[1])
            if state is not None:  # the driver's record (a lost fit counted conservatively)
                c._local_dp = state
            self.clients[key] = c
            out.append((c.num_examples, type(c).fit is Client.fit))
        if self._vec is not False:
            self._vec = None  # rebuilt with the new clients at the next fit
        return out

    def ping(self) -> bool:
        return True

    def _vectorized(self) -> Any:
        if self._vec is None:
            vb = VectorizedBackend(device=self.device)
            self._order = list(self.clients)
            try:
                vb.setup([self.clients[k] for k in self._order], self.model_fn)
                self._vec = vb
                self._pos = {k: i for i, k in enumerate(self._order)}
            except ValueError:  # a model it cannot train: every client trains one by one
                self._vec = False
        return self._vec

    def fit(self, keys: list[int], parameters: torch.Tensor, configs: list[dict],
            mode: Optional[str] = None, clip: Optional[float] = None, deadline: Optional[float] = None) -> dict:
        """Train ``clients[keys[i]]`` with ``configs[i]``; a one-by-one fit past ``deadline``
        seconds is abandoned as the sequential backend does (:mod:`ppml_fast.federated.deadline`:
        ``seconds = inf``, the simulation reads "timeout"). Returns ``{"clients": [per client:
        (result or None, error, seconds, finite, epsilon, local_dp_state, summed)], "sum": S or
        None, "weight": W, "count": k}``; a summed client's result carries no update."""
        outcomes: list[Optional[Outcome]] = [None] * len(keys)
        vec_items = []
        vb = self._vectorized()
        for pos, (k, config) in enumerate(zip(keys, configs)):
            if vb is False or config.get("local_dp") is not None or config.get("loss_fn") not in (
                    None, F.cross_entropy):  # what the vectorized backend refuses, before it trains any
                outcomes[pos] = self._runner.fit(self.clients[k], parameters, config, deadline)
            else:
                vec_items.append(pos)
        vectorized: set[int] = set()
        if vec_items:
            try:
                vb.deadline = deadline
                got = vb.fit([self._pos[keys[p]] for p in vec_items], parameters, [configs[p] for p in vec_items])
                for p, o in zip(vec_items, got):
                    outcomes[p] = o
                    if vb._where[self._pos[keys[p]]] is not None:  # trained together, not by its own fit
                        vectorized.add(p)
            except ValueError:  # a setting it refuses (e.g. another loss_fn): one by one
                for p in vec_items:
                    outcomes[p] = self._runner.fit(self.clients[keys[p]], parameters, configs[p], deadline)
        summed = [p for p in sorted(vectorized) if outcomes[p].error is None and outcomes[p].finite is not False]
        if mode is not None and summed:
            total, weight = self._partial_sum([outcomes[p].result for p in summed], mode, clip)
            seconds = sum(outcomes[p].seconds for p in summed) / len(summed)
        else:
            summed, total, weight, seconds = [], None, 0.0, 0.0
        in_sum = set(summed)
        answers = []
        for p, (k, o) in enumerate(zip(keys, outcomes)):
            r, s = o.result, o.seconds
            if p in in_sum:  # numbers only: the update is in the sum
                r, s = (r.num_examples, dict(r.metrics)), seconds
            answers.append((r, None if o.error is None else portable(o.error), s, o.finite, o.epsilon,
                            getattr(self.clients[k], "_local_dp", None), p in in_sum))
        return {"clients": answers, "sum": total, "weight": weight, "count": len(summed)}

    @staticmethod
    def _partial_sum(results: list, mode: str, clip: Optional[float]) -> tuple[torch.Tensor, float]:
        updates = torch.stack([r.update.to(torch.float32) for r in results])
        if mode == "mean":
            w = torch.tensor([float(r.num_examples) for r in results], dtype=torch.float64)
            return (updates.double() * w[:, None]).sum(0), float(w.sum())
        if mode == "clip":  # the server's per-client clipping, here, before the sum
            k = len(results)
            mean, _ = weighted_aggregate(updates, torch.ones(k, dtype=torch.float64), clip_norm=clip)
            return mean.double() * k, float(k)
        raise ValueError(f"mode must be None, 'mean' or 'clip'; got {mode!r}")

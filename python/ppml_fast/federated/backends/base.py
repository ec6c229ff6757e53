"""The backend interface of :func:`~ppml_fast.federated.run_simulation`: who runs the selected
clients' ``fit`` and how.

A backend is the simulated device side. ``setup(clients, model_fn)`` hands it the client
objects once per simulation (a backend may copy their data to workers, or read it to train
many clients together); each round ``fit(indices, parameters, configs)`` trains the clients at
those positions of the list from the same flat ``parameters``, client ``indices[i]`` with
``configs[i]``, and returns one :class:`Outcome` per client in the same order: its
:class:`~ppml_fast.federated.types.FitResult` or the exception it raised, and the wall time
attributed to it (the simulation's straggler deadline compares with it). A backend never
raises for a client's failure; the simulation turns outcomes into results and reasons.

Privacy of a failed client (local DP): a client that raises after some DP-SGD steps has composed
them into its own accountant (its noise was drawn, its data touched), so its outcome carries
``epsilon``, what that accountant says it has spent, and the simulation counts it as it counts a
successful client's ``metrics["epsilon"]``: the record never understates a client's budget,
although the failed update itself is discarded.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..client import Client
from ..dp.local import LocalDP
from ..types import FitResult

__all__ = ["Backend", "Outcome", "failed_client_epsilon", "fit_one", "make_model"]


@dataclass(frozen=True)
class Outcome:
    """One client's answer: ``result`` (None when it raised), ``error`` (the exception, or
    None), ``seconds`` (wall time attributed to this client; ``inf`` for a fit abandoned at the
    deadline, :mod:`ppml_fast.federated.deadline`), ``finite`` (whether every
    entry of the update is finite, when the backend checked it for many clients at once;
    None: the simulation checks) and ``epsilon`` (for a client that raised under local DP:
    the ε at ``local_dp.delta`` its own accountant has spent, the failed fit's steps included,
    see :func:`failed_client_epsilon`; for a fit abandoned at the deadline, the conservative
    bound of :mod:`ppml_fast.federated.deadline`; None otherwise — a result reports its ε in
    its metrics)."""

    result: Optional[FitResult]
    error: Optional[BaseException]
    seconds: float
    finite: Optional[bool] = None
    epsilon: Optional[float] = None


def make_model(model_fn: Callable[[], nn.Module]) -> nn.Module:
    """``model_fn()`` without touching torch's global RNG (the scratch model's initial weights
    are overwritten by every fit), checked to be an ``nn.Module``."""
    with torch.random.fork_rng(devices=[]):
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return a torch.nn.Module; got {type(model).__name__}")
    return model


def failed_client_epsilon(client: Client, config: Mapping[str, Any]) -> Optional[float]:
    """What a client whose fit raised has spent, as its own accountant says, at the delta of
    ``config["local_dp"]``; None without local DP or before the client's first DP step.

    Device-side: the simulated device answers from its own state (``Client.local_epsilon``). If
    that state cannot be read, the answer is ``inf``: the spent budget is unknown, and the record
    must not understate it."""
    local_dp = config.get("local_dp")
    if not isinstance(local_dp, LocalDP):
        return None
    try:
        return client.local_epsilon(local_dp.delta)
    except Exception:  # an unreadable accountant: unknown spend, counted as unbounded
        return math.inf


def fit_one(client: Client, parameters: torch.Tensor, config: Mapping[str, Any]) -> Outcome:
    """``client.fit`` timed with ``time.perf_counter``; an exception becomes the outcome (with
    the client's spent ε under local DP: :func:`failed_client_epsilon`)."""
    start = time.perf_counter()
    try:
        result = client.fit(parameters, config)
        if not isinstance(result, FitResult):
            raise TypeError(f"Client.fit must return a FitResult; got {type(result).__name__}")
    except Exception as e:  # a failing client is a fault to report, not a crash
        seconds = time.perf_counter() - start
        return Outcome(None, e, seconds, epsilon=failed_client_epsilon(client, config))
    return Outcome(result, None, time.perf_counter() - start)


class Backend(abc.ABC):
    """Runs the selected clients' local training. Subclasses implement :meth:`fit`."""

    #: the name ``run_simulation(backend=...)`` knows this backend by
    name: str = ""
    #: ``run_simulation(client_timeout=...)``, set by the simulation before the first round: a
    #: backend that can enforce it abandons a fit past it (``Outcome.seconds = inf``, see
    #: :mod:`ppml_fast.federated.deadline`); the simulation drops any outcome slower than it
    deadline: Optional[float] = None

    def setup(self, clients: Sequence[Client], model_fn: Callable[[], nn.Module]) -> None:
        """Called once per simulation before the first round."""
        self.clients = list(clients)
        self.model_fn = model_fn

    @abc.abstractmethod
    def fit(self, indices: Sequence[int], parameters: torch.Tensor,
            configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """Train ``clients[indices[i]]`` from ``parameters`` with ``configs[i]``; one outcome each."""

    def close(self) -> None:
        """Called once when the simulation ends (also after an error): free workers."""

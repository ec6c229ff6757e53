"""The reference backend: ``Client.fit`` of one client after the other, in this process.

One scratch model (built once by ``model_fn``) is lent to every fit as ``config["model"]``;
``Client.fit`` loads the received parameters into it first, so no state leaks between clients.
Each client's wall time is measured around its ``fit`` call; with a deadline
(``client_timeout``) each fit runs in its own thread and is abandoned when it passes it
(:mod:`ppml_fast.federated.deadline`: the cost, and why an abandoned fit cannot touch the round).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..client import Client
from ..deadline import DeadlineRunner
from .base import Backend, Outcome

__all__ = ["SequentialBackend"]


class SequentialBackend(Backend):
    """Clients trained one by one with their own ``fit`` (the reference of the other backends)."""

    name = "sequential"

    def setup(self, clients: Sequence[Client], model_fn: Callable[[], nn.Module]) -> None:
        super().setup(clients, model_fn)
        self._runner = DeadlineRunner(model_fn)
        self._runner.scratch()  # built now: a model_fn that fails, fails before round 1

    def fit(self, indices: Sequence[int], parameters: torch.Tensor,
            configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return [self._runner.fit(self.clients[i], parameters, config, self.deadline)
                for i, config in zip(indices, configs)]

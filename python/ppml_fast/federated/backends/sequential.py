"""The reference backend: ``Client.fit`` of one client after the other, in this process.

One scratch model (built once by ``model_fn``) is lent to every fit as ``config["model"]``;
``Client.fit`` loads the received parameters into it first, so no state leaks between clients.
Each client's wall time is measured around its ``fit`` call (the straggler deadline).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..client import Client
from .base import Backend, Outcome, fit_one, make_model

__all__ = ["SequentialBackend"]


class SequentialBackend(Backend):
    """Clients trained one by one with their own ``fit`` (the reference of the other backends)."""

    name = "sequential"

    def setup(self, clients: Sequence[Client], model_fn: Callable[[], nn.Module]) -> None:
        super().setup(clients, model_fn)
        self._model = make_model(model_fn)

    def fit(self, indices: Sequence[int], parameters: torch.Tensor,
            configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return [fit_one(self.clients[i], parameters, {**config, "model": self._model})
                for i, config in zip(indices, configs)]

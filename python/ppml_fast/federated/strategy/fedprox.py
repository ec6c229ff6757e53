"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith 2020, "Federated Optimization in
Heterogeneous Networks", MLSys, Algorithm 2): FedAvg's aggregation, with each client
minimising its loss plus ``proximal_mu / 2 * ||w - w_t||^2`` (eq. 2) locally."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..types import ClientProxy
from ._hparams import check_real
from .base import Instructions
from .fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedAvg whose :meth:`configure_fit` attaches ``{"proximal_mu": proximal_mu}`` to every
    selected client's config (Flower's ``FedProx``: ``proximal_mu`` is required, keyword-only).
    :meth:`ppml_fast.federated.Client.fit` adds the proximal gradient
    ``proximal_mu * (w - w_t)`` to every local SGD step; ``proximal_mu = 0`` is FedAvg."""

    def __init__(self, *, proximal_mu: float, min_fit_clients: int = 1) -> None:
        mu = check_real("proximal_mu", proximal_mu, lo=0.0)
        super().__init__(min_fit_clients=min_fit_clients)
        self.proximal_mu = mu

    def configure_fit(self, server_round: int, parameters: torch.Tensor,
                      clients: Sequence[ClientProxy], num_clients: int,
                      rng: np.random.Generator) -> Instructions:
        pairs = super().configure_fit(server_round, parameters, clients, num_clients, rng)
        return [(proxy, {**config, "proximal_mu": self.proximal_mu}) for proxy, config in pairs]

"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2, Adam
line) with Flower 1.42's defaults and its bias-corrected server step."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .fedopt import FedOpt

__all__ = ["FedAdam"]


class FedAdam(FedOpt):
    """``v_t = beta_2 v_{t-1} + (1 - beta_2) Δ_t²``; the server step of round ``t`` is
    ``eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))``.

    That step is Flower's (``FedAdam.aggregate_fit``): Adam's bias correction (Kingma & Ba
    2015, Algorithm 1) evaluated at ``server_round + 1``; Reddi et al.'s Algorithm 2 has no
    bias correction. Kept for parity with Flower. Defaults are Flower's: ``eta=0.1``,
    ``beta_1=0.9``, ``beta_2=0.99``, ``tau=1e-9``.
    """

    def __init__(self, *, eta: float = 1e-1, eta_l: Optional[float] = None, beta_1: float = 0.9,
                 beta_2: float = 0.99, tau: float = 1e-9, min_fit_clients: int = 1) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau,
                         min_fit_clients=min_fit_clients)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v.mul_(self.beta_2).addcmul_(delta, delta, value=1.0 - self.beta_2)

    def step_size(self, server_round: int) -> float:
        t = server_round + 1.0
        return self.eta * math.sqrt(1.0 - self.beta_2 ** t) / (1.0 - self.beta_1 ** t)

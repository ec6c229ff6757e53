"""FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2, Yogi
line; Zaheer et al. 2018 for Yogi) with Flower 1.42's defaults."""

from __future__ import annotations

from typing import Optional

import torch

from .fedopt import FedOpt

__all__ = ["FedYogi"]


class FedYogi(FedOpt):
    """``v_t = v_{t-1} - (1 - beta_2) Δ_t² sign(v_{t-1} - Δ_t²)``, server step ``eta``.

    ``v`` starts at 0 as in Flower (Reddi et al. start it at ``tau²``; the difference fades
    after the first round). Defaults are Flower's: ``eta=1e-2``, ``beta_1=0.9``,
    ``beta_2=0.99``, ``tau=1e-3``.
    """

    def __init__(self, *, eta: float = 1e-2, eta_l: Optional[float] = None, beta_1: float = 0.9,
                 beta_2: float = 0.99, tau: float = 1e-3, min_fit_clients: int = 1) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau,
                         min_fit_clients=min_fit_clients)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        d2 = delta * delta
        return v.sub_(d2 * torch.sign(v - d2), alpha=1.0 - self.beta_2)

"""FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2,
Adagrad line) with Flower 1.42's defaults."""

from __future__ import annotations

from typing import Optional

import torch

from .fedopt import FedOpt

__all__ = ["FedAdagrad"]


class FedAdagrad(FedOpt):
    """``v_t = v_{t-1} + Δ_t²``, ``m_t = Δ_t`` (Flower fixes ``beta_1 = 0``), server step
    ``eta``. Defaults are Flower's: ``eta=0.1``, ``tau=1e-9``."""

    def __init__(self, *, eta: float = 1e-1, eta_l: Optional[float] = None, tau: float = 1e-9,
                 min_fit_clients: int = 1) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=0.0, beta_2=0.0, tau=tau,
                         min_fit_clients=min_fit_clients)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v.addcmul_(delta, delta)

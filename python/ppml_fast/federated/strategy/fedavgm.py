"""FedAvgM: FedAvg with server momentum (Hsu, Qi, Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", section 3 / Algorithm
"FedAvgM"), with Flower 1.42's names and defaults (``server_learning_rate=1.0``,
``server_momentum=0.0``)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._hparams import check_real, check_state_vector
from .base import Failures, FitResults, check_results, weighted_mean_update
from .fedavg import FedAvg

__all__ = ["FedAvgM"]


class FedAvgM(FedAvg):
    """Server SGD with momentum on the pseudo-gradient ``g_t = -Δ_t`` (``Δ_t`` = FedAvg's
    weighted mean update)::

        m_t = g_t                         on the first aggregated round
        m_t = server_momentum * m_{t-1} + g_t   afterwards
        w_{t+1} = w_t - server_learning_rate * m_t

    exactly Flower's ``FedAvgM.aggregate_fit`` (torch.optim.SGD's convention, no Nesterov).
    With the defaults (lr 1, momentum 0) this is FedAvg. The momentum vector is server state:
    :meth:`state_dict` / :meth:`load_state_dict` carry it. Flower starts the momentum when
    ``server_round == 1``; here it starts on the first round this strategy aggregates, which
    is the same in a run whose first round is not skipped.
    """

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0,
                 min_fit_clients: int = 1) -> None:
        lr = check_real("server_learning_rate", server_learning_rate, lo=0.0, lo_open=True)
        beta = check_real("server_momentum", server_momentum, lo=0.0, hi=1.0)
        super().__init__(min_fit_clients=min_fit_clients)
        self.server_learning_rate = lr
        self.server_momentum = beta
        self.momentum_vector: Optional[torch.Tensor] = None

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        check_results(results, parameters.numel())
        if self.momentum_vector is not None and self.momentum_vector.numel() != parameters.numel():
            raise ValueError(
                f"parameters has {parameters.numel()} entries but the momentum vector has "
                f"{self.momentum_vector.numel()} (a different model?)")
        pseudo_grad = -weighted_mean_update(results)
        if self.momentum_vector is None:
            momentum = pseudo_grad
        else:
            momentum = self.momentum_vector.mul(self.server_momentum).add_(pseudo_grad)
        self.momentum_vector = momentum
        new = parameters - (self.server_learning_rate * momentum).to(parameters.dtype)
        return new, {}

    def state_dict(self) -> dict[str, Any]:
        """The server momentum (None before the first aggregated round), a copy."""
        m = self.momentum_vector
        return {"momentum_vector": None if m is None else m.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (validated before anything changes)."""
        self.momentum_vector = check_state_vector(state, "momentum_vector", None)

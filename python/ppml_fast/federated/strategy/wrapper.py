"""A strategy around another one (DP-FedAvg, secure aggregation): whatever the wrapper does
not override is the inner strategy's."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..types import ClientProxy, EvalResult
from .base import Failures, Instructions, Strategy

__all__ = ["StrategyWrapper"]


class StrategyWrapper(Strategy):
    """Holds the inner strategy as ``self.strategy`` and delegates every step to it; a subclass
    overrides what it changes (at least :meth:`aggregate_fit`)."""

    def __init__(self, strategy: Strategy) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a ppml_fast.federated.Strategy; got {type(strategy).__name__}")
        self.strategy = strategy

    def initialize_parameters(self, parameters: torch.Tensor) -> torch.Tensor:
        return self.strategy.initialize_parameters(parameters)

    def setup(self, *, num_available_clients: int, clients_per_round: int) -> None:
        self.strategy.setup(num_available_clients=num_available_clients,
                            clients_per_round=clients_per_round)

    def configure_fit(self, server_round: int, parameters: torch.Tensor,
                      clients: Sequence[ClientProxy], num_clients: int,
                      rng: np.random.Generator) -> Instructions:
        return self.strategy.configure_fit(server_round, parameters, clients, num_clients, rng)

    def configure_evaluate(self, server_round: int, parameters: torch.Tensor,
                           clients: Sequence[ClientProxy], num_clients: int,
                           rng: np.random.Generator) -> Instructions:
        return self.strategy.configure_evaluate(server_round, parameters, clients, num_clients, rng)

    def aggregate_evaluate(self, server_round: int, results: Sequence[tuple[ClientProxy, EvalResult]],
                           failures: Failures) -> tuple[Optional[float], dict[str, float]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int,
                 parameters: torch.Tensor) -> Optional[tuple[float, dict[str, float]]]:
        return self.strategy.evaluate(server_round, parameters)

    def epsilon(self, delta: float, *, rounds_ahead: int = 0) -> Optional[float]:
        return self.strategy.epsilon(delta, rounds_ahead=rounds_ahead)

"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1): the new model is the received one plus the mean of the
client updates weighted by their example counts."""

from __future__ import annotations

import torch

from .base import Failures, FitResults, Strategy, check_results, weighted_mean_update

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """``w <- w + sum_k n_k (w_k - w) / sum_k n_k``, the weighted mean through the native
    ``weighted_aggregate`` op. ``min_fit_clients``: rounds with fewer answers are skipped."""

    def __init__(self, *, min_fit_clients: int = 1) -> None:
        if isinstance(min_fit_clients, bool) or not isinstance(min_fit_clients, int) or min_fit_clients < 1:
            raise ValueError(f"min_fit_clients must be an int >= 1; got {min_fit_clients!r}")
        self.min_fit_clients = min_fit_clients

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        check_results(results, parameters.numel())
        mean = weighted_mean_update(results)
        return parameters + mean.to(parameters.dtype), {}

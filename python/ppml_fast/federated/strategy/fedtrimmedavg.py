"""FedTrimmedAvg: the coordinate-wise trimmed mean of the client updates (Yin, Chen,
Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML, Algorithm 1, option II, Definition 2), as Flower 1.42's
``FedTrimmedAvg`` (``beta`` = fraction cut from each end, default 0.2; scipy's trim_mean)."""

from __future__ import annotations

import torch

from ppml_fast.ops import weighted_aggregate

from ._hparams import check_real
from .base import Failures, FitResults, check_results, stack_updates
from .fedavg import FedAvg

__all__ = ["FedTrimmedAvg", "trimmed_mean"]


def trimmed_mean(updates: torch.Tensor, beta: float) -> torch.Tensor:
    """Per coordinate, drop the ``floor(beta * K)`` smallest and largest of the K values and
    average the rest (scipy.stats.trim_mean's cut). One sort over dim 0, then the unweighted
    mean of the middle rows through the native ``weighted_aggregate`` op."""
    beta = check_real("beta", beta, lo=0.0, hi=0.5)
    if updates.dim() != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a (K, P) matrix with K >= 1; got shape {tuple(updates.shape)}")
    k = updates.shape[0]
    cut = int(beta * k)
    middle = updates if cut == 0 else updates.sort(dim=0).values[cut:k - cut]
    mean, _ = weighted_aggregate(middle.contiguous(), torch.ones(k - 2 * cut, dtype=torch.float64))
    return mean


class FedTrimmedAvg(FedAvg):
    """``w <- w + trimmed_mean_k(u_k; beta)``; example counts are ignored (as in Flower).
    ``beta`` in [0, 0.5): with ``beta * K >= f`` the mean tolerates ``f`` Byzantine clients.
    When ``floor(beta * K) = 0`` (few clients) nothing is cut and this is the plain mean."""

    def __init__(self, *, beta: float = 0.2, min_fit_clients: int = 1) -> None:
        beta = check_real("beta", beta, lo=0.0, hi=0.5)
        super().__init__(min_fit_clients=min_fit_clients)
        self.beta = beta

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        check_results(results, parameters.numel())
        mean = trimmed_mean(stack_updates(results), self.beta)
        return parameters + mean.to(parameters.dtype), {}

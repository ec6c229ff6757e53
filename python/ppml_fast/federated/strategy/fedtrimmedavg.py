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
from .report import AggregationReport, coordinate_exclusions

__all__ = ["FedTrimmedAvg", "trimmed_mean"]


def trimmed_mean(updates: torch.Tensor, beta: float, *,
                 with_used: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, drop the ``floor(beta * K)`` smallest and largest of the K values and
    average the rest (scipy.stats.trim_mean's cut). One sort over dim 0, then the unweighted
    mean of the middle rows through the native ``weighted_aggregate`` op. ``with_used=True``
    also returns (K,) how many coordinates of each row entered the mean (the sort's indices:
    K x P int64 more memory)."""
    beta = check_real("beta", beta, lo=0.0, hi=0.5)
    if updates.dim() != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a (K, P) matrix with K >= 1; got shape {tuple(updates.shape)}")
    k = updates.shape[0]
    cut = int(beta * k)
    used = torch.full((k,), updates.shape[1], dtype=torch.long)
    if cut == 0:
        middle = updates
    else:
        ordered = updates.sort(dim=0)
        middle = ordered.values[cut:k - cut]
        if with_used:
            used = torch.bincount(ordered.indices[cut:k - cut].reshape(-1), minlength=k)
    mean, _ = weighted_aggregate(middle.contiguous(), torch.ones(k - 2 * cut, dtype=torch.float64))
    return (mean, used) if with_used else mean


class FedTrimmedAvg(FedAvg):
    """``w <- w + trimmed_mean_k(u_k; beta)``; example counts are ignored (as in Flower).
    ``beta`` in [0, 0.5): with ``beta * K >= f`` the mean tolerates ``f`` Byzantine clients.
    When ``floor(beta * K) = 0`` (few clients) nothing is cut and this is the plain mean.
    ``self.report`` lists, per client, the share of its coordinates that were cut (:mod:`.report`)."""

    def __init__(self, *, beta: float = 0.2, min_fit_clients: int = 1) -> None:
        beta = check_real("beta", beta, lo=0.0, hi=0.5)
        super().__init__(min_fit_clients=min_fit_clients)
        self.beta = beta

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        check_results(results, parameters.numel())
        updates = stack_updates(results)
        mean, used = trimmed_mean(updates, self.beta, with_used=True)
        self.report = AggregationReport(coordinate_exclusions(
            [p.cid for p, _ in results], used, updates.shape[1], "trimmed_mean"))
        return parameters + mean.to(parameters.dtype), {}

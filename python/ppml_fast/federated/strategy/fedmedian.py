"""FedMedian: the coordinate-wise median of the client updates (Yin, Chen, Ramchandran,
Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML, Algorithm 1, option I), as Flower 1.42's ``FedMedian`` (unweighted, numpy's median)."""

from __future__ import annotations

import torch

from .base import Failures, FitResults, check_results, stack_updates
from .fedavg import FedAvg
from .report import AggregationReport, coordinate_exclusions

__all__ = ["FedMedian", "coordinate_median", "median_rows_used"]


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 of a (K, P) matrix, numpy's convention: the middle value for odd K,
    the mean of the two middle values for even K (``torch.median`` alone returns the lower
    one). Vectorised: one or two ``torch.median`` calls (O(K P), no sort)."""
    if updates.dim() != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a (K, P) matrix with K >= 1; got shape {tuple(updates.shape)}")
    lower = updates.median(dim=0).values
    if updates.shape[0] % 2 == 1:
        return lower
    upper = -((-updates).median(dim=0).values)  # the lower median of -u is minus the upper one
    return lower.add_(upper).mul_(0.5)


def median_rows_used(updates: torch.Tensor) -> torch.Tensor:
    """(K,) how many coordinates of each row :func:`coordinate_median` took its value from (the
    middle row for odd K, the two middle rows for even K; on ties, the rows torch.median names).
    The others are what the median left out."""
    k, p = updates.shape
    idx = updates.median(dim=0).indices
    used = torch.bincount(idx, minlength=k)
    if k % 2 == 0:
        upper = (-updates).median(dim=0).indices
        used = used + torch.bincount(upper[upper != idx], minlength=k)
    return used


class FedMedian(FedAvg):
    """``w <- w + median_k(u_k)`` coordinate-wise; example counts are ignored (as in Flower).
    Robust to fewer than half of the clients sending arbitrary updates. Flower takes the
    median of the clients' full parameters ``w + u_k``, which is ``w + median(u_k)``.
    ``self.report`` lists, per client, the share of its coordinates the median did not take
    (:mod:`.report`)."""

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        check_results(results, parameters.numel())
        updates = stack_updates(results)
        median = coordinate_median(updates)
        self.report = AggregationReport(coordinate_exclusions(
            [p.cid for p, _ in results], median_rows_used(updates), updates.shape[1], "median"))
        return parameters + median.to(parameters.dtype), {}

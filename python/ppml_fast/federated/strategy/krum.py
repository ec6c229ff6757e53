"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS, section 4, Definition of Krum
and Multi-Krum), as Flower 1.42's ``Krum`` (``num_malicious_clients``,
``num_clients_to_keep``), with the pairwise distances computed as one Gram matrix instead of
Flower's O(K²) Python loop."""

from __future__ import annotations

from typing import Optional

import torch

from ppml_fast.ops import weighted_aggregate

from ._hparams import check_int
from .base import Failures, FitResults, check_results, stack_updates
from .fedavg import FedAvg
from .report import AggregationReport, whole_exclusions

__all__ = ["Krum", "krum_scores", "pairwise_sq_distances"]


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """(K, K) float64 squared Euclidean distances between the rows of a (K, P) matrix:
    ``|a_i|² + |a_j|² - 2 a_i·a_j`` on rows centred by their mean (distances do not change,
    the cancellation does) in float64, clamped at 0, diagonal exactly 0."""
    a = updates.to(torch.float64)
    a = a - a.mean(dim=0, keepdim=True)
    gram = a @ a.T
    sq = gram.diagonal()
    d = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0)
    d.fill_diagonal_(0.0)
    return d


def krum_scores(updates: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """Krum score of each row: the sum of its squared distances to its ``K - f - 2`` nearest
    other rows (Blanchard et al. 2017, section 4). Needs ``K >= 2 f + 3`` (their ``n > 2f + 2``)."""
    k = updates.shape[0]
    f = check_int("num_malicious_clients", num_malicious, 0)
    if k < 2 * f + 3:
        raise ValueError(
            f"Krum needs at least 2 * num_malicious_clients + 3 = {2 * f + 3} updates "
            f"(Blanchard et al. 2017: n > 2f + 2); got {k} with num_malicious_clients={f}")
    d = pairwise_sq_distances(updates)
    d.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    return torch.topk(d, k - f - 2, dim=1, largest=False).values.sum(dim=1)


class Krum(FedAvg):
    """Krum: ``w <- w + u_{k*}`` with ``k*`` the update of lowest score (first on ties).
    Multi-Krum (``num_clients_to_keep = m > 0``): ``w <- w +`` the mean of the ``m`` lowest-score
    updates weighted by their example counts (Flower's ``aggregate``), through the native
    ``weighted_aggregate`` op.

    ``num_malicious_clients`` (f) is the number of Byzantine clients tolerated. A round needs
    at least ``2 f + 3`` results: ``min_fit_clients`` defaults to that (the simulation skips a
    round with fewer), and :meth:`aggregate_fit` raises ValueError on fewer (Flower does not
    check, and scores with ``max(1, K - f - 2)`` neighbours). ``m`` larger than the round's
    result count raises ValueError. ``self.report`` lists the clients left out (:mod:`.report`).
    """

    def __init__(self, *, num_malicious_clients: int = 0, num_clients_to_keep: int = 0,
                 min_fit_clients: Optional[int] = None) -> None:
        f = check_int("num_malicious_clients", num_malicious_clients, 0)
        m = check_int("num_clients_to_keep", num_clients_to_keep, 0)
        need = 2 * f + 3
        if min_fit_clients is None:
            min_fit_clients = need
        min_fit_clients = check_int("min_fit_clients", min_fit_clients, 1)
        if min_fit_clients < need:
            raise ValueError(
                f"min_fit_clients must be >= 2 * num_malicious_clients + 3 = {need} for Krum "
                f"(Blanchard et al. 2017: n > 2f + 2); got {min_fit_clients}")
        super().__init__(min_fit_clients=min_fit_clients)
        self.num_malicious_clients = f
        self.num_clients_to_keep = m

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        check_results(results, parameters.numel())
        k, m = len(results), self.num_clients_to_keep
        if m > k:
            raise ValueError(f"num_clients_to_keep={m} exceeds the {k} results of round {server_round}")
        updates = stack_updates(results)
        scores = krum_scores(updates, self.num_malicious_clients)
        cids = [p.cid for p, _ in results]
        if m == 0:
            chosen = int(torch.argmin(scores))
            self.report = AggregationReport(whole_exclusions(cids[:chosen] + cids[chosen + 1:], "krum"))
            return parameters + updates[chosen].to(parameters.dtype), {}
        best = torch.argsort(scores, stable=True)[:m]
        kept = set(best.tolist())
        self.report = AggregationReport(whole_exclusions([c for j, c in enumerate(cids) if j not in kept],
                                                         "multi_krum"))
        weights = torch.tensor([float(r.num_examples) for _, r in results], dtype=torch.float64)[best]
        if float(weights.sum()) == 0:
            weights = torch.ones(m, dtype=torch.float64)
        mean, _ = weighted_aggregate(updates.index_select(0, best), weights)
        return parameters + mean.to(parameters.dtype), {}

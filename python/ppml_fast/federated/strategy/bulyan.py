"""Bulyan (El Mhamdi, Guerraoui, Rouault 2018, "The Hidden Vulnerability of Distributed
Learning in Byzantium", ICML, section 4, Algorithm "Bulyan"), as Flower 1.42's ``Bulyan`` with
its default first rule (Krum): from K >= 4f + 3 updates,

1. select theta = K - 2f of them by Krum applied recursively: each time, Krum (scores over the
   ``max(1, n - f - 2)`` nearest others of the n updates still in the pool, Blanchard et al.
   2017, section 4) picks one update, which leaves the pool;
2. per coordinate, take the median of the theta selected values and average the
   beta = theta - 2f of them closest to it (the paper's "coordinate-wise trimmed mean around
   the median").

Differences from Flower, none in the result: the pairwise distances are one Gram matrix
(:func:`~.krum.pairwise_sq_distances`, float64) computed once, not an O(K²) Python loop per
selection; the updates ``u_k`` are used instead of the full parameters ``w + u_k`` (distances,
medians and closeness do not change under the shift by ``w``); the final mean goes through the
native ``weighted_aggregate`` op.
"""

from __future__ import annotations

from typing import Optional

import torch

from ppml_fast.ops import weighted_aggregate

from ._hparams import check_int
from .base import Failures, FitResults, check_results, stack_updates
from .fedavg import FedAvg
from .fedmedian import coordinate_median
from .krum import pairwise_sq_distances
from .report import AggregationReport, coordinate_exclusions, whole_exclusions

__all__ = ["Bulyan", "bulyan"]


def _krum_pick(d: torch.Tensor, pool: list[int], f: int) -> int:
    """Position in ``pool`` of the update Krum picks among ``pool`` (first on ties)."""
    n = len(pool)
    if n == 1:
        return 0
    sub = d[pool][:, pool].clone()
    sub.fill_diagonal_(float("inf"))
    nearest = min(max(1, n - f - 2), n - 1)
    scores = torch.topk(sub, nearest, dim=1, largest=False).values.sum(dim=1)
    return int(torch.argmin(scores))


def bulyan(updates: torch.Tensor, num_malicious: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Bulyan of the rows of a (K, P) matrix (module docstring): (the aggregate, the selected
    rows in the order Krum picked them, (K,) how many coordinates of each row entered the
    final mean). ValueError unless K >= 4 f + 3 (El Mhamdi et al. 2018, section 4)."""
    f = check_int("num_malicious_clients", num_malicious, 0)
    if updates.dim() != 2:
        raise ValueError(f"updates must be a (K, P) matrix; got shape {tuple(updates.shape)}")
    k = updates.shape[0]
    if k < 4 * f + 3:
        raise ValueError(f"Bulyan needs at least 4 * num_malicious_clients + 3 = {4 * f + 3} updates "
                         f"(El Mhamdi et al. 2018: n >= 4f + 3); got {k} with num_malicious_clients={f}")
    theta, beta = k - 2 * f, k - 4 * f
    d = pairwise_sq_distances(updates)
    pool, selected = list(range(k)), []
    for _ in range(theta):
        selected.append(pool.pop(_krum_pick(d, pool, f)))
    chosen = updates.index_select(0, torch.tensor(selected, dtype=torch.long))
    median = coordinate_median(chosen)
    closest = (chosen - median).abs().topk(beta, dim=0, largest=False).indices  # (beta, P)
    values = chosen.gather(0, closest)
    mean, _ = weighted_aggregate(values.contiguous(), torch.ones(beta, dtype=torch.float64))
    rows = torch.tensor(selected, dtype=torch.long)[closest.reshape(-1)]
    return mean, selected, torch.bincount(rows, minlength=k)


class Bulyan(FedAvg):
    """``w <- w + bulyan(u_1..u_K; f)`` (module docstring); example counts are ignored (as in
    Flower). ``num_malicious_clients`` (f): a round needs ``4 f + 3`` results;
    ``min_fit_clients`` defaults to that (the simulation skips a round with fewer) and
    :meth:`aggregate_fit` raises ValueError on fewer (Flower raises too). ``self.report``
    lists the clients the selection left out (rule ``"bulyan_selection"``, whole updates) and,
    for the selected ones, the share of coordinates the trimmed mean did not take
    (``"bulyan_trim"``)."""

    def __init__(self, *, num_malicious_clients: int = 0, min_fit_clients: Optional[int] = None) -> None:
        f = check_int("num_malicious_clients", num_malicious_clients, 0)
        need = 4 * f + 3
        if min_fit_clients is None:
            min_fit_clients = need
        min_fit_clients = check_int("min_fit_clients", min_fit_clients, 1)
        if min_fit_clients < need:
            raise ValueError(f"min_fit_clients must be >= 4 * num_malicious_clients + 3 = {need} for "
                             f"Bulyan (El Mhamdi et al. 2018); got {min_fit_clients}")
        super().__init__(min_fit_clients=min_fit_clients)
        self.num_malicious_clients = f

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        check_results(results, parameters.numel())
        updates = stack_updates(results)
        mean, selected, used = bulyan(updates, self.num_malicious_clients)
        cids = [p.cid for p, _ in results]
        chosen = set(selected)
        left = whole_exclusions([c for j, c in enumerate(cids) if j not in chosen], "bulyan_selection")
        trimmed = coordinate_exclusions([cids[j] for j in selected], used[selected], updates.shape[1],
                                        "bulyan_trim")
        self.report = AggregationReport(sorted(left + trimmed, key=lambda e: e["cid"]))
        return parameters + mean.to(parameters.dtype), {}

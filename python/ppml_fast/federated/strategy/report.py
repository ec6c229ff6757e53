"""What a strategy's ``aggregate_fit`` says it did, for the History: the clients (or the share
of their coordinates) it left out, and a reason when it declined to aggregate at all.

A strategy sets ``self.report = AggregationReport(...)`` in ``aggregate_fit``;
:func:`take_report` (the simulation, after each aggregation) reads it from the strategy or from
the first strategy it wraps that has one, and clears it, so a report never outlives its round.
An exclusion is a plain dict, JSON-ready: ``{"cid", "rule", "fraction"}``, ``fraction`` being
the share of the update's coordinates that did not enter the aggregate (1.0: the whole update,
as Krum's or Bulyan's selection leave it; less for the coordinate-wise rules, the median and
the trimmed mean, which drop values coordinate by coordinate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

__all__ = ["AggregationReport", "coordinate_exclusions", "take_report", "whole_exclusions"]


@dataclass
class AggregationReport:
    """``excluded``: ``[{"cid", "rule", "fraction"}]``; ``skip_reason``: set when the strategy
    declined to aggregate (the simulation then keeps the parameters and marks the round
    skipped with this reason)."""

    excluded: list[dict[str, Any]] = field(default_factory=list)
    skip_reason: Optional[str] = None


def whole_exclusions(cids: Sequence[int], rule: str) -> list[dict[str, Any]]:
    """Exclusions of whole updates: fraction 1.0 each."""
    return [{"cid": int(c), "rule": rule, "fraction": 1.0} for c in cids]


def coordinate_exclusions(cids: Sequence[int], used: torch.Tensor, numel: int,
                          rule: str) -> list[dict[str, Any]]:
    """Exclusions of a coordinate-wise rule: ``used[j]`` = how many of the ``numel``
    coordinates of client ``cids[j]`` entered the aggregate; clients with all their
    coordinates used are not listed."""
    out = []
    for c, u in zip(cids, used.tolist()):
        if u < numel:
            out.append({"cid": int(c), "rule": rule, "fraction": 1.0 - u / numel if numel else 0.0})
    return out


def take_report(strategy: Any) -> Optional[AggregationReport]:
    """The report of ``strategy`` or of the first strategy it wraps (``.strategy``) that has one,
    cleared once read (None when none set one this round)."""
    s = strategy
    for _ in range(16):  # wrappers: SecAggFedAvg(DPFedAvgFixed(FedAvg())) and the like
        if s is None:
            return None
        report = getattr(s, "report", None)
        if isinstance(report, AggregationReport):
            s.report = None
            return report
        s = getattr(s, "strategy", None)
    return None

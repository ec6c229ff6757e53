"""What the round loop checks after ``strategy.aggregate_fit``: the strategy's own report (the
clients it left out, or its reason to decline the round, :mod:`.strategy.report`) and whether
the new parameters are finite.

A non-finite aggregate fails the round: one client sending 3e38 in every coordinate is a finite
update (it passes the per-client check), but the weighted mean of it with the others overflows
float32 to inf, and a global model of inf and NaN trains nothing afterwards. Such a round is
recorded as skipped with the reason, the parameters stay what they were. What the strategy did
in its own state during that call stays done: a DP strategy has spent the round's privacy (the
round's ε counts it, conservatively), a FedOpt strategy's moments may now hold the non-finite
values (its next rounds then fail the same way, each recorded).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .strategy.report import take_report

__all__ = ["check_aggregate"]


def check_aggregate(strategy: Any, new: torch.Tensor) -> tuple[Optional[str], list[dict[str, Any]]]:
    """(why the round must not take ``new``, or None; the exclusions the strategy reported)."""
    report = take_report(strategy)
    excluded = list(report.excluded) if report is not None else []
    if report is not None and report.skip_reason is not None:
        return f"the strategy declined: {report.skip_reason}", excluded
    if not bool(torch.isfinite(new.sum())):  # a finite sum means every entry is finite
        bad = torch.isfinite(new).logical_not_()
        count = int(bad.sum())
        if count:
            nan = int(torch.isnan(new).sum())
            return (f"non-finite aggregate: {count} of {new.numel()} parameters ({nan} NaN, "
                    f"{count - nan} inf) after aggregate_fit; parameters unchanged"), excluded
    return None, excluded

"""FaultTolerantFedAvg: FedAvg that aggregates only when enough of the asked clients answered,
as Flower 1.42's ``FaultTolerantFedAvg``: a round whose completion rate
``len(results) / (len(results) + len(failures))`` is below ``min_completion_rate_fit``
(default 0.5) is not aggregated (Flower returns no parameters; here the parameters stay
unchanged and ``self.report.skip_reason`` says why, which the simulation records as a skipped
round). Federated evaluation likewise with ``min_completion_rate_evaluate``.

``failures`` are the clients the simulation left out of the round with a reason (raised,
timed out, non-finite, misshapen); clients that dropped out before training (``dropout=``)
never answered and are not among them, as in this package's other strategies.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._hparams import check_real
from .base import EvalResults, Failures, FitResults
from .fedavg import FedAvg
from .report import AggregationReport

__all__ = ["FaultTolerantFedAvg"]


class FaultTolerantFedAvg(FedAvg):
    """FedAvg gated by the completion rate (module docstring); ``min_fit_clients`` defaults to 1
    as in Flower."""

    def __init__(self, *, min_completion_rate_fit: float = 0.5, min_completion_rate_evaluate: float = 0.5,
                 min_fit_clients: int = 1) -> None:
        super().__init__(min_fit_clients=min_fit_clients)
        self.min_completion_rate_fit = check_real("min_completion_rate_fit", min_completion_rate_fit,
                                                  lo=0.0, hi=1.0, hi_open=False)
        self.min_completion_rate_evaluate = check_real(
            "min_completion_rate_evaluate", min_completion_rate_evaluate, lo=0.0, hi=1.0, hi_open=False)

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        rate = len(results) / (len(results) + len(failures)) if results else 0.0
        if not results or rate < self.min_completion_rate_fit:
            self.report = AggregationReport(skip_reason=(
                f"completion rate {rate:.4g} ({len(results)} of {len(results) + len(failures)}) "
                f"below min_completion_rate_fit = {self.min_completion_rate_fit:g}"))
            return parameters.clone(), {}
        self.report = AggregationReport()
        return super().aggregate_fit(server_round, parameters, results, failures)

    def aggregate_evaluate(self, server_round: int, results: EvalResults,
                           failures: Failures) -> tuple[Optional[float], dict[str, float]]:
        if not results or len(results) / (len(results) + len(failures)) < self.min_completion_rate_evaluate:
            return None, {}
        return super().aggregate_evaluate(server_round, results, failures)

"""The errors a secure-aggregation round raises when it cannot finish safely."""

from __future__ import annotations

from typing import Mapping, Optional

from ppml_fast.accounting.errors import PrivacyError

__all__ = ["SecAggAborted", "SecAggError"]


class SecAggError(PrivacyError, RuntimeError):
    """A secure-aggregation round cannot finish without weakening its guarantee: too few
    clients left to reach the Shamir threshold, a client asked to reveal shares twice,
    inconsistent shares or messages. Nothing about any single input is released when it is
    raised (the server holds only masked vectors and at most threshold - 1 shares of a secret)."""


class SecAggAborted(SecAggError):
    """A round that :class:`~.strategy.SecAggFedAvg` gave up (``on_abort="skip"``): the
    parameters do not change and ``run_simulation`` records the round as skipped, with this
    error's message as ``skip_reason`` and ``metrics`` as the round's metrics; the run goes on.

    Attributes:
        metrics: what the strategy reports about the aborted round (``secagg_aborted`` = 1, ...).
    """

    def __init__(self, message: str, metrics: Optional[Mapping[str, float]] = None) -> None:
        super().__init__(message)
        self.metrics = dict(metrics or {})

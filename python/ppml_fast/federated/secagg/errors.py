"""The error a secure-aggregation round raises when it cannot finish safely."""

from __future__ import annotations

from ppml_fast.accounting.errors import PrivacyError

__all__ = ["SecAggError"]


class SecAggError(PrivacyError, RuntimeError):
    """A secure-aggregation round cannot finish without weakening its guarantee: too few
    clients left to reach the Shamir threshold, a client asked to reveal shares twice,
    inconsistent shares or messages. Nothing about any single input is released when it is
    raised (the server holds only masked vectors and at most threshold - 1 shares of a secret)."""

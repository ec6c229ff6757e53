"""Privacy errors: the exceptions a caller may want to catch by name (the DP engine re-exports
``PrivacyBudgetExceeded`` as ``ppml_fast.PrivacyBudgetExceeded``)."""

from __future__ import annotations

from typing import Optional


class PrivacyError(Exception):
    """Base class of ppml_fast's privacy errors."""


class PrivacyBudgetExceeded(PrivacyError):
    """A release would spend more privacy than the budget allows; nothing was released or recorded.

    Attributes (None where the raiser does not know them): ``epsilon`` (the total epsilon the
    release would have reached), ``epsilon_budget``, ``delta`` (at which both are measured) and
    ``dataset`` (the ledger's name of the data set).
    """

    def __init__(
        self,
        message: str,
        *,
        epsilon: Optional[float] = None,
        epsilon_budget: Optional[float] = None,
        delta: Optional[float] = None,
        dataset: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.epsilon = epsilon
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.dataset = dataset

    def __reduce__(self):  # keep the attributes through pickling (multiprocessing, Ray)
        kwargs = dict(epsilon=self.epsilon, epsilon_budget=self.epsilon_budget, delta=self.delta,
                      dataset=self.dataset)
        return (_rebuild, (type(self), self.args[0] if self.args else "", kwargs))


def _rebuild(cls, message, kwargs):
    return cls(message, **kwargs)

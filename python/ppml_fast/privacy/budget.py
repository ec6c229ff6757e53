"""The budget stop of :class:`~ppml_fast.privacy.optimizer.DPOptimizer`: may one more step's
event be composed without the epsilon that the accountant reports passing ``max_epsilon``?

DESIGN.md invariant 5 (one accountant of truth): the answer is always about the history of the
accountant that reports epsilon (``engine.accountant`` / ``optimizer.accountant``), including
events composed into it from outside (a mechanism's release, a second optimizer, a loaded
state). Fast paths are exact upper bounds of that same history, and are rebuilt whenever the
accountant's history is not the one they were built from:

1. for the PLD accountant, an RDP copy ("shadow") of the history: the PLD accountant reports
   min(PLD, RDP) of its history (``PLDAccountant.get_epsilon``), so an RDP epsilon of the same
   history within budget proves the reported one is too (other accountants get no shadow:
   their epsilon need not be below RDP's);
2. once per distinct event, how many more such steps fit (the reported epsilon grows with the
   count), found by querying the accountant itself; counted down as steps compose.

Both are keyed by the accountant's object and a copy of its ``history`` taken when they were
last in step with it; any other history (an outside ``compose``, ``load_state_dict``, another
accountant object) discards them. The comparison is one list comparison per step (entries are
shared tuples, so it is mostly identity checks; histories merge repeated steps and stay short).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

from ppml_fast.accounting import PLDAccountant, RDPAccountant
from ppml_fast.accounting.errors import PrivacyBudgetExceeded


class BudgetStop:
    """Decides whether one more event fits ``max_epsilon`` at ``delta`` for ``accountant``."""

    def __init__(self) -> None:
        self._of: Any = None  # the accountant the caches below describe
        self._history: Optional[list] = None  # its history when they were last in step
        self._shadow: Any = None  # RDPAccountant of the same history, or False (unsupported)
        self._fits: Optional[tuple] = None  # (event, how many more such steps fit)

    def reset(self) -> None:
        self._of, self._history, self._shadow, self._fits = None, None, None, None

    def check(self, accountant, event, *, max_epsilon: float, delta: float, step: int) -> None:
        """Raises PrivacyBudgetExceeded when composing ``event`` would report epsilon above
        ``max_epsilon``; changes nothing in ``accountant``."""
        if self._fast_ok(accountant, event, max_epsilon, delta):
            return
        eps = _epsilon_after(accountant, event, 1, delta)
        if eps > max_epsilon:
            raise PrivacyBudgetExceeded(
                f"step {step}: this step would spend epsilon {eps:.4g} > max_epsilon "
                f"{max_epsilon:g} at delta {delta:g}; no parameter was changed",
                epsilon=eps, epsilon_budget=max_epsilon, delta=delta)

    def composed(self, accountant, event) -> None:
        """``event`` was just composed into ``accountant`` by the optimizer: keeps the caches
        in step (only when they were in step before it)."""
        if self._of is not accountant or self._history is None:
            return
        if self._shadow:
            self._shadow.compose(event)
        if self._fits is not None and self._fits[0] == event:
            self._fits = (event, self._fits[1] - 1)
        self._history = accountant.events

    def _fast_ok(self, accountant, event, max_epsilon: float, delta: float) -> bool:
        if isinstance(accountant, RDPAccountant):
            return False  # its own query is cheap and exact: the caller does it
        history = accountant.events
        if self._of is not accountant or history != self._history:
            self._of, self._history, self._fits = accountant, history, None
            self._shadow = RDPAccountant() if isinstance(accountant, PLDAccountant) else False
            try:
                for *key, n in history if self._shadow is not False else ():
                    self._shadow._compose_key(tuple(key), n)
            except (KeyError, ValueError, TypeError):  # a kind RDP does not know: no shadow
                self._shadow = False
        if self._shadow and _epsilon_after(self._shadow, event, 1, delta) <= max_epsilon:
            return True
        if self._fits is None or self._fits[0] != event:
            lo, hi = 0, 1
            while _epsilon_after(accountant, event, hi, delta) <= max_epsilon and hi < 1 << 30:
                lo, hi = hi, hi * 2
            while hi - lo > 1:  # the largest count within budget, by bisection
                mid = (lo + hi) // 2
                ok = _epsilon_after(accountant, event, mid, delta) <= max_epsilon
                lo, hi = (mid, hi) if ok else (lo, mid)
            self._fits = (event, lo)
        return self._fits[1] >= 1


def _epsilon_after(accountant, event, count: int, delta: float) -> float:
    eps = copy.deepcopy(accountant).compose(event, count).get_epsilon(delta)
    return math.inf if math.isnan(eps) else eps

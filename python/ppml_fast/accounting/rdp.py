"""RDPAccountant: composes events into a Rényi-DP curve and converts it to (epsilon, delta).

Supports Gaussian, Poisson-subsampled Gaussian, and self-composed / composed sequences of them
(heterogeneous histories: sigma and q may change from step to step). The maths is in
rdp_math.py. RDP is an upper bound: a PLD accountant is tighter (by 4-69% on ANCHORS.md's
grid), never looser.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np

from ppml_fast.accounting import _checks, rdp_math
from ppml_fast.accounting.events import (
    ComposedEvent,
    Event,
    GaussianEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    UnsupportedEventError,
)


class RDPAccountant:
    """Rényi-DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019).

    ``compose(event, count=1)`` adds events and returns ``self``; ``get_epsilon(delta)`` and
    ``get_delta(epsilon)`` convert with Canonne-Kamath-Steinke 2020, Prop. 12.
    """

    def __init__(self, orders: Optional[Sequence[float]] = None) -> None:
        orders = tuple(float(a) for a in (orders if orders is not None else rdp_math.DEFAULT_ORDERS))
        if not orders or any(not (a > 1.0 and math.isfinite(a)) for a in orders):
            raise ValueError(f"orders must be finite numbers > 1; got {orders!r}")
        self.orders = orders
        self._rdp = np.zeros(len(orders))
        self._history: list[tuple[float, float, int]] = []  # (q, sigma, count)
        self._cache: dict[tuple[float, float], np.ndarray] = {}

    # -- events -----------------------------------------------------------------------------
    def supports(self, event: Event) -> bool:
        try:
            self._steps(event, 1)
        except UnsupportedEventError:
            return False
        return True

    def _steps(self, event: Event, count: int) -> list[tuple[float, float, int]]:
        """The event as (q, sigma, count) steps, or UnsupportedEventError."""
        if isinstance(event, GaussianEvent):
            return [(1.0, event.noise_multiplier, count)]
        if isinstance(event, PoissonSampledEvent) and isinstance(event.event, GaussianEvent):
            return [(event.sampling_probability, event.event.noise_multiplier, count)]
        if isinstance(event, SelfComposedEvent):
            return self._steps(event.event, count * event.count)
        if isinstance(event, ComposedEvent):
            out: list[tuple[float, float, int]] = []
            for e in event.events:
                out.extend(self._steps(e, count))
            return out
        raise UnsupportedEventError(f"RDPAccountant does not support {type(event).__name__}: {event!r}")

    def compose(self, event: Event, count: int = 1) -> "RDPAccountant":
        """Adds ``count`` repetitions of ``event``; on an unsupported event nothing changes."""
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"count must be an int >= 0; got {count!r}")
        steps = self._steps(event, int(count))
        add = np.zeros_like(self._rdp)
        for q, sigma, n in steps:
            if n:
                add += n * self._step_rdp(q, sigma)
        self._rdp = self._rdp + add
        self._history.extend(s for s in steps if s[2])
        return self

    def _step_rdp(self, q: float, sigma: float) -> np.ndarray:
        key = (q, sigma)
        if key not in self._cache:
            self._cache[key] = rdp_math.rdp_poisson_gaussian(q, sigma, self.orders)
        return self._cache[key]

    # -- queries ----------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """epsilon spent at ``delta`` (in (0, 1))."""
        delta = _checks.open_unit("delta", delta)
        return rdp_math.epsilon_from_rdp(self.orders, self._rdp, delta)

    def get_delta(self, epsilon: float) -> float:
        """delta at ``epsilon`` (finite, >= 0)."""
        epsilon = _checks.non_negative("epsilon", epsilon)
        return rdp_math.delta_from_rdp(self.orders, self._rdp, epsilon)

    @property
    def rdp(self) -> np.ndarray:
        """The composed RDP curve, one value per order (a copy)."""
        return self._rdp.copy()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(sampling probability, noise multiplier, count) of every composition, in order."""
        return list(self._history)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"orders": list(self.orders), "history": [list(h) for h in self._history]}

    def load_state_dict(self, state: dict) -> None:
        """Replaces this accountant's history with ``state``'s (validated first)."""
        try:
            orders = [float(a) for a in state["orders"]]
            history = [(float(q), float(s), int(n)) for q, s, n in state["history"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"state must hold 'orders' and 'history' entries (q, sigma, count); {e}") from e
        fresh = RDPAccountant(orders)
        for q, sigma, n in history:
            event = GaussianEvent(sigma) if q == 1.0 else PoissonSampledEvent(q, GaussianEvent(sigma))
            fresh.compose(event, n)
        self.orders, self._rdp, self._history, self._cache = (
            fresh.orders, fresh._rdp, fresh._history, fresh._cache,
        )

"""RDPAccountant: composes events into a Rényi-DP curve and converts it to (epsilon, delta).

Supports Gaussian, Poisson-subsampled Gaussian, Gaussian on a sample drawn without replacement
(rdp_sampled_wor.py), Laplace, randomized response, and self-composed / composed sequences of
them (heterogeneous histories: sigma and q may change from step to step).
The maths is in rdp_math.py. RDP is an upper bound: a PLD accountant is tighter (by 4-69% on ANCHORS.md's
grid), never looser.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import numpy as np

from ppml_fast.accounting import _checks, events, rdp_math, rdp_sampled_wor, sampling_events, sampling_math
from ppml_fast.accounting.events import (
    Event,
    GaussianEvent,
    LaplaceEvent,
    PoissonSampledEvent,
    RandomizedResponseEvent,
    SampledWithoutReplacementEvent,
)


# One step's RDP curve by kind: key = (kind, *parameters) -> f(*parameters, orders).
CURVES: dict[str, Callable[..., np.ndarray]] = {
    "gaussian": rdp_math.rdp_poisson_gaussian,  # (q, sigma); q = 1 is the Gaussian mechanism
    "laplace": rdp_math.rdp_laplace,  # (scale,)
    "randomized_response": rdp_math.rdp_randomized_response,  # (p, k)
    "sampled_wor_gaussian": rdp_sampled_wor.rdp_sampled_wor_gaussian,  # (n, m, sigma)
    sampling_events.TRUNCATED_KIND: sampling_math.rdp_truncated_poisson_gaussian,  # (p, q, sigma)
}


def _adjacency(key: tuple) -> Optional[str]:
    """The neighbouring relation a step's guarantee holds under, or None when it holds under
    any (the noise is relative to the sensitivity, which the caller defines)."""
    if key[0] == "gaussian" and key[1] < 1.0:
        return "add/remove"  # Poisson sampling (Mironov et al. 2019 assume add/remove)
    if key[0] == "sampled_wor_gaussian":
        return "substitution"  # Wang, Balle, Kasiviswanathan 2019
    if key[0] == sampling_events.TRUNCATED_KIND:
        return "add/remove"  # sampling_events.TruncatedPoissonEvent
    return None


class MixedAdjacencyError(ValueError):
    """Events whose guarantees hold under different neighbouring relations (add/remove versus
    substitution) cannot be composed into one epsilon."""


class RDPAccountant(events.OpacusHistory):
    """Rényi-DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019).

    ``compose(event, count=1)`` adds events and returns ``self``; ``get_epsilon(delta)`` and
    ``get_delta(epsilon)`` convert with Canonne-Kamath-Steinke 2020, Prop. 12. Composing events
    whose guarantees hold under different neighbouring relations (Poisson sampling: add/remove;
    sampling without replacement: substitution) raises ``MixedAdjacencyError``.
    """

    def __init__(self, orders: Optional[Sequence[float]] = None) -> None:
        orders = tuple(float(a) for a in (orders if orders is not None else rdp_math.DEFAULT_ORDERS))
        if not orders or any(not (a > 1.0 and math.isfinite(a)) for a in orders):
            raise ValueError(f"orders must be finite numbers > 1; got {orders!r}")
        self.orders = orders
        self._rdp = np.zeros(len(orders))
        self._base = self._rdp  # the curve of every history entry but the last
        self._history: list[tuple] = []  # (*curve key, count), consecutive equal keys merged
        self._cache: dict[tuple, np.ndarray] = {}
        self._adjacency: Optional[str] = None

    # -- events -----------------------------------------------------------------------------
    def supports(self, event: Event) -> bool:
        return sampling_events.supported(event, CURVES)

    def _steps(self, event: Event, count: int) -> list[tuple[tuple, int]]:
        """The event as (key, count) steps, or UnsupportedEventError."""
        return sampling_events.steps(event, count, CURVES, "RDPAccountant")

    def compose(self, event: Event, count: int = 1) -> "RDPAccountant":
        """Adds ``count`` repetitions of ``event``; on an unsupported event nothing changes."""
        count = events.check_count(count)
        steps = [(key, n) for key, n in self._steps(event, count) if n]
        adjacency = self._adjacency
        for a in [_adjacency(key) for key, _ in steps] + sampling_events.adjacencies(event):
            if a is not None and adjacency is not None and a != adjacency:
                raise MixedAdjacencyError(
                    f"event {event!r} holds under {a} adjacency but the history holds under "
                    f"{adjacency}; use one accountant per neighbouring relation"
                )
            adjacency = adjacency or a
        curves = [self._step_rdp(key) for key, _ in steps]  # before anything changes
        for (key, n), curve in zip(steps, curves):
            self._add_entry(key, n, curve)
        self._adjacency = adjacency
        return self

    def _add_entry(self, key: tuple, n: int, curve: np.ndarray) -> None:
        """Appends ``n`` steps of ``key`` to the history, merged with the last entry when the key
        is the same (as the PLD accountant does: a long run keeps a short history). The curve is
        always base + count * curve of the last entry, so a state_dict round trip, which composes
        each entry once with its count, gives the same numbers to the last bit."""
        if self._history and self._history[-1][:-1] == key:
            n = self._history[-1][-1] + n
            self._history[-1] = (*key, n)
        else:
            self._base = self._rdp
            self._history.append((*key, n))
        self._rdp = self._base + n * curve

    def _step_rdp(self, key: tuple) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = CURVES[key[0]](*key[1:], self.orders)
        return self._cache[key]

    # -- queries ----------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """epsilon spent at ``delta`` (in (0, 1))."""
        delta = _checks.open_unit("delta", delta)
        return rdp_math.epsilon_from_rdp(self.orders, self._rdp, delta, terms=self._terms())

    def get_delta(self, epsilon: float) -> float:
        """delta at ``epsilon`` (finite, >= 0)."""
        epsilon = _checks.non_negative("epsilon", epsilon)
        return rdp_math.delta_from_rdp(self.orders, self._rdp, epsilon, terms=self._terms())

    def _terms(self) -> int:
        """How many rounded values the composed curve sums (for the rounding allowance): one
        product and one addition per history entry."""
        return 2 * len(self._history) + 1

    @property
    def rdp(self) -> np.ndarray:
        """The composed RDP curve, one value per order (a copy)."""
        return self._rdp.copy()

    @property
    def events(self) -> list[tuple]:
        """(kind, *parameters, count) of every composition, in order: ("gaussian", q, sigma, n),
        ("laplace", scale, n), ("randomized_response", p, k, n),
        ("sampled_wor_gaussian", source_dataset_size, sample_size, sigma, n)."""
        return list(self._history)


    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"orders": list(self.orders), "history": [list(h) for h in self._history]}

    def load_state_dict(self, state: dict) -> None:
        """Replaces this accountant's history with ``state``'s (validated first; states written
        before the kinds existed, entries (q, sigma, count), load as Gaussian steps)."""
        try:
            orders = [float(a) for a in state["orders"]]
            history = []
            for h in state["history"]:
                h = list(h)
                if not isinstance(h[0], str):
                    h = ["gaussian", *h]
                if h[0] not in CURVES:
                    raise ValueError(f"unknown kind {h[0]!r}")
                n = h[-1]
                if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                    raise ValueError(f"count must be an int >= 0; got {n!r}")
                history.append((tuple(h[:-1]), int(n)))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"state must hold 'orders' and 'history' entries (kind, *parameters, count); {e}") from e
        fresh = RDPAccountant(orders)
        for key, n in history:
            fresh._compose_key(key, n)
        self.orders, self._rdp, self._base, self._history, self._cache, self._adjacency = (
            fresh.orders, fresh._rdp, fresh._base, fresh._history, fresh._cache, fresh._adjacency,
        )

    def _compose_key(self, key: tuple, count: int) -> None:
        """Composes a step given by its curve key (as stored in the history)."""
        _validate_key(key)
        a = _adjacency(key)
        if a is not None and self._adjacency is not None and a != self._adjacency:
            raise MixedAdjacencyError(f"history mixes {a} and {self._adjacency} adjacency")
        self._add_entry(key, count, self._step_rdp(key))
        self._adjacency = self._adjacency or a


def _validate_key(key: tuple) -> None:
    """Rebuilds the event a stored key describes, so a loaded state passes the events' checks."""
    kind, *params = key
    if kind == "gaussian":
        q, sigma = params
        GaussianEvent(sigma) if q == 1.0 else PoissonSampledEvent(q, GaussianEvent(sigma))
    elif kind == "laplace":
        LaplaceEvent(*params)
    elif kind == "randomized_response":
        RandomizedResponseEvent(float(params[0]), int(params[1]))
    elif kind == "sampled_wor_gaussian":
        SampledWithoutReplacementEvent(params[0], params[1], GaussianEvent(params[2]))
    elif kind == sampling_events.TRUNCATED_KIND:
        p, q, sigma = (_checks.real(n, v) for n, v in zip(("p", "q", "sigma"), params))
        if not (0.0 < p <= 1.0 and 0.0 < q <= 1.0):
            raise ValueError(f"a truncated Poisson entry needs p and q in (0, 1]; got {params!r}")
        GaussianEvent(sigma)

"""Privacy events: immutable descriptions of what a mechanism released, for the accountants.

Mechanisms and training code produce events; accountants compose them. The vocabulary follows
Google's dp_accounting (``GaussianDpEvent``, ``PoissonSampledDpEvent``, ...). This module, like
the whole ``accounting`` package, imports nothing else from ppml_fast.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Tuple

from ppml_fast.accounting import _checks


class UnsupportedEventError(TypeError):
    """An accountant was given an event it cannot account for."""


class Event:
    """Base class of all events."""


@dataclass(frozen=True)
class GaussianEvent(Event):
    """The Gaussian mechanism with noise std = ``noise_multiplier`` x the L2 sensitivity."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        v = _checks.real("noise_multiplier", self.noise_multiplier)
        if not v > 0:
            raise ValueError(f"noise_multiplier must be > 0; got {self.noise_multiplier!r}")
        object.__setattr__(self, "noise_multiplier", v)


@dataclass(frozen=True)
class PoissonSampledEvent(Event):
    """``event`` applied to a Poisson sample: each record is in it with probability
    ``sampling_probability``, independently (adjacency: adding or removing one record)."""

    sampling_probability: float
    event: Event

    def __post_init__(self) -> None:
        q = _checks.real("sampling_probability", self.sampling_probability)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"sampling_probability must be in [0, 1]; got {q!r}")
        if not isinstance(self.event, Event):
            raise TypeError(f"event must be an Event; got {type(self.event).__name__}")
        object.__setattr__(self, "sampling_probability", q)


@dataclass(frozen=True)
class SelfComposedEvent(Event):
    """``event`` applied ``count`` times (adaptive composition)."""

    event: Event
    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.event, Event):
            raise TypeError(f"event must be an Event; got {type(self.event).__name__}")
        if isinstance(self.count, bool) or not isinstance(self.count, numbers.Integral):
            raise TypeError(f"count must be an int; got {type(self.count).__name__}")
        if self.count < 0:
            raise ValueError(f"count must be >= 0; got {self.count}")


@dataclass(frozen=True)
class ComposedEvent(Event):
    """The events in order (adaptive composition)."""

    events: Tuple[Event, ...]

    def __post_init__(self) -> None:
        events = tuple(self.events)
        for i, e in enumerate(events):
            if not isinstance(e, Event):
                raise TypeError(f"events[{i}] must be an Event; got {type(e).__name__}")
        object.__setattr__(self, "events", events)

"""Privacy events: immutable descriptions of what a mechanism released, for the accountants.

Mechanisms and training code produce events; accountants compose them. The vocabulary follows
Google's dp_accounting (``GaussianDpEvent``, ``PoissonSampledDpEvent``, ...). This module, like
the whole ``accounting`` package, imports nothing else from ppml_fast.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Container, Optional, Tuple

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
        if not (1e-100 <= v <= 1e100 or v == math.inf):  # beyond, sigma^2 and 1/sigma^2 overflow
            raise ValueError(f"noise_multiplier must be in [1e-100, 1e100] or inf; got {self.noise_multiplier!r}")
        object.__setattr__(self, "noise_multiplier", v)


@dataclass(frozen=True)
class LaplaceEvent(Event):
    """The Laplace mechanism with noise scale b = ``scale`` x the L1 sensitivity (pure
    (1 / scale)-DP; Dwork & Roth 2014, Thm. 3.6)."""

    scale: float

    def __post_init__(self) -> None:
        v = _checks.positive("scale", self.scale)
        if not 1e-100 <= v <= 1e100:
            raise ValueError(f"scale must be in [1e-100, 1e100]; got {self.scale!r}")
        object.__setattr__(self, "scale", v)


@dataclass(frozen=True)
class RandomizedResponseEvent(Event):
    """k-ary randomized response: with probability ``noise_parameter`` the output is a uniformly
    random one of ``num_buckets`` values, otherwise the true value (dp_accounting's
    ``RandomizedResponseDpEvent``). Adjacency: one respondent's value replaced (local DP); it is
    pure epsilon-DP with epsilon = log(1 + k (1 - p) / p) (Warner 1965; Kairouz et al. 2016,
    Sec. 2). The accountants use these replace-one numbers under add/remove too, where an absent
    respondent is reported as a uniformly random bucket: there they are an upper bound."""

    noise_parameter: float
    num_buckets: int

    def __post_init__(self) -> None:
        p = _checks.real("noise_parameter", self.noise_parameter)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"noise_parameter must be in (0, 1]; got {self.noise_parameter!r}")
        k = self.num_buckets
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"num_buckets must be an int; got {type(k).__name__}")
        if k < 2:
            raise ValueError(f"num_buckets must be >= 2; got {k}")
        object.__setattr__(self, "noise_parameter", p)
        object.__setattr__(self, "num_buckets", int(k))

    @classmethod
    def from_epsilon(cls, epsilon: float, num_buckets: int) -> "RandomizedResponseEvent":
        """The randomized response that is exactly ``epsilon``-DP over ``num_buckets`` values."""
        epsilon = _checks.positive("epsilon", epsilon)
        if epsilon > 700:  # e^epsilon overflows; such a response is the raw value anyway
            raise ValueError(f"epsilon must be <= 700; got {epsilon!r}")
        return cls(num_buckets / (math.expm1(epsilon) + num_buckets), num_buckets)

    @property
    def epsilon(self) -> float:
        """Its pure-DP epsilon."""
        p, k = self.noise_parameter, self.num_buckets
        return math.log1p(k * (1.0 - p) / p)


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
class SampledWithoutReplacementEvent(Event):
    """``event`` applied to a uniformly random subset of exactly ``sample_size`` of the
    ``source_dataset_size`` records. Adjacency: substitution (one record replaced, the size n
    fixed), as in Wang, Balle, Kasiviswanathan 2019 and dp_accounting's
    ``SampledWithoutReplacementDpEvent``; an epsilon under substitution is up to twice one under
    add/remove, so do not compare it with Poisson-sampled epsilons directly. The inner event's
    noise is relative to the sensitivity under substitution: for a sum of gradients clipped to
    norm C that is 2C, so DP-SGD with noise std sigma C is GaussianEvent(sigma / 2) here."""

    source_dataset_size: int
    sample_size: int
    event: Event

    def __post_init__(self) -> None:
        for name in ("source_dataset_size", "sample_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int; got {type(v).__name__}")
        if self.source_dataset_size < 1:
            raise ValueError(f"source_dataset_size must be >= 1; got {self.source_dataset_size}")
        if not 0 <= self.sample_size <= self.source_dataset_size:
            raise ValueError(
                f"sample_size must be in [0, source_dataset_size={self.source_dataset_size}]; "
                f"got {self.sample_size}"
            )
        if not isinstance(self.event, Event):
            raise TypeError(f"event must be an Event; got {type(self.event).__name__}")
        object.__setattr__(self, "source_dataset_size", int(self.source_dataset_size))
        object.__setattr__(self, "sample_size", int(self.sample_size))


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


def _leaf_key(event: Event) -> Optional[tuple]:
    """The (kind, *parameters) of a single step, as the accountants' histories store it."""
    if isinstance(event, GaussianEvent):
        return ("gaussian", 1.0, event.noise_multiplier)
    if isinstance(event, LaplaceEvent):
        return ("laplace", event.scale)
    if isinstance(event, RandomizedResponseEvent):
        return ("randomized_response", event.noise_parameter, event.num_buckets)
    if isinstance(event, PoissonSampledEvent):
        inner = event.event
        if isinstance(inner, GaussianEvent):
            return ("gaussian", event.sampling_probability, inner.noise_multiplier)
        if isinstance(inner, LaplaceEvent):
            return ("poisson_laplace", event.sampling_probability, inner.scale)
    if isinstance(event, SampledWithoutReplacementEvent) and isinstance(event.event, GaussianEvent):
        return ("sampled_wor_gaussian", event.source_dataset_size, event.sample_size,
                event.event.noise_multiplier)
    return None


def steps(event: Event, count: int, kinds: Container[str], accountant: str) -> list[tuple[tuple, int]]:
    """``event`` repeated ``count`` times as (step key, count) pairs in order, composed and
    self-composed events unrolled; UnsupportedEventError names the first step whose kind is not
    in ``kinds`` (what ``accountant`` can account for)."""
    if isinstance(event, SelfComposedEvent):
        return steps(event.event, count * event.count, kinds, accountant)
    if isinstance(event, ComposedEvent):
        return [s for e in event.events for s in steps(e, count, kinds, accountant)]
    key = _leaf_key(event)
    if key is None or key[0] not in kinds:
        raise UnsupportedEventError(f"{accountant} does not support {type(event).__name__}: {event!r}")
    return [(key, count)]


def adjacencies(event: Event) -> list[str]:
    """The neighbouring relations the sampling in ``event`` assumes: Poisson sampling (any q,
    1 included: its noise is relative to the add/remove sensitivity) is "add/remove", sampling
    without replacement "substitution"."""
    if isinstance(event, SelfComposedEvent):
        return adjacencies(event.event)
    if isinstance(event, ComposedEvent):
        return [a for e in event.events for a in adjacencies(e)]
    if isinstance(event, PoissonSampledEvent):
        return ["add/remove"]
    if isinstance(event, SampledWithoutReplacementEvent):
        return ["substitution"]
    return []


def supported(event: Event, kinds: Container[str]) -> bool:
    """Whether every step of ``event`` is of a kind in ``kinds`` (an accountant's ``supports``)."""
    try:
        steps(event, 1, kinds, "")
    except UnsupportedEventError:
        return False
    return True


def check_count(count: object) -> int:
    """An accountant's ``compose`` count: an int >= 0 (bool refused)."""
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ValueError(f"count must be an int >= 0; got {count!r}")
    return int(count)


def opacus_history(entries) -> list[tuple]:
    """Accountant history entries (kind, *parameters, count) in Opacus's format: a Gaussian
    step ("gaussian", q, sigma, n) becomes (noise_multiplier, sample_rate, num_steps), as in
    ``opacus.accountants.RDPAccountant.history``; kinds Opacus has no format for stay as they are."""
    return [(h[2], h[1], h[3]) if h[0] == "gaussian" else tuple(h) for h in entries]


class OpacusHistory:
    """Opacus's view of an accountant's ``_history`` (a mixin of the RDP and PLD accountants):
    ``history`` as :func:`opacus_history` gives it, ``len()`` its number of entries."""

    _history: list

    @property
    def history(self) -> list[tuple]:
        """(noise_multiplier, sample_rate, steps) per Gaussian entry, other kinds as in ``events``."""
        return opacus_history(self._history)

    def __len__(self) -> int:
        """The number of history entries, as Opacus's accountants count them."""
        return len(self._history)

    def __bool__(self) -> bool:
        """Always true: an accountant is an object, not a container (``if shadow:`` checks in
        the engine mean "exists"; without this an empty accountant would read as false)."""
        return True

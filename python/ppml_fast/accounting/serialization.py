"""Events to and from JSON-ready dicts, for files that must outlive a process (the ledger).

An event becomes ``{"type": <class name>, <field>: <value>, ...}``: nested events as nested
dicts, a tuple of events as a list, non-finite floats as the strings "Infinity" / "-Infinity"
(strict JSON has no infinities). ``event_from_dict(event_to_dict(e)) == e`` for every event class
in ``EVENT_CLASSES``; reading validates through the events' own constructors.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from ppml_fast.accounting.events import (
    ComposedEvent,
    Event,
    GaussianEvent,
    LaplaceEvent,
    PoissonSampledEvent,
    RandomizedResponseEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
)
from ppml_fast.accounting.sampling_events import (
    BallsInBinsEvent,
    ShuffledBatchesEvent,
    TruncatedPoissonEvent,
)

EVENT_CLASSES: tuple[type, ...] = (
    GaussianEvent,
    LaplaceEvent,
    RandomizedResponseEvent,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ComposedEvent,
    ShuffledBatchesEvent,
    BallsInBinsEvent,
    TruncatedPoissonEvent,
)
_BY_NAME = {cls.__name__: cls for cls in EVENT_CLASSES}
_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf}


def event_to_dict(event: Event) -> dict:
    """``event`` as a dict of JSON types (str, int, float, list, dict)."""
    cls = type(event)
    if _BY_NAME.get(cls.__name__) is not cls:
        raise TypeError(f"event must be one of {sorted(_BY_NAME)}; got {cls.__name__} {event!r}")
    out: dict[str, Any] = {"type": cls.__name__}
    for field in dataclasses.fields(event):
        out[field.name] = _to_json(getattr(event, field.name), f"{cls.__name__}.{field.name}")
    return out


def _to_json(value: object, where: str) -> object:
    if isinstance(value, Event):
        return event_to_dict(value)
    if isinstance(value, tuple):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):  # a name (ShuffledBatchesEvent.adjacency); never a non-finite spelling
        if value in _NON_FINITE:
            raise ValueError(f"{where} must not be the string {value!r}")
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if math.isnan(v):
            raise ValueError(f"{where} must not be NaN")
        return v if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")
    raise TypeError(f"{where} must be an event, a tuple, a number or a string; got {type(value).__name__}")


def event_from_dict(data: dict) -> Event:
    """The event ``data`` (as made by ``event_to_dict``) describes; ValueError when it describes
    none (unknown type, missing or unexpected fields, values the event's checks refuse)."""
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict; got {type(data).__name__}")
    return _from_dict(data, "event")


def _from_dict(data: dict, where: str) -> Event:
    name = data.get("type")
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{where}['type'] must be one of {sorted(_BY_NAME)}; got {name!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in data]
    unexpected = sorted(str(k) for k in data if k != "type" and k not in names)
    if missing or unexpected:
        raise ValueError(
            f"{where} ({name}) must have the fields {names}; missing {missing}, unexpected {unexpected}"
        )
    kwargs = {n: _from_json(data[n], f"{where}.{n}") for n in names}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} is not a valid {name}: {e}") from e


def _from_json(value: object, where: str) -> object:
    if isinstance(value, dict):
        return _from_dict(value, where)
    if isinstance(value, list):
        return tuple(_from_json(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, str):  # "Infinity" / "-Infinity" are floats; any other string a name
        return _NON_FINITE.get(value, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise ValueError(f"{where} must be an event dict, a list, a number or a string; got {value!r}")

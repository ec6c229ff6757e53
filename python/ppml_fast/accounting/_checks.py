"""Argument checks of the accounting package (which imports nothing else from ppml_fast):
each error names the argument, what was expected and what came."""

from __future__ import annotations

import math
import numbers


def real(name: str, value: object) -> float:
    """A real number that is not NaN (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v


def _expect(name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}; got {value!r}")


def positive(name: str, value: object) -> float:
    v = real(name, value)
    _expect(name, value, v > 0 and math.isfinite(v), "a finite number > 0")
    return v


def non_negative(name: str, value: object) -> float:
    v = real(name, value)
    _expect(name, value, v >= 0 and math.isfinite(v), "finite and >= 0")
    return v


def open_unit(name: str, value: object) -> float:
    v = real(name, value)
    _expect(name, value, 0 < v < 1, "in (0, 1)")
    return v

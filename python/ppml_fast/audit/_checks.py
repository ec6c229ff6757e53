"""Argument checks of the audit package: each error names the argument, what was expected and
what came (the real-number checks are the accounting package's)."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ppml_fast.accounting._checks import non_negative, open_unit, positive, real

__all__ = ["count", "delta", "non_negative", "open_unit", "positive", "real", "scores", "seed"]


def count(name: str, value: object, *, minimum: int = 0) -> int:
    """An int >= ``minimum`` (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def seed(name: str, value: object) -> int:
    """A seed in [0, 2**63)."""
    v = count(name, value)
    if v >= 2**63:
        raise ValueError(f"{name} must be an int in [0, 2**63); got {value!r}")
    return v


def delta(name: str, value: object) -> float:
    """A delta in [0, 1)."""
    v = real(name, value)
    if not 0 <= v < 1:
        raise ValueError(f"{name} must be in [0, 1); got {value!r}")
    return v


def scores(name: str, value: object) -> np.ndarray:
    """A 1-d array of finite float64 attack scores (a tensor, numpy array or sequence)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a 1-d sequence of real numbers; got {type(value).__name__}") from e
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-d; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; got NaN or inf")
    return arr

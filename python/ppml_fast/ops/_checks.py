"""Argument checks shared by the ops: each error names the argument, what was expected and
what came, and is raised before any tensor is touched."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from ppml_fast.ops._native import SUPPORTED_DTYPES

_UINT64 = 1 << 64
_INT64 = 1 << 63


def positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}; got {value!r}")
    return v


def seed_value(name: str, value: object) -> int:
    """A seed in [0, 2**64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    v = int(value)
    if not 0 <= v < _UINT64:
        raise ValueError(f"{name} must be in [0, 2**64); got {v}")
    return v


def offset_value(name: str, value: object) -> int:
    """A stream offset in [0, 2**63)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    v = int(value)
    if not 0 <= v < _INT64:
        raise ValueError(f"{name} must be in [0, 2**63); got {v}")
    return v


def seed_to_int64(seed: int) -> int:
    """Two's-complement view of a uint64 seed (torch schemas carry int64)."""
    return seed - _UINT64 if seed >= _INT64 else seed


def seed_from_int64(seed: int) -> int:
    return seed + _UINT64 if seed < 0 else seed


def floating_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({names}); got {t.dtype}")
    return t


def tensor_list(name: str, tensors: object, *, min_ndim: int = 0) -> list[torch.Tensor]:
    """A non-empty list/tuple of floating tensors on one device with one dtype."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors; got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} must not be empty")
    out = [floating_tensor(f"{name}[{i}]", t) for i, t in enumerate(tensors)]
    first = out[0]
    for i, t in enumerate(out):
        if t.dim() < min_ndim:
            raise ValueError(
                f"{name}[{i}] must have at least {min_ndim} dimension(s); got shape {tuple(t.shape)}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name} must all be on one device; {name}[0] is on {first.device}, "
                f"{name}[{i}] is on {t.device}"
            )
    return out


def same_dtype(name: str, tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.dtype != dtype:
            raise TypeError(
                f"{name} must all have one dtype; {name}[0] is {dtype}, {name}[{i}] is {t.dtype}"
            )
    return dtype


def choice(name: str, value: object, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value  # type: ignore[return-value]


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return value

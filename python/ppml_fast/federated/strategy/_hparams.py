"""Checks for strategy hyper-parameters: each error names the argument, what was expected and
what came, and is raised before any attribute is set (so a failed constructor leaves nothing)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

import torch

__all__ = ["check_int", "check_positive", "check_real", "check_state_vector"]


def check_int(name: str, value: Any, lo: int) -> int:
    """``value`` as an int ``>= lo``; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {lo}; got {value!r} ({type(value).__name__})")
    if value < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {value}")
    return int(value)


def check_real(name: str, value: Any, *, lo: float, hi: float = math.inf,
               lo_open: bool = False, hi_open: bool = True) -> float:
    """``value`` as a finite float in the interval given by ``lo``/``hi`` (open ends as flagged)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number; got {value!r}")
    v = float(value)
    if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}; got {value}")
    return v


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite float > 0: TypeError for a non-number, ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_state_vector(state: Mapping[str, Any], key: str,
                       numel: Optional[int]) -> Optional[torch.Tensor]:
    """``state[key]``: None or a 1-D floating tensor (of ``numel`` entries when given), copied."""
    if key not in state:
        raise ValueError(f"state_dict is missing the key {key!r}")
    v = state[key]
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
        raise TypeError(f"state_dict[{key!r}] must be None or a 1-D floating tensor; got "
                        f"{type(v).__name__ if not isinstance(v, torch.Tensor) else tuple(v.shape)}")
    if numel is not None and v.numel() != numel:
        raise ValueError(f"state_dict[{key!r}] has {v.numel()} entries, expected {numel}")
    return v.detach().clone()

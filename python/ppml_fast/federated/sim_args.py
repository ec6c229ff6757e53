"""Argument checks of :func:`~ppml_fast.federated.run_simulation` (moved out of simulation.py,
unchanged): each error names the argument, what was expected and what came."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from .client import Client

__all__ = ["check_cids", "check_int", "check_local_dp", "check_real"]


def check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}; got {v}")
    return int(v)


def check_real(name: str, v: Any, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise TypeError(f"{name} must be a finite real number; got {v!r}")
    x = float(v)
    if x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}; got {v}")
    return x


def check_cids(clients: Any) -> list[int]:
    if not isinstance(clients, Sequence) or isinstance(clients, (str, bytes)) or not clients:
        raise ValueError(f"clients must be a non-empty sequence of Client; got {type(clients).__name__}"
                         + ("" if not isinstance(clients, Sequence) else f" of length {len(clients)}"))
    cids = []
    for i, c in enumerate(clients):
        if not isinstance(c, Client):
            raise TypeError(f"clients[{i}] must be a ppml_fast.federated.Client; got {type(c).__name__}")
        cids.append(i if c.cid is None else c.cid)
    if len(set(cids)) != len(cids):
        dup = next(c for c in cids if cids.count(c) > 1)
        raise ValueError(f"clients must have distinct cids (a client without one takes its position); "
                         f"cid {dup} appears twice")
    return cids


def check_local_dp(local_dp: Any) -> None:
    if local_dp is None:
        return
    try:
        from .dp.local import LocalDP
    except ImportError as e:  # pragma: no cover - the dp subpackage ships with this one
        raise ValueError("local_dp needs ppml_fast.federated.dp.LocalDP, which is not available") from e
    if not isinstance(local_dp, LocalDP):
        raise TypeError(f"local_dp must be a ppml_fast.federated.dp.LocalDP or None; got {type(local_dp).__name__}")

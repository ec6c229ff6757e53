"""Records of a user's batch and the crafted neighbouring batches the sensitivity checker
(:mod:`ppml_fast.audit.sensitivity`) compares it with.

A batch is ``(inputs, target)``: ``inputs`` a tensor, a tuple/list of tensors (``model(*inputs)``)
or a dict (``model(**inputs)``); ``target`` a tensor, None, or the same kinds of structure.
The number of records B is read as the engine reads it: the first tensor of ``inputs``, its
dim 0 (dim 1 when ``batch_first=False`` and it has two dims or more). A *record* is the slice
at one index along that dim of every tensor whose size there equals B (with
``batch_first=False``, 1-D tensors of size B, e.g. labels, are sliced along dim 0); other tensors
(and non-tensors) are shared by all records and never changed.

Crafted records change only the first floating-point (for ``scaled``/``cancel``/``negated``)
or the first integer (``repeat``/``mixed``) per-record tensor of ``inputs``: the data, not the
masks or labels that may follow it. Any such record is a valid record: the guarantee is for
every possible record, however unlikely.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

SCALE = 1e3  # the scaled-up copy of a record
CANCEL_RATIO = 2.0**30  # |M r| over the size of the record's own first position (see cancel)


def _map(obj: Any, fn: Callable[[torch.Tensor, str], Any], path: str = "") -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj, path)
    if isinstance(obj, dict):
        return {k: _map(v, fn, f"{path}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(v, fn, f"{path}[{i}]") for i, v in enumerate(obj))
    return obj


def _tensors(obj: Any) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = []
    _map(obj, lambda t, p: out.append((p, t)))
    return out


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class Records:
    """The records of ``batch`` and the batches made of them (see the module docstring)."""

    def __init__(self, batch: Any, *, batch_first: bool = True) -> None:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError("batch must be a pair (inputs, target) (target may be None); got "
                            f"{type(batch).__name__}"
                            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        inputs, target = batch
        if not isinstance(inputs, (torch.Tensor, tuple, list, dict)):
            raise TypeError("batch[0] (inputs) must be a tensor, a tuple of tensors or a dict; got "
                            f"{type(inputs).__name__}")
        first = _tensors(inputs)
        if not first:
            raise ValueError("batch[0] (inputs) holds no tensor: the records cannot be found")
        x = first[0][1]
        if x.dim() == 0:
            raise ValueError(f"the first input tensor{first[0][0]} is a scalar: no record dimension")
        self.dim = 0 if batch_first or x.dim() < 2 else 1
        self.size = int(x.shape[self.dim])
        if self.size < 2:
            raise ValueError(f"batch must hold at least 2 records; the first input tensor has "
                             f"{self.size} along dim {self.dim}")
        self.inputs, self.target = inputs, target

    # -- which tensors are per record -----------------------------------------------------------
    def record_dim(self, t: torch.Tensor) -> Optional[int]:
        """The dim of ``t`` that indexes records, or None when ``t`` is shared."""
        if t.dim() > self.dim and t.shape[self.dim] == self.size:
            return self.dim
        if self.dim == 1 and t.dim() == 1 and t.shape[0] == self.size:
            return 0
        return None

    def _per_record(self, fn: Callable[[torch.Tensor, int], torch.Tensor], obj: Any) -> Any:
        def go(t: torch.Tensor, _path: str) -> torch.Tensor:
            d = self.record_dim(t)
            return t if d is None else fn(t, d)
        return _map(obj, go)

    def _both(self, fn) -> tuple:
        return (self._per_record(fn, self.inputs), self._per_record(fn, self.target))

    # -- batches ----------------------------------------------------------------------------------
    def batch(self) -> tuple:
        return (self.inputs, self.target)

    def select(self, index: list[int]) -> tuple:
        """The batch of the records at ``index`` (in that order)."""
        return self._both(lambda t, d: t.index_select(d, torch.tensor(index, device=t.device)))

    def without(self, i: int) -> tuple:
        return self.select([j for j in range(self.size) if j != i])

    def record(self, i: int) -> tuple:
        """Record ``i`` as a batch of one (per-record tensors keep their record dim, size 1)."""
        return self._both(lambda t, d: t.narrow(d, i, 1))

    def plus(self, rec: tuple) -> tuple:
        """This batch with the one-record batch ``rec`` appended."""
        return self._join(rec, None)

    def replaced(self, i: int, rec: tuple) -> tuple:
        """This batch with record ``i`` replaced by the one-record batch ``rec``."""
        return self._join(rec, i)

    def _join(self, rec: tuple, i: Optional[int]) -> tuple:
        new = iter(t for _, t in _tensors(rec))

        def go(t: torch.Tensor, _path: str) -> torch.Tensor:
            r = next(new)
            d = self.record_dim(t)
            if d is None:
                return t
            if i is None:
                return torch.cat([t, r.to(t.dtype)], dim=d)
            return torch.cat([t.narrow(d, 0, i), r.to(t.dtype), t.narrow(d, i + 1, self.size - i - 1)], dim=d)

        return _map(self.inputs, go), _map(self.target, go)

    # -- crafted records ----------------------------------------------------------------------------
    def _first(self, want: Callable[[torch.Tensor], bool]) -> Optional[str]:
        for path, t in _tensors(self.inputs):
            if self.record_dim(t) is not None and want(t):
                return path
        return None

    def has_float(self) -> bool:
        return self._first(torch.is_floating_point) is not None

    def has_sequence(self) -> bool:
        """The first floating-point per-record input is (B, T, d) (or (T, B, d)) with T >= 2."""
        path = self._first(torch.is_floating_point)
        t = next((v for q, v in _tensors(self.inputs) if q == path), None)
        return t is not None and t.dim() == 3 and t.shape[self._pos_dim(t)] >= 2

    def has_tokens(self) -> bool:
        """The first integer per-record input has positions (a record of 1 dim or more)."""
        path = self._first(_is_int)
        t = next((v for q, v in _tensors(self.inputs) if q == path), None)
        return t is not None and t.dim() >= 2

    def _pos_dim(self, t: torch.Tensor) -> int:
        """The first dim of ``t`` after removing its record dim (the record's positions)."""
        return 1 if self.record_dim(t) == 0 else 0

    def crafted(self, kind: str, i: int, generator: torch.Generator) -> tuple:
        """Record ``i`` changed as ``kind`` says, as a one-record batch:

        - ``copy``: record ``i`` unchanged (a duplicate);
        - ``scaled`` / ``negated``: its first float input times 1e3 / -1e3;
        - ``cancel`` (float (B, T, d) inputs): positions 0 and 1 become ``a + M e_k`` and
          ``a - M e_k``, the others 0, with ``a`` the record's first position (its coordinate k,
          random, set to 0) and M a power of two 2^30 times a typical position's norm (2^10 for
          float16, whose range ends at 65504): every product is exact, so a layer that mixes
          positions linearly (a sum or mean over T, attention's values) sees ``2a`` exactly, and
          the Gram-matrix ("ghost") norm of a Linear on the positions, a sum of terms of size
          M^2 that cancel, reads 0 in float32 and float64 alike while the record's true gradient
          is as large as its neighbours' (issue 14, item 2; the ghost norm: Li et al. 2021,
          section 4);
        - ``repeat`` (integer inputs): every position holds the record's first token;
        - ``mixed`` (integer inputs): position t holds the token of record (i + 1 + t) mod B at
          position t (tokens shared with other records).
        """
        rec_inputs, rec_target = self.record(i)
        if kind == "copy":
            return rec_inputs, rec_target
        if kind in ("scaled", "negated", "cancel"):
            path = self._first(torch.is_floating_point)
        elif kind in ("repeat", "mixed"):
            path = self._first(_is_int)
        else:
            raise ValueError(f"unknown crafted kind {kind!r}")
        if path is None:
            raise ValueError(f"crafted kind {kind!r} needs a per-record "
                             f"{'float' if kind in ('scaled', 'negated', 'cancel') else 'integer'} input")

        whole = next(v for q, v in _tensors(self.inputs) if q == path)
        d = self.record_dim(whole)
        pos = 1 if d == 0 else 0  # the record's positions (T) in the sliced tensor

        def change(t: torch.Tensor, p: str) -> torch.Tensor:
            if p != path:
                return t
            if kind in ("scaled", "negated"):
                return t * (SCALE if kind == "scaled" else -SCALE)
            if kind == "cancel":
                return self._cancel(t, pos, generator)
            if t.dim() < 2:
                return t
            if kind == "repeat":
                return t.narrow(pos, 0, 1).expand_as(t).clone()
            return self._mixed(whole, t, d, pos, i)

        return _map(rec_inputs, change), rec_target

    def _cancel(self, t: torch.Tensor, pos: int, generator: torch.Generator) -> torch.Tensor:
        x = t.detach().to(torch.float64)
        size = x.pow(2).sum(dim=-1).mean().sqrt().clamp_min(2.0**-20)  # a typical position's norm
        k = int(torch.randint(x.shape[-1], (1,), generator=generator))
        big = 2.0 ** (round(math.log2(float(size))) + (30 if t.dtype != torch.float16 else 10))
        a = x.select(pos, 0).clone()
        a[..., k] = 0.0  # M e_k orthogonal to a: every product of the Gram matrix is exact
        out = torch.zeros_like(x)
        out.select(pos, 0).copy_(a)
        out.select(pos, 1).copy_(a)
        out.select(pos, 0)[..., k] = big
        out.select(pos, 1)[..., k] = -big
        return out.to(t.dtype)

    def _mixed(self, whole: torch.Tensor, t: torch.Tensor, d: int, pos: int, i: int) -> torch.Tensor:
        out = t.clone()
        for s in range(t.shape[pos]):
            j = (i + 1 + s) % self.size
            out.select(pos, s).copy_(whole.narrow(d, j, 1).select(pos, s))
        return out

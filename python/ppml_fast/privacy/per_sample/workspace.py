"""Memory for the per-sample tensors of a DP step on the CPU, reused from one step to the next.

Why (issue 16): the materialise path keeps every layer's per-sample weight gradients ``(B, p, d)``
until the clipped sums, i.e. megabytes of fresh memory per step. glibc serves such blocks from
fresh pages (``mmap`` above its threshold, or a heap top it trimmed after the last step), and a
first touch of a page costs a page fault: on this VM ~1,150 faults per step of a 21-layer MLP,
which made each layer's norms 0.14 ms instead of 0.076 ms (the same calls into reused memory).
The non-private step does not see this (autograd's weight gradients are parameter-sized). CUDA
needs none of this (its caching allocator already reuses blocks): only CPU tensors come from here.

How: :meth:`Workspace.arena` opens, for one DP step's norms, a bump allocator over one flat buffer
per dtype; :func:`empty` (what the rules call instead of ``torch.empty``) hands out disjoint,
contiguous, 64-byte aligned slices of it while an arena is open on this thread, and fresh memory
otherwise. What the step needs beyond the buffer comes from fresh memory, and the buffer is grown
to the step's need at the next arena.

Safety: a slice is handed out again only when nothing refers to the buffer any more. At each
arena the buffer's storage use count (``torch._C._storage_Use_Count``) is compared with the count
it had when nothing but the workspace held it; any live view (a plan kept for a retry after
NonFiniteGradientError, a kept gradient the user holds, a step running on another thread) keeps
the count up, and the arena then allocates a new buffer instead of reusing the old one. Within an
arena slices never overlap. Without ``_storage_Use_Count`` (another torch) nothing is reused.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

_ALIGN_BYTES = 64  # one cache line / one AVX-512 register
_local = threading.local()
# Module switch: False gives every per-sample tensor fresh memory whatever a workspace's
# ``enabled`` says (tests and A/B timings compare)
ENABLED = True


def _use_count(t: Tensor) -> Optional[int]:
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    return int(fn(t.untyped_storage()._cdata))


class _Buffer:
    """One flat buffer of one dtype and the use count it has when nothing else refers to it."""

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        self.tensor = torch.empty(numel, dtype=dtype)
        # the storage's Python object too: a caller holding ``t.untyped_storage()`` of a slice
        # holds that one object (it adds nothing to the use count; review S7)
        self.storage = self.tensor.untyped_storage()
        self.idle_count = _use_count(self.tensor)
        self.idle_refs = sys.getrefcount(self.storage)

    def idle(self) -> bool:
        return (self.idle_count is not None and _use_count(self.tensor) == self.idle_count
                and sys.getrefcount(self.storage) == self.idle_refs)


class _Arena:
    """The bump allocator of one step: slices of the workspace's buffers, then fresh memory."""

    def __init__(self, buffers: dict) -> None:
        self.buffers = buffers  # dtype -> _Buffer (idle when the arena opened) or None
        self.used: dict[torch.dtype, int] = {}

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        n = math.prod(shape)
        start = self.used.get(dtype, 0)
        align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        stop = start + -(-n // align) * align
        self.used[dtype] = stop
        buf = self.buffers.get(dtype)
        if buf is None or stop > buf.tensor.numel():
            return torch.empty(tuple(shape), dtype=dtype)
        return buf.tensor[start:start + n].view(tuple(shape))


class Workspace:
    """The reusable per-sample memory of one private model (one per
    :class:`~ppml_fast.privacy.module.PrivateModule`), **off by default**: opt in per model
    with ``model.workspace.enabled = True``.

    Why off: the buffer is held between steps, i.e. also during the next forward and backward,
    when the activations peak. On the models bench (issue 16) that raised the step's peak
    memory (counting the workspace) from 1.74x to 2.56x non-private on BERT, 1.03x to 1.74x on
    GPT-2, while the step's time moved by no more than the run's noise (an in-process A/B gave
    2-4 %; the page faults it avoids depend on glibc's heap state). It pays where fresh blocks
    always fault (above glibc's 32 MiB mmap threshold) and memory is not the limit."""

    enabled = False  # the default of every workspace; an instance's own value overrides it

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[torch.dtype, _Buffer] = {}
        self._need: dict[torch.dtype, int] = {}  # elements the last arena used, per dtype
        self._open = False

    def __reduce__(self):  # a copy or an unpickled model starts with an empty workspace
        return (Workspace, (), {"enabled": self.enabled})

    def __setstate__(self, state: dict) -> None:
        self.enabled = bool(state.get("enabled", False))

    @property
    def nbytes(self) -> int:
        """Bytes the workspace holds between steps."""
        return sum(b.tensor.numel() * b.tensor.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Lets go of the buffers (the next step allocates them again)."""
        with self._lock:
            self._buffers.clear()
            self._need.clear()

    def _reserve(self) -> Optional[dict]:
        with self._lock:
            if self._open:  # another thread's step is between its arena's open and close
                return None
            if self.idle_count_missing():
                return None  # no use count (another torch): never reused, nothing allocated
            self._open = True
            try:
                for dt, need in self._need.items():
                    buf = self._buffers.get(dt)
                    if buf is None or not buf.idle() or buf.tensor.numel() < need:
                        # in use (a view is alive) or too small: a new one; the old one lives
                        # on as long as its views do
                        self._buffers[dt] = _Buffer(need, dt)
                return {dt: b for dt, b in self._buffers.items() if b.idle()}
            except BaseException:  # e.g. MemoryError: the next step may try again
                self._open = False
                raise

    @staticmethod
    def idle_count_missing() -> bool:
        return getattr(torch._C, "_storage_Use_Count", None) is None

    @contextlib.contextmanager
    def arena(self) -> Iterator[None]:
        """:func:`empty` hands out this workspace's memory on this thread inside the block."""
        buffers = self._reserve() if ENABLED and self.enabled else None
        arena = _Arena(buffers) if buffers is not None else None
        before = getattr(_local, "arena", None)
        _local.arena = arena
        try:
            yield
        finally:
            _local.arena = before
            if arena is not None:
                with self._lock:
                    self._open = False
                    for dt, used in arena.used.items():
                        self._need[dt] = max(used, self._need.get(dt, 0))


def empty(shape: Sequence[int], *, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.empty(shape)`` with ``like``'s device and ``dtype`` (default ``like.dtype``): from
    the open arena of this thread for CPU tensors, else fresh memory."""
    dtype = like.dtype if dtype is None else dtype
    arena = getattr(_local, "arena", None)
    if arena is None or like.device.type != "cpu":
        return torch.empty(tuple(shape), dtype=dtype, device=like.device)
    return arena.take(shape, dtype)

"""Keep the memory a CPU training step frees in the process's heap, so that the next step does
not fault its pages in again (glibc only; issue 16).

Why. torch's CPU allocator takes every tensor from ``malloc``. glibc serves a block above its
mmap threshold from fresh ``mmap`` pages, and gives the top of its heap back to the kernel when
more than its trim threshold is free there. Both thresholds start low (128 KiB / 256 KiB) and
glibc raises them itself when it frees a mapped block (``mmap_threshold = size of that block``,
``trim_threshold = 2 * mmap_threshold``, up to ``DEFAULT_MMAP_THRESHOLD_MAX`` = 32 MiB on 64-bit;
glibc ``malloc/malloc.c``, ``__libc_free``). Where a process ends up depends on which blocks it
happened to free first, so the same DP step faulted 0 pages in one process and 500-1,200 (each a
zeroed 4 KiB page, 1-4 us on the development VM) in another: measured on the models bench
(bench-size BERT and GPT-2, ``ru_minflt`` per step, session 9), where the per-sample tensors of
one step (megabytes, freed at its end) came back as fresh pages at the next.

What. :func:`keep_freed_memory` sets both thresholds to the values glibc's own rule converges
to (32 MiB / 64 MiB) with ``mallopt``, once per process, before the first private model's first
step. Steady training then reuses its freed blocks. The cost: up to 64 MiB of free heap stays
mapped between steps (the step needs it again) instead of being handed back; blocks of 32 MiB or
more are still mapped and unmapped as before. Peak memory is unchanged (the profiler-counted
live tensor bytes are the same, and the heap's high-water mark is the step's own). Not done
where the user chose for themselves (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` /
``MALLOC_TOP_PAD_`` set, or ``PPML_FAST_KEEP_HEAP=0``), off glibc (macOS, musl, Windows: no
change), or where ``ENABLED`` is False.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Optional

# glibc malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest glibc accepts
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # glibc's rule: twice the mmap threshold
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
              "GLIBC_TUNABLES")
ENV_SWITCH = "PPML_FAST_KEEP_HEAP"
ENABLED = True  # module switch (tests, A/B timings)

_lock = threading.Lock()
_state: dict = {"done": False, "result": None}


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    # gnu_get_libc_version exists in glibc only (musl has a mallopt that does nothing)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def why_not() -> Optional[str]:
    """Why :func:`keep_freed_memory` would leave malloc as it is (None: it would set it)."""
    if not ENABLED:
        return "ppml_fast.privacy.heap.ENABLED is False"
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen = [v for v in _USER_VARS[:3] if v in os.environ]
    if "malloc." in tunables:
        chosen.append("GLIBC_TUNABLES (malloc.*)")
    if chosen:
        return f"the user set {', '.join(chosen)}"
    if _glibc() is None:
        return "not glibc"
    return None


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds once per process (module docstring); True when this
    process's thresholds are ours (set now or by an earlier call)."""
    with _lock:
        if _state["done"]:
            return bool(_state["result"])
        reason = why_not()
        ok = False
        if reason is None:
            libc = _glibc()
            # mallopt returns 1 on success; the mmap threshold first (setting either turns off
            # glibc's dynamic adjustment of both)
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
        _state["done"] = reason is None or _state["done"]
        _state["result"] = ok
        return ok

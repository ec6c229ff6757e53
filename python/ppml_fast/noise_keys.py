"""Where noise keys come from, and how a noise stream stays fresh across threads and forks.

DESIGN.md, privacy invariant 3: noise keys come from OS entropy (``os.urandom``) unless the user
passes a noise seed; a seeded run says it is not private against whoever knows the seed
(:data:`REPRODUCIBLE_NOISE`); seeds for data, sampling and initialisation never key noise; a
noise offset range is reserved atomically before use and never reused; in secure mode a seed
is an error (:func:`noise_seed`).

Forks. A process created by ``os.fork()`` (DataLoader workers, ``multiprocessing`` with the
"fork" start method) inherits every noise stream with its key and offset, so parent and child
would draw the same noise. Every stream registered here (:class:`NoiseStream`,
:func:`rekey_after_fork`) is re-keyed in the child, before any code of the child runs:

- a key drawn from OS entropy (no user seed) gets a fresh ``os.urandom`` key;
- a user-given seed gets a key derived from it, ``SHA-256(key, fork number)`` (the fork number
  counts this process's forks, so two children of one parent, and a child and its own children,
  all get different keys, while the parent keeps its key). The run stays reproducible when its
  forks happen in the same order, and no two processes share a stream. (Refusing seeded
  streams in the child was the alternative; it breaks DataLoader workers that merely hold one.)

Threads: :meth:`NoiseStream.reserve` reads and advances the offset under a lock, so threads
sharing one stream get disjoint offset ranges.

Resumes (:func:`resume_key`, the one rule every loader of a saved noise state follows: the DP
optimizer, correlated noise, the federated DP strategies): a saved state continues its key only
when the key is the user's (an OS-drawn key is never saved) and there is evidence that nothing
reserved offsets under it after the state was saved — the journal the state was saved with, or
the user's explicit word; otherwise the noise is re-keyed from OS entropy at offset 0.

Copies: a :class:`NoiseStream` copied by ``pickle`` or ``copy.deepcopy`` (a "spawn" worker, a
Ray task, a deep-copied strategy) would draw its original's noise; an unseeded copy therefore
gets a fresh OS key. A seeded copy keeps its key and offset (a pickled checkpoint must resume
the same stream): give each process that draws noise its own seed.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import threading
import weakref
from typing import Any, Callable, Optional

#: What a run whose noise was keyed from a user-given seed says about itself (History, reports).
REPRODUCIBLE_NOISE = "reproducible noise: no privacy against anyone who knows the seed"

#: Offsets (Philox blocks) are 64-bit counters; a stream refuses to pass 2**63 so that every
#: offset and every ``offset + blocks`` fits a signed 64-bit integer (torch schemas) unwrapped.
OFFSET_LIMIT = 1 << 63

__all__ = ["REPRODUCIBLE_NOISE", "NoiseStream", "os_key", "noise_seed", "rekey_after_fork",
           "reserve_range", "resume_key"]


def os_key() -> int:
    """A 64-bit noise key from the operating system's CSPRNG."""
    return int.from_bytes(os.urandom(8), "little")


def noise_seed(name: str, seed: object, *, secure: bool = False) -> Optional[int]:
    """Validates a user's noise seed: None, or an int in [0, 2**64). With ``secure`` a seed is
    an error (secure-mode noise is keyed from OS entropy for every call; a seed would be
    silently ignored, and a user who passes one expects reproducible noise)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be None or an int in [0, 2**64); got {seed!r}")
    if secure:
        raise ValueError(
            f"{name}={seed!r} was passed with secure mode: secure-mode randomness is keyed from OS "
            f"entropy and cannot be seeded; pass {name}=None, or turn secure mode off for "
            f"reproducible noise ({REPRODUCIBLE_NOISE})")
    return int(seed)


def reserve_range(offset: int, blocks: int) -> int:
    """``offset + blocks``, refusing (ValueError) a range that would pass :data:`OFFSET_LIMIT`."""
    if blocks < 0 or offset < 0 or offset + blocks > OFFSET_LIMIT:
        raise ValueError(
            f"noise offset range [{offset}, {offset} + {blocks}) does not fit the 2**63 blocks of a "
            "noise stream: the counter would wrap and repeat noise; start a new stream (new key)")
    return offset + blocks


def resume_key(seed: Optional[int], offset: int, *, unused_from: Optional[int]) -> tuple[int, int, bool]:
    """The noise key and first offset of a resumed stream: ``(key, offset, continued)``.

    ``seed``/``offset``: the saved state's key (None: the key was drawn from OS entropy and, by
    rule, not saved) and next offset. ``unused_from``: evidence about what happened after the
    state was saved — the first offset that nobody can have reserved under ``seed`` since (the
    journal the state was saved with: the end of its last range under the key; the user's
    explicit assurance: ``offset``), or None when nothing vouches for it (a fresh journal, a
    copy, none: the run may have released rounds or steps after the state, under the saved key's
    next offsets).

    The saved key continues — at ``max(offset, unused_from)`` — only with a saved key *and* such
    evidence; otherwise a fresh OS key at offset 0 (``continued`` False: the caller must treat
    the key as OS-drawn, never save it, and say that the noise is not reproducible past the
    resume). Reusing the saved key's offsets would draw the same Gaussian twice, and anyone who
    sees both releases could subtract it (DESIGN.md invariant 3; issue 15).
    """
    if seed is not None and unused_from is not None:
        return int(seed), reserve_range(max(int(offset), int(unused_from)), 0), True
    return os_key(), 0, False


def derived_key(key: int, fork_number: int) -> int:
    """The key a seeded stream takes in a forked child: SHA-256 of (key, fork number)."""
    h = hashlib.sha256(b"ppml_fast fork" + key.to_bytes(8, "little") + fork_number.to_bytes(8, "little"))
    return int.from_bytes(h.digest()[:8], "little")


# -- fork registry ------------------------------------------------------------------------------
_registry: "weakref.WeakKeyDictionary[Any, Callable[[Any, int], None]]" = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
_forks = 0  # forks this process has made (the child sees the number of its own fork)


def _before_fork() -> None:
    global _forks
    _forks += 1
    _registry_lock.acquire()  # no registration half-done in the child


def _after_fork_in_parent() -> None:
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for obj, rekey in list(_registry.items()):
        rekey(obj, _forks)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def rekey_after_fork(obj: Any, attr: str = "seed", *, user_seeded: bool) -> None:
    """Registers ``obj`` (held weakly) so that ``obj.<attr>``, a 64-bit noise key, is re-keyed in
    a forked child as the module docstring says: fresh from OS entropy, or (``user_seeded``)
    derived from the key and the fork number."""

    def rekey(o: Any, fork_number: int) -> None:
        key = getattr(o, attr, None)
        if isinstance(key, int):
            setattr(o, attr, derived_key(key, fork_number) if user_seeded else os_key())

    with _registry_lock:
        _registry[obj] = rekey


class NoiseStream:
    """A Philox key and the next unused offset, shared safely by threads and forks.

    Args:
        seed: the user's noise seed, or None to key from OS entropy.
        name: the argument name used in errors.
        secure: secure mode, where a seed is an error (:func:`noise_seed`).
    """

    def __init__(self, seed: Optional[int] = None, *, name: str = "seed", secure: bool = False) -> None:
        seed = noise_seed(name, seed, secure=secure)
        self.user_seeded = seed is not None
        self.seed = os_key() if seed is None else seed
        self.offset = 0
        self._lock = threading.Lock()
        _registry_lock.acquire()
        try:
            _registry[self] = NoiseStream._after_fork
        finally:
            _registry_lock.release()

    @staticmethod
    def _after_fork(self: "NoiseStream", fork_number: int) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork
        self.seed = derived_key(self.seed, fork_number) if self.user_seeded else os_key()

    @property
    def reproducible(self) -> bool:
        """True when the key came from a user-given seed (see :data:`REPRODUCIBLE_NOISE`)."""
        return self.user_seeded

    def reserve(self, blocks: int) -> tuple[int, int]:
        """Atomically reserves ``blocks`` Philox blocks: returns (key, first offset) and moves the
        offset past them, so no other thread or later call gets any of them."""
        with self._lock:
            start = self.offset
            self.offset = reserve_range(start, int(blocks))
            return self.seed, start

    def advance_to(self, offset: int) -> None:
        """Moves the offset forward to ``offset`` (a restored state); never backwards."""
        with self._lock:
            self.offset = max(self.offset, reserve_range(int(offset), 0))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if not self.user_seeded:  # a copy must not replay its original's noise
            self.seed = os_key()
        with _registry_lock:
            _registry[self] = NoiseStream._after_fork

    def __repr__(self) -> str:
        how = "user seed" if self.user_seeded else "OS entropy"
        return f"NoiseStream(key from {how}, offset={self.offset})"

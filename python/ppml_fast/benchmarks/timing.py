"""Wall-clock timing: warm-up calls, then the median and IQR of timed runs.

Each run is one call timed with ``time.perf_counter`` with the garbage collector paused; torch
uses its own thread count (``torch.get_num_threads()``), which the report prints. The impls of
one case are timed in rounds (one call of each per round), so that a slow drift of the machine
(other guests on a shared host) moves them all alike and the ratios stay fair.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Profile:
    """How long to time each impl.

    Timed runs stop at ``repeats``, or earlier once ``min_runs`` are done and the timed runs
    took ``max_seconds`` in total. ``costly`` says where impls with seconds of preparation
    (torch.compile) run: ``"all"`` cases, only where they carry a ``"targets"``, or ``"none"``.
    """

    name: str
    warmup: int
    repeats: int
    min_runs: int
    max_seconds: float = math.inf
    costly: str = "all"

    def __post_init__(self) -> None:
        if not 1 <= self.min_runs <= self.repeats:
            raise ValueError(
                f"Profile needs 1 <= min_runs <= repeats; got {self.min_runs} and {self.repeats}"
            )
        if self.costly not in ("all", "targets", "none"):
            raise ValueError(
                f"Profile.costly must be 'all', 'targets' or 'none'; got {self.costly!r}"
            )


PROFILES = {
    # ppml-fast bench --quick: under a minute on a 2-core CPU, allocation included. No
    # torch.compile: its compilation alone takes 10-20 s per shape there.
    "quick": Profile("quick", warmup=1, repeats=9, min_runs=3, max_seconds=1.0, costly="none"),
    # The reference conditions of ../shared/ANCHORS.md: warm-ups, then the median of 15.
    "full": Profile("full", warmup=2, repeats=15, min_runs=15),
}


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of ``runs`` timed calls, in milliseconds."""

    median_ms: float
    iqr_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, times: list[float]) -> "Timing":
        if not times:
            raise ValueError("Timing needs at least one run; got none")
        ms = sorted(t * 1e3 for t in times)
        if len(ms) >= 2:
            q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            q1 = q3 = ms[0]
        return cls(median_ms=statistics.median(ms), iqr_ms=q3 - q1, runs=len(ms))


def time_interleaved(fns: dict[str, Callable[[], object]], profile: Profile) -> dict[str, Timing]:
    """Time already warmed-up callables in rounds; each stops by ``profile``'s rules."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    active = list(fns)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while active:
            for key in list(active):
                start = time.perf_counter()
                fns[key]()
                t = times[key]
                t.append(time.perf_counter() - start)
                done = len(t) >= profile.repeats or (
                    len(t) >= profile.min_runs and sum(t) >= profile.max_seconds
                )
                if done:
                    active.remove(key)
    finally:
        if was_enabled:
            gc.enable()
    return {k: Timing.from_seconds(v) for k, v in times.items()}

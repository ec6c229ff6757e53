"""Wall-clock timing: warm-up calls, then the median and IQR of timed runs.

Each run is one call timed with ``time.perf_counter`` with the garbage collector paused; torch
uses its own thread count (``torch.get_num_threads()``), which the report prints.
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


def time_call(fn: Callable[[], object], profile: Profile) -> Timing:
    """Call ``fn`` ``profile.warmup`` times untimed, then time it as ``profile`` says."""
    for _ in range(profile.warmup):
        fn()
    was_enabled = gc.isenabled()
    gc.disable()
    times: list[float] = []
    try:
        while len(times) < profile.repeats:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            if len(times) >= profile.min_runs and sum(times) >= profile.max_seconds:
                break
    finally:
        if was_enabled:
            gc.enable()
    return Timing.from_seconds(times)

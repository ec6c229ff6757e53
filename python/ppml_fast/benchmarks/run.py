"""Runs benchmark cases one at a time and turns timings into result rows.

A row is a plain dict (the JSON format of ``ppml-fast bench --json``): ``case``, ``impl``,
``role``, ``median_ms``, ``iqr_ms``, ``runs``, ``versus`` (the ppml_fast impl it is compared
with), ``ratio`` (baseline: baseline ms / ppml_fast ms, the speedup; floor: ppml_fast ms /
floor ms), ``target`` (e.g. ``">= 4.00x"`` or None), ``met`` (bool or None) and ``error``
(None, or why the impl could not run: e.g. torch.compile without a C++ compiler; its timing
fields are then None).
"""

from __future__ import annotations

import gc
from typing import Callable, Iterable, Optional

from ppml_fast.benchmarks.cases import Case, Impl
from ppml_fast.benchmarks.timing import Profile, Timing, time_interleaved

Row = dict[str, object]


def selected(impl: Impl, profile: Profile) -> bool:
    """Whether ``profile`` times ``impl`` (costly impls may be limited to those with targets)."""
    if not impl.costly or profile.costly == "all":
        return True
    return profile.costly == "targets" and impl.target is not None


def ratio(case: Case, impl: Impl, timings: dict[str, Timing]) -> Optional[float]:
    """The row's ratio, or None for a ppml_fast impl or when a side was not timed."""
    ref = case.reference(impl)
    if ref is None or ref.key not in timings or impl.key not in timings:
        return None
    mine, theirs = timings[ref.key].median_ms, timings[impl.key].median_ms
    if impl.role == "floor":
        return mine / theirs if theirs > 0 else None
    return theirs / mine if mine > 0 else None


def case_rows(
    case: Case, timings: dict[str, Timing], errors: Optional[dict[str, str]] = None
) -> list[Row]:
    """Result rows of the timed (or failed) impls of ``case``, in the case's order."""
    errors = errors or {}
    rows: list[Row] = []
    for impl in case.impls:
        if impl.key not in timings and impl.key not in errors:
            continue
        t = timings.get(impl.key)
        r = ratio(case, impl, timings)
        ref = case.reference(impl)
        rows.append(
            {
                "case": case.name,
                "case_key": case.key,
                "impl": impl.name,
                "impl_key": impl.key,
                "role": impl.role,
                "median_ms": None if t is None else t.median_ms,
                "iqr_ms": None if t is None else t.iqr_ms,
                "runs": None if t is None else t.runs,
                "versus": None if ref is None else ref.key,
                "ratio": r,
                "target": None if impl.target is None else str(impl.target),
                "met": None if impl.target is None or r is None else impl.target.met(r),
                "error": errors.get(impl.key),
            }
        )
    return rows


NOT_INSTALLED = "not installed"


def not_installed(e: ImportError) -> str:
    """A row's error for a baseline whose package is missing: which one, and which extra has
    it (the bench extra holds every baseline's package: Opacus, dp-accounting, Flower)."""
    what = e.name or (str(e).strip().splitlines() or ["a module"])[0][:120]
    return f"{NOT_INSTALLED}: {what} (pip install 'ppml_fast[bench]')"


def run_cases(
    cases: Iterable[Case],
    profile: Profile,
    *,
    progress: Optional[Callable[[str], None]] = None,
) -> list[Row]:
    """Time every selected impl of every case; each case's inputs are freed before the next.

    An impl that raises is reported with its error and the run goes on, except a ppml_fast
    impl: its failure is a bug and propagates.
    """
    rows: list[Row] = []
    for case in cases:
        if progress:
            progress(f"{case.name}: allocating")
        inputs = case.setup()
        timings: dict[str, Timing] = {}
        errors: dict[str, str] = {}
        ready: dict[str, Callable[[], object]] = {}
        try:
            for impl in case.impls:
                if not selected(impl, profile):
                    continue
                if progress:
                    progress(f"{case.name}: {impl.name} (warm-up)")
                try:
                    fn = impl.make(inputs)
                    for _ in range(profile.warmup):
                        fn()
                    ready[impl.key] = fn
                except ImportError as e:  # a baseline's package is missing: not a failure
                    if impl.role == "ppml_fast":
                        raise
                    errors[impl.key] = not_installed(e)
                except Exception as e:
                    if impl.role == "ppml_fast":
                        raise
                    first_line = (str(e).strip().splitlines() or [""])[0][:200]
                    errors[impl.key] = f"{type(e).__name__}: {first_line}"
            if progress:
                progress(f"{case.name}: timing {len(ready)} implementations in rounds")
            timings = time_interleaved(ready, profile)
        finally:
            del inputs
            gc.collect()
        rows.extend(case_rows(case, timings, errors))
    return rows

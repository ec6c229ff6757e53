"""The benchmark harness on fake cases: which impls run, ratio directions, targets, failures."""

from __future__ import annotations

import dataclasses

import pytest

from ppml_fast.benchmarks import Case, Impl, Target, Timing, case_rows, format_table, run_cases
from ppml_fast.benchmarks.timing import PROFILES, Profile

FAST = Profile("test", warmup=0, repeats=2, min_runs=1)


def _fail(_inputs):
    raise RuntimeError("no C++ compiler\nsecond line")


def _case(**extra) -> Case:
    noop = lambda _inputs: (lambda: None)  # noqa: E731
    impls = (
        Impl("ppml", "ours", noop, role="ppml_fast"),
        Impl("rival", "rival", noop, target=Target(">=", 2.0)),
        Impl("floor", "floor", noop, role="floor", target=Target("<=", 1.25)),
        Impl("slow", "costly untargeted", noop, costly=True),
        Impl("broken", "broken", _fail),
    )
    return Case("c", "case c", lambda: {}, impls + tuple(extra.values()))


def test_ratio_directions_and_targets():
    timings = {
        "ppml": Timing(10.0, 0.0, 3),
        "rival": Timing(30.0, 0.0, 3),
        "floor": Timing(9.0, 0.0, 3),
    }
    rows = {r["impl_key"]: r for r in case_rows(_case(), timings)}
    assert set(rows) == {"ppml", "rival", "floor"}
    assert rows["ppml"]["ratio"] is None and rows["ppml"]["met"] is None
    assert rows["rival"]["ratio"] == pytest.approx(3.0) and rows["rival"]["met"] is True
    assert rows["floor"]["ratio"] == pytest.approx(10 / 9) and rows["floor"]["met"] is True
    slow_floor = dict(timings, floor=Timing(7.0, 0.0, 3))
    assert case_rows(_case(), slow_floor)[2]["met"] is False  # 10/7 > 1.25


def test_run_reports_a_failing_baseline_and_skips_costly_impls():
    quick = dataclasses.replace(FAST, costly="targets")
    rows = {r["impl_key"]: r for r in run_cases([_case()], quick)}
    assert "slow" not in rows  # costly and without a target
    assert rows["broken"]["median_ms"] is None
    assert rows["broken"]["error"] == "RuntimeError: no C++ compiler"
    table = format_table(list(rows.values()))
    assert "failed: broken at case c: RuntimeError: no C++ compiler" in table
    assert "slow" in {r["impl_key"] for r in run_cases([_case()], FAST)}  # costly="all"


def test_a_failing_ppml_fast_impl_is_raised():
    bad = Impl("ppml2", "ours, broken", _fail, role="ppml_fast")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        run_cases([_case(bad=bad)], FAST)


def test_profiles_and_timing():
    assert PROFILES["quick"].costly == "none" and PROFILES["full"].repeats >= 15
    t = Timing.from_seconds([0.004, 0.001, 0.002, 0.003, 0.005])
    assert (t.median_ms, t.iqr_ms, t.runs) == (pytest.approx(3.0), pytest.approx(2.0), 5)
    with pytest.raises(ValueError, match="min_runs"):
        Profile("bad", warmup=0, repeats=2, min_runs=3)


def test_time_interleaved_runs_in_rounds_and_stops_each_impl_by_the_profile():
    from ppml_fast.benchmarks.timing import time_interleaved

    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in ("a", "b", "c")}
    timings = time_interleaved(fns, Profile("t", warmup=0, repeats=3, min_runs=1))
    assert order == ["a", "b", "c"] * 3
    assert all(t.runs == 3 and t.median_ms >= 0 for t in timings.values())

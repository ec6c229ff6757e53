"""pytest-benchmark of one DP-SGD step: ppml_fast against non-private torch and Opacus 1.6
(issue 4, item 8).

The cases are :func:`ppml_fast.benchmarks.dp_step.dp_step_cases` (M1 MLP, M2 MNIST CNN, M3 text
transformer); the session ends with the ratios against the baselines measured in this run
(bench/conftest.py): non-private is the floor of ppml_fast ghost (target <= 1.20x), every Opacus
mode a baseline (target >= 1.00x). A baseline that refuses the model (Opacus on plain
``nn.MultiheadAttention``) or is not installed is skipped with its reason, listed at the end.

After each impl is timed, its peak RSS growth over 3 steps is measured in a fresh process
(:func:`ppml_fast.benchmarks.dp_step.peak_rss`; ~3-10 s each) and printed in a second table at
the end; ``PPML_BENCH_PEAK_MEMORY=0`` turns that off. Run::

    pip install ".[bench]"   # Opacus
    PYTHONPATH=python python -m pytest bench/bench_dp_step.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest

from ppml_fast.benchmarks import Timing
from ppml_fast.benchmarks.dp_step import dp_step_cases, format_peak_memory, peak_rss

MEMORY = os.environ.get("PPML_BENCH_PEAK_MEMORY", "1") != "0"


class _Report:
    """A plugin registered for the session: prints refusals and peak memory after the ratios."""

    def __init__(self) -> None:
        self.memory: list[dict] = []
        self.refused: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.refused:
            terminalreporter.section("ppml_fast: DP-step baselines that did not run")
            for line in self.refused:
                terminalreporter.write_line(line)
        if self.memory:
            terminalreporter.section(
                "ppml_fast: peak memory of one DP-SGD step (fresh process per impl)")
            for line in format_peak_memory(self.memory).splitlines():
                terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def dp_report(pytestconfig: pytest.Config) -> _Report:
    name = "ppml_dp_step_report"
    plugin = pytestconfig.pluginmanager.get_plugin(name)
    if plugin is None:
        plugin = _Report()
        pytestconfig.pluginmanager.register(plugin, name)
    return plugin


CASES = dp_step_cases  # parametrized by bench/conftest.py


def test_dp_step(benchmark, case, impl, case_inputs, profile, record_timing, dp_report,
                 pytestconfig):
    benchmark.group = case.name
    benchmark.extra_info.update(role=impl.role, impl=impl.name)
    try:
        fn = impl.make(case_inputs.get(case))
    except Exception as e:
        if impl.role == "ppml_fast":
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        dp_report.refused.append(f"{impl.name} at {case.name}: {type(e).__name__}: {first}")
        pytest.skip(f"{impl.name}: {type(e).__name__}: {first}")
    benchmark.pedantic(fn, rounds=profile.repeats, warmup_rounds=profile.warmup, iterations=1)
    if benchmark.stats:
        s = benchmark.stats.stats
        record_timing(case, impl.key, Timing(s.median * 1e3, s.iqr * 1e3, s.rounds))
    if MEMORY:
        del fn
        mem = peak_rss(case.key, impl.key, pytestconfig.getoption("ppml_sizes"))
        benchmark.extra_info.update(peak_rss_growth_mb=mem.get("growth_mb"))
        dp_report.memory.append({"case": case.name, "impl": impl.name, **mem})

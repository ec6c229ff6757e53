"""pytest-benchmark of the native ops against their baselines (issue 2, item 6).

One benchmark per (case, implementation) of :func:`ppml_fast.benchmarks.op_cases`, grouped by
case; the session ends with the table of ratios against the baselines measured in this run
(bench/conftest.py). Run::

    PYTHONPATH=python python -m pytest bench/bench_ops.py --benchmark-only

``--ppml-profile quick`` for fewer rounds, ``--ppml-sizes tiny`` for a smoke run.
"""

from __future__ import annotations

import pytest

from ppml_fast.benchmarks import Timing, op_cases
from ppml_fast.benchmarks.run import selected
from ppml_fast.benchmarks.timing import PROFILES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    profile = PROFILES[config.getoption("ppml_profile")]
    pairs = [
        pytest.param(case, impl, id=f"{case.key}-{impl.key}")
        for case in op_cases(config.getoption("ppml_sizes"))
        for impl in case.impls
        if selected(impl, profile)
    ]
    metafunc.parametrize(("case", "impl"), pairs)


def test_op(benchmark, case, impl, case_inputs, profile, record_timing):
    benchmark.group = case.name
    benchmark.extra_info.update(role=impl.role, impl=impl.name)
    fn = impl.make(case_inputs.get(case))
    benchmark.pedantic(fn, rounds=profile.repeats, warmup_rounds=profile.warmup, iterations=1)
    if benchmark.stats:  # None/empty with --benchmark-disable
        s = benchmark.stats.stats
        record_timing(case, impl.key, Timing(s.median * 1e3, s.iqr * 1e3, s.rounds))

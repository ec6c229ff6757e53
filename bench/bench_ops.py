"""pytest-benchmark of the native ops against their baselines (issue 2, item 6).

One benchmark per (case, implementation) of :func:`ppml_fast.benchmarks.op_cases`, grouped by
case; the session ends with the table of ratios against the baselines measured in this run
(bench/conftest.py). Run::

    PYTHONPATH=python python -m pytest bench/bench_ops.py --benchmark-only

``--ppml-profile quick`` for fewer rounds, ``--ppml-sizes tiny`` for a smoke run.
"""

from __future__ import annotations


from ppml_fast.benchmarks import Timing, op_cases


CASES = op_cases  # parametrized by bench/conftest.py


def test_op(benchmark, case, impl, case_inputs, profile, record_timing):
    benchmark.group = case.name
    benchmark.extra_info.update(role=impl.role, impl=impl.name)
    fn = impl.make(case_inputs.get(case))
    benchmark.pedantic(fn, rounds=profile.repeats, warmup_rounds=profile.warmup, iterations=1)
    if benchmark.stats:  # None/empty with --benchmark-disable
        s = benchmark.stats.stats
        record_timing(case, impl.key, Timing(s.median * 1e3, s.iqr * 1e3, s.rounds))

"""pytest-benchmark of the accountants against dp-accounting and Opacus (issue 3, item 9).

The cases are :func:`ppml_fast.benchmarks.accounting.accounting_cases` (the same table that
``ppml-fast bench`` runs); the session ends with the ratios against the baselines measured in
this run (bench/conftest.py). Run::

    pip install ".[bench]"   # dp-accounting and Opacus
    PYTHONPATH=python python -m pytest bench/bench_accounting.py --benchmark-only
"""

from __future__ import annotations

import pytest

from ppml_fast.benchmarks import Timing
from ppml_fast.benchmarks.accounting import accounting_cases


CASES = accounting_cases  # parametrized by bench/conftest.py


def test_accountant(benchmark, case, impl, case_inputs, profile, record_timing):
    benchmark.group = case.name
    benchmark.extra_info.update(role=impl.role, impl=impl.name)
    try:
        fn = impl.make(case_inputs.get(case))
    except ImportError as e:  # a baseline's package is not installed
        pytest.skip(f"{impl.name}: {e}")
    benchmark.pedantic(fn, rounds=profile.repeats, warmup_rounds=profile.warmup, iterations=1)
    if benchmark.stats:
        s = benchmark.stats.stats
        record_timing(case, impl.key, Timing(s.median * 1e3, s.iqr * 1e3, s.rounds))

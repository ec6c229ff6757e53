"""pytest-benchmark of one federated round (issue 5, item 9): ppml_fast's vectorized backend
against its sequential backend, a plain torch loop and Flower 1.42's Ray simulation, on digits
(MLP 64-64-10, IID, batch 16, lr 0.1, every client each round) for N = 100 and 1,000, and the
vectorized backend alone at N = 10,000 generated clients.

The cases are :func:`ppml_fast.benchmarks.federated.federated_cases`; the session ends with the
ratios against the baselines measured in this run (bench/conftest.py). Flower's impl is costly
(its Ray actors start in the preparation; a round at N = 1,000 takes seconds): the ``quick``
profile leaves it out. Run::

    pip install ".[bench]" ray   # Flower 1.42 and Ray, for the Flower baseline
    PYTHONPATH=python python -m pytest bench/bench_federated.py --benchmark-only
"""

from __future__ import annotations

import pytest

from ppml_fast.benchmarks import Timing
from ppml_fast.benchmarks.federated import federated_cases

CASES = federated_cases  # parametrized by bench/conftest.py


def test_federated_round(benchmark, case, impl, case_inputs, profile, record_timing):
    benchmark.group = case.name
    benchmark.extra_info.update(role=impl.role, impl=impl.name)
    try:
        fn = impl.make(case_inputs.get(case))
    except ImportError as e:  # a baseline's package is not installed
        pytest.skip(f"{impl.name}: {e}")
    benchmark.pedantic(fn, rounds=profile.repeats, warmup_rounds=profile.warmup, iterations=1)
    del fn  # a Flower impl stops its simulation when its callable goes
    if benchmark.stats:
        s = benchmark.stats.stats
        record_timing(case, impl.key, Timing(s.median * 1e3, s.iqr * 1e3, s.rounds))

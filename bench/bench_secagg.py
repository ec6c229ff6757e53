"""pytest-benchmark of secure aggregation against the plain aggregation (issue 7, item 1).

The cases are :func:`ppml_fast.benchmarks.secagg.secagg_cases`: one round for 100 clients x 10^6
parameters (masking + unmasking alone, a SecAgg+ round, a complete-graph round), each against
``weighted_aggregate`` of the same updates; the session ends with the overhead ratios (secure ms
/ plain ms, bench/conftest.py). A complete-graph round takes tens of seconds on 2 cores, so the
secure impls are timed at most ``MAX_ROUNDS`` times after one warm-up (the plain floor: the
profile's rounds). Run::

    PYTHONPATH=python python -m pytest bench/bench_secagg.py --benchmark-only
"""

from __future__ import annotations

from ppml_fast.benchmarks import Timing
from ppml_fast.benchmarks.secagg import secagg_cases

CASES = secagg_cases  # parametrized by bench/conftest.py
MAX_ROUNDS = 5


def test_secagg(benchmark, case, impl, case_inputs, profile, record_timing):
    benchmark.group = case.name
    benchmark.extra_info.update(role=impl.role, impl=impl.name)
    fn = impl.make(case_inputs.get(case))
    heavy = impl.role == "ppml_fast"
    rounds = min(profile.repeats, MAX_ROUNDS) if heavy else profile.repeats
    warmup = min(profile.warmup, 1) if heavy else profile.warmup
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats:
        s = benchmark.stats.stats
        record_timing(case, impl.key, Timing(s.median * 1e3, s.iqr * 1e3, s.rounds))

"""The secure-aggregation case table (ppml_fast.benchmarks.secagg): the cases, their plain
floor, and the tiny cases running through the same harness as ``ppml-fast bench``."""

from __future__ import annotations

import pytest

from ppml_fast.benchmarks import secagg
from ppml_fast.benchmarks.run import run_cases
from ppml_fast.benchmarks.timing import Profile

FAST = Profile("test", warmup=0, repeats=1, min_runs=1)


def test_table_and_floor():
    cases = secagg.secagg_cases("full")
    assert [c.key for c in cases] == ["secagg-masking", "secagg-plus-round", "secagg-round"]
    for case in cases:
        assert "100 clients x 1,000,000 parameters" in case.name
        ppml, floor = case.impls
        assert ppml.role == "ppml_fast" and floor.role == "floor" and floor.key == "plain"
        assert case.reference(floor).key == ppml.key
    with pytest.raises(ValueError, match="sizes must be one of"):
        secagg.secagg_cases("huge")


def test_tiny_cases_run_and_the_masked_sum_is_right():
    rows = run_cases(secagg.secagg_cases("tiny"), FAST)
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    assert all(r["ratio"] > 0 for r in rows if r["role"] == "floor")
    # the masking case decodes to the plain sum of its inputs
    inputs = secagg._setup(*secagg.SIZES["tiny"])()
    total = secagg._masking(inputs)()
    plain = inputs["updates"].double().sum(0)
    assert float((total - plain).abs().max()) < 4 * 2 * secagg.CLIP_RANGE / (2**30 - 1)

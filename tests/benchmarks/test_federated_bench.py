"""The federated round benchmark's cases (python/ppml_fast/benchmarks/federated.py) on tiny
sizes: every non-costly impl runs one round, the table has its rows, bad arguments are named."""

from __future__ import annotations

import pytest
import torch

from ppml_fast.benchmarks import Profile, run_cases
from ppml_fast.benchmarks.federated import federated_cases, scale_round

ONE_RUN = Profile("test", warmup=0, repeats=1, min_runs=1, costly="none")


def test_tiny_cases_run(restore_threads):
    torch.set_num_threads(1)
    cases = federated_cases("tiny", "cpu")
    assert [c.key for c in cases] == ["federated-round-5", "federated-round-10", "federated-round-40"]
    assert {i.key for i in cases[1].impls} == {"vectorized", "sequential", "plain", "flower"}
    assert next(i for i in cases[1].impls if i.key == "flower").costly
    rows = run_cases(cases, ONE_RUN)
    assert [(r["case_key"], r["impl_key"]) for r in rows] == [
        ("federated-round-5", "vectorized"), ("federated-round-5", "sequential"), ("federated-round-5", "plain"),
        ("federated-round-10", "vectorized"), ("federated-round-10", "sequential"), ("federated-round-10", "plain"),
        ("federated-round-40", "vectorized")]
    assert all(r["error"] is None and r["median_ms"] > 0 for r in rows)


def test_full_cases_carry_the_issue_targets():
    cases = federated_cases("full", "cpu")
    assert [c.key for c in cases] == ["federated-round-100", "federated-round-1000", "federated-round-10000"]
    targets = {i.key: str(i.target) for i in cases[1].impls if i.target is not None}
    assert targets == {"sequential": ">= 10.00x", "flower": ">= 100.00x"}
    assert "< 10 s" in cases[2].name


def test_scale_round_reports_time_and_memory(restore_threads):
    torch.set_num_threads(1)
    out = scale_round(30, device="cpu", rounds=1)
    assert out["clients"] == 30 and out["seconds_per_round"] > 0 and "peak_rss_growth_mib" in out


def test_bad_arguments():
    with pytest.raises(ValueError, match="sizes"):
        federated_cases("huge")
    with pytest.raises(ValueError, match="device"):
        federated_cases("tiny", "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            federated_cases("tiny", "cuda")

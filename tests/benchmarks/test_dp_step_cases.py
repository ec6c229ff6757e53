"""The DP-step case table (ppml_fast.benchmarks.dp_step): its roles and targets, the tiny cases
running, Opacus rows failing cleanly without Opacus, and the peak-memory probe."""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys

import pytest
import torch

from ppml_fast.benchmarks import dp_step
from ppml_fast.benchmarks.run import run_cases
from ppml_fast.benchmarks.timing import Profile

FAST = Profile("test", warmup=0, repeats=1, min_runs=1)
MODELS = ("dp-step-mlp", "dp-step-cnn", "dp-step-text")


@pytest.mark.parametrize("sizes", ["full", "tiny"])
def test_table_has_each_model_its_impls_and_the_targets(sizes):
    cases = dp_step.dp_step_cases(sizes)
    assert [c.key for c in cases] == list(MODELS)
    for case in cases:
        impls = {i.key: i for i in case.impls}
        assert case.impls[0].key == "ppml_ghost" and case.impls[0].role == "ppml_fast"
        assert impls["ppml_materialize"].role == "ppml_fast"
        floor = impls["nonprivate"]
        assert floor.role == "floor" and case.reference(floor).key == "ppml_ghost"
        assert str(floor.target) == "<= 1.20x"
        opacus = [i for k, i in impls.items() if k.startswith("opacus_")]
        assert {"opacus_hooks", "opacus_ghost"} <= {i.key for i in opacus}
        for i in opacus:
            assert i.role == "baseline" and case.reference(i).key == "ppml_ghost"
            assert str(i.target) == ">= 1.00x"
    assert {"opacus_hooks_dpmha", "opacus_ghost_dpmha"} <= {i.key for i in cases[2].impls}
    with pytest.raises(ValueError, match="sizes must be one of"):
        dp_step.dp_step_cases("huge")


def test_full_sizes_are_those_of_issue_4():
    full = dp_step.SIZES["full"]
    assert full["mlp"] == {"batch": 256, "widths": (784, 512, 256, 10)}
    assert full["cnn"] == {"batch": 256}
    assert full["text"] == {"batch": 32, "vocab": 10_000, "d": 128, "heads": 4, "ff": 256,
                            "seq": 64, "dropout": 0.1}
    net = dp_step.SampleConvNet()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("case", dp_step.dp_step_cases("tiny"), ids=lambda c: c.key)
def test_tiny_ppml_fast_impls_step_with_finite_losses(case):
    inputs = case.setup()
    impls = {i.key: i for i in case.impls}
    losses = {}
    for key in ("ppml_ghost", "ppml_materialize", "nonprivate"):
        fn = impls[key].make(inputs)
        losses[key] = [float(fn()) for _ in range(2)]
        assert all(math.isfinite(v) for v in losses[key]), (key, losses[key])
    # same model, batch, seed and noise: both ppml_fast paths take the same step
    assert losses["ppml_ghost"] == pytest.approx(losses["ppml_materialize"], rel=1e-4)


def test_opacus_rows_are_errors_when_opacus_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus -> ImportError
    monkeypatch.setitem(sys.modules, "opacus.validators", None)
    importlib.reload(dp_step)  # imports without Opacus
    mlp = dp_step.dp_step_cases("tiny")[0]
    rows = {r["impl_key"]: r for r in run_cases([mlp], FAST)}
    assert rows["ppml_ghost"]["median_ms"] is not None
    assert rows["nonprivate"]["ratio"] is not None
    for key in ("opacus_hooks", "opacus_ghost"):
        assert rows[key]["median_ms"] is None
        # not a failure: the bench extra is missing, and the row says so
        assert rows[key]["error"] == "not installed: opacus (pip install 'ppml_fast[bench]')"


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus: backward hooks, secure RNG
def test_tiny_opacus_impls_run_and_refuse_plain_attention():
    pytest.importorskip("opacus")
    cases = [dataclasses.replace(c, impls=tuple(i for i in c.impls if i.key == "ppml_ghost"
                                                 or i.key.startswith("opacus_")))
             for c in dp_step.dp_step_cases("tiny")]
    rows = {(r["case_key"], r["impl_key"]): r for r in run_cases(cases, FAST)}
    for model in MODELS:
        for key in ("opacus_hooks", "opacus_ghost"):
            row = rows[(model, key)]
            if model == "dp-step-text":
                assert row["median_ms"] is None and "MultiheadAttention" in row["error"]
            else:
                assert row["error"] is None and row["ratio"] > 0
    for key in ("opacus_hooks_dpmha", "opacus_ghost_dpmha"):
        assert rows[("dp-step-text", key)]["error"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_in_a_fresh_process():
    mem = dp_step.peak_rss("dp-step-mlp", "nonprivate", "tiny", steps=2, timeout=120)
    assert mem["error"] is None, mem
    assert mem["growth_mb"] >= 0 and mem["peak_mb"] >= mem["rss_before_mb"]
    table = dp_step.format_peak_memory([{"case": "c", "impl": "i", **mem},
                                        {"case": "c", "impl": "j", "error": "boom"}])
    assert "peak RSS growth" in table and "failed: j at c: boom" in table

"""The real-models bench (ppml_fast.benchmarks.models, ``ppml-fast bench --only models``) and
the step profile (benchmarks.profile_step) at the tiny "test" sizes: the rows' structure, finite
positive ratios, peak memory, refusals reported as rows (never a crash), the CLI route, and the
profile's phases coming from the engine's record_function labels."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

from ppml_fast import cli
from ppml_fast.benchmarks import model_zoo, models, profile_step
from ppml_fast.benchmarks.model_zoo import ModelSpec

QUICK = dict(size="test", steps=2, warmup=1)


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_two_models_rows_and_ratios():
    rows = models.run_models(model_zoo.select_models(["bert", "gpt2-lora"]), **QUICK)
    assert [(r["model"], r["engine"]) for r in rows] == [
        (m, e) for m in ("bert", "gpt2-lora") for e in models.ENGINES]
    for r in rows:
        assert r["refused"] is None, r
        assert _finite(r["median_ms"]) and _finite(r["ratio"]) and r["runs"] == 2
        assert _finite(r["peak_mb"]) and _finite(r["memory_ratio"])
        assert r["batch"] == 4 and r["params"] > 0
        if r["engine"] == "nonprivate":
            assert r["ratio"] == 1.0 and r["memory_ratio"] == 1.0
    assert models.check_rows(rows) == []
    table = models.format_models_table(rows, {"cpu": "x"})
    assert table.count("\n| ") == 3 and "[gpt2-lora]" in table  # header + two models
    lora = next(r for r in rows if r["model"] == "gpt2-lora" and r["engine"] == "nonprivate")
    assert lora["params"] < next(r for r in rows if r["model"] == "bert")["params"]  # LoRA only


def test_opacus_runs_its_own_rnn_and_gpt2_tied_head_is_refused_by_opacus_ghost():
    rows = models.run_models(model_zoo.select_models(["gpt2", "lstm"]), memory=False, **QUICK)
    by = {(r["model"], r["engine"]): r for r in rows}
    assert "Parameter tying" in str(by["gpt2", "opacus_ghost"]["refused"])
    assert by["gpt2", "opacus_ghost"]["median_ms"] is None and by["gpt2", "opacus_ghost"]["ratio"] is None
    assert by["lstm", "opacus_hooks"]["note"] == "DPLSTM" and by["lstm", "opacus_hooks"]["refused"] is None
    assert by["lstm", "ppml_fast"]["note"] is None
    assert models.check_rows(rows) == []
    assert "refused: Opacus ghost at gpt2: NotImplementedError" in models.format_models_table(rows)


class _RowsMixed(nn.Module):
    """Flattens (B, T, d) to (B*T, d) before a Linear: ppml_fast refuses it at step() (its rows
    are not records, DESIGN.md invariant 1)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, model_zoo.CLASSES)

    def forward(self, input_ids):
        h = self.embedding(input_ids)
        b, t, d = h.shape
        return self.fc(h.reshape(b * t, d)).reshape(b, t, -1).mean(1)


def test_a_refused_model_is_a_row_not_a_crash(capsys):
    spec = ModelSpec("rows-mixed", "rows mixed", model_zoo._seeded(lambda s: _RowsMixed()),
                     lambda s, g: ({"input_ids": torch.randint(0, 20, (4, 5), generator=g)},
                                   torch.randint(0, model_zoo.CLASSES, (4,), generator=g)))
    rows = models.run_models([spec], engines=("nonprivate", "ppml_fast"), **QUICK)
    ppml = rows[1]
    assert ppml["engine"] == "ppml_fast" and ppml["refused"].startswith("UnsupportedModuleError")
    assert "not per record" in ppml["refused"] and ppml["median_ms"] is None
    assert "refused: ppml_fast at rows-mixed: UnsupportedModuleError" in models.format_models_table(rows)
    [row] = profile_step.profile_models([spec], size="test", steps=1, warmup=1)
    assert row["refused"].startswith("UnsupportedModuleError")
    assert "| rows-mixed | refused |" in profile_step.format_profile_table([row])


def test_without_transformers_its_models_say_not_installed_and_the_rest_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    rows = models.run_models(model_zoo.select_models(["bert", "gru"]), memory=False, **QUICK)
    bert = [r for r in rows if r["model"] == "bert"]
    assert len(bert) == 4 and all(str(r["refused"]).startswith("not installed: transformers") for r in bert)
    assert all(r["refused"] is None or r["engine"].startswith("opacus") for r in rows if r["model"] == "gru")
    assert models.check_rows(rows) == []
    assert "| not installed |" in models.format_models_table(rows)


def test_cli_only_models_quick_json(capsys):
    code = cli.main(["bench", "--only", "models", "--quick", "--models", "vit", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["meta"]["bench"] == "models" and out["meta"]["cpu"] and out["meta"]["torch"]
    assert out["meta"]["cpu_isa"] in ("avx512f", "avx2", "avx", "sse4_2", "none", "unknown")
    assert out["meta"]["torch_threads"] == 1
    assert {r["engine"] for r in out["results"]} == set(models.ENGINES)
    assert all(_finite(r["ratio"]) for r in out["results"])


def test_unknown_model_is_an_error(capsys):
    assert cli.main(["bench", "--only", "models", "--quick", "--models", "nope"]) == 2
    assert "unknown model(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="size must be one of"):
        models.run_models(model_zoo.select_models(["bert"]), size="huge")


def test_profile_phases_come_from_the_engine_markers():
    [row] = profile_step.profile_models(model_zoo.select_models(["bert"]), size="test", steps=2)
    assert row["refused"] is None
    ph = row["phases"]
    assert set(ph) == set(profile_step.PHASES)
    for k in ("norms", "factors", "clipped_sums", "noise", "optimizer"):
        assert ph[k] is not None and ph[k] >= 0, (k, ph)  # the labels in clipping.py / release.py fired
    assert row["dp_ms"] > 0 and row["nonprivate_ms"] > 0
    assert sum(v for k, v in ph.items() if k != "capture") <= row["ms"]["dp::step"] * 1.001


def test_engine_phase_labels_are_free_without_a_profiler():
    from torch.profiler import ProfilerActivity, profile

    from ppml_fast.privacy import profiling

    assert profiling.phase("ppml::norms") is profiling._OFF  # no op dispatched per step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with profiling.phase("ppml::norms"):
            torch.ones(1).add_(1)
    assert "ppml::norms" in {e.key for e in prof.key_averages()}

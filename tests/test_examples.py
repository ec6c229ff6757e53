"""The examples in examples/ run and do what their docstrings say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dp_sgd_drop_in_stops_at_the_budget(restore_threads, capsys):
    out = _load("dp_sgd_drop_in").main(["--epochs", "20", "--max-epsilon", "3.0"])
    assert out["stopped_at"] is not None and out["epsilon"] <= 3.0
    assert out["accuracy"] > 0.6  # 0.83 measured (seed 0): a trained model, not chance (0.1)
    assert "budget reached" in capsys.readouterr().out


def test_budget_control_refuses_an_overspend(restore_threads, tmp_path):
    path = tmp_path / "ledger.json"
    out = _load("budget_control").main(["--ledger", str(path), "--budget", "4.0", "--epochs", "5"])
    assert out["refused"] and out["total"] <= 4.0
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # the ledger's log
    assert [d.get("what") for d in lines if d.get("dataset") == "digits-train"][0] == "mean image"


def test_federated_virtual_workers_trains_privately(restore_threads, capsys):
    from ppml_fast.accounting import epsilon

    out = _load("federated_virtual_workers").main(["--rounds", "40"])
    want = epsilon(noise_multiplier=1.0, sample_rate=20 / 100, steps=40, delta=1e-3)
    assert out["epsilon_by_hand"] == pytest.approx(want, rel=1e-9) == out["epsilon"]
    # 0.889 by hand and 0.886 through run_simulation measured (seed 0): trained, not chance (0.1)
    assert out["accuracy_by_hand"] > 0.8 and out["accuracy"] > 0.8
    assert out["bytes_per_update"] == 4810 * 4  # one float32 vector of the MLP 64-64-10 travels
    assert "run_simulation" in capsys.readouterr().out

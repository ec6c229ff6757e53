"""``ppml-fast demo``: the table, the comparison line, report.json and privacy_utility.png, on a
small configuration; the config's validation; the CLI's defaults match DemoConfig's."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ppml_fast.cli import DemoConfigDefaults, main
from ppml_fast.demo import DemoConfig

pytest.importorskip("sklearn")


def test_demo_writes_the_table_report_and_plot(tmp_path, capsys, restore_threads):
    rc = main(["demo", "--quick", "--clients", "20", "--rounds", "4", "--output", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "round  accuracy" in out and "vs non-private" in out and "noise sweep" in out
    report = json.loads((tmp_path / "report.json").read_text())
    cfg = report["configuration"]
    assert cfg["clients"] == 20 and cfg["rounds"] == 4 and cfg["mode"] == "dp-fedavg"
    assert report["delta"] == 1e-5 and report["accountant"] == DemoConfig().accountant and report["seed"] == 0
    rounds = report["main"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    eps = [r["epsilon"] for r in rounds]
    assert all(a < b for a, b in zip(eps, eps[1:])) and eps[-1] <= 8.0 + 1e-9  # calibrated to 8
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    assert report["baseline"]["noise_multiplier"] is None and len(report["sweep"]) == 2
    # the demo keys DP-FedAvg's noise with its seed (repeatable runs) and says so (issue 15)
    assert report["notes"] == ["reproducible noise: no privacy against anyone who knows the seed"]
    assert report["main"]["notes"] == report["notes"] and report["baseline"]["notes"] == []
    pytest.importorskip("matplotlib")
    png = (tmp_path / "privacy_utility.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_without_privacy_has_no_epsilon(tmp_path, capsys, restore_threads):
    assert main(["demo", "--quick", "--mode", "none", "--clients", "10", "--rounds", "2",
                 "--output", str(tmp_path), "--no-progress", "--no-plot"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(r["epsilon"] is None for r in report["main"]["rounds"]) and report["sweep"] == []
    assert report["notes"] == []
    assert "no privacy: test accuracy" in capsys.readouterr().out


def test_cli_help_defaults_are_democonfig_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    for name in ("clients", "rounds", "target_epsilon", "clip_norm", "strategy", "backend",
                 "alpha", "output", "proximal_mu", "seeds"):
        assert getattr(DemoConfigDefaults, name) == fields[name], name


@pytest.mark.parametrize("kw, name", [
    ({"clients": 1}, "clients"), ({"rounds": 0}, "rounds"), ({"mode": "dp"}, "mode"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"), ({"clip_norm": 0.0}, "clip_norm"),
    ({"clients": 10, "clients_per_round": 11}, "clients_per_round"), ({"delta": 1.5}, "delta"),
    ({"accountant": "gdp"}, "accountant"), ({"sweep": ()}, "sweep"),
    ({"target_epsilon": None}, "noise_multiplier or target_epsilon"),
])
def test_bad_demo_config_names_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        DemoConfig(**kw)


def test_bad_cli_value_exits_2(capsys):
    assert main(["demo", "--rounds", "0", "--no-progress"]) == 2
    assert "rounds" in capsys.readouterr().err


def test_report_json_is_strict_for_numpy_and_torch_non_finite_values(tmp_path):
    import numpy as np
    import torch

    from ppml_fast.demo.report import write_report

    path = write_report({"epsilon": np.float32("inf"), "loss": torch.tensor(float("nan")),
                         "curve": np.array([1.0, np.inf]), "plain": float("-inf")}, str(tmp_path))

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    with open(path) as f:
        d = json.load(f, parse_constant=refuse)
    assert d == {"epsilon": "inf", "loss": "nan", "curve": [1.0, "inf"], "plain": "-inf"}

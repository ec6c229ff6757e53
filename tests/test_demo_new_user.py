"""``ppml-fast demo`` as a new user meets it (issue 17 item 7): each case was measured failing
before its fix — FedProx crashed, local DP spent its budget in round 1 and skipped the rest
silently, the sweep reused spent clients, a given sigma lifted the local-DP cap, robust
strategies were listed but refused after the first run, an --output file failed after the
training, --backend ray without Ray printed a traceback, --mode none drew empty panels, the
privacy unit was never said. Small configurations: seconds each."""

from __future__ import annotations

import importlib.util
import json
import struct

import pytest

from ppml_fast.cli import main
from ppml_fast.demo import DemoConfig
from ppml_fast.demo.experiment import _strategy
from ppml_fast.demo.local_plan import plan_clients, planned_fits

pytest.importorskip("sklearn")

SMALL = ["demo", "--quick", "--clients", "6", "--rounds", "2", "--no-progress"]


def _report(path):
    return json.loads((path / "report.json").read_text())


def test_fedprox_gets_a_proximal_mu_and_runs(tmp_path, capsys):
    assert _strategy(DemoConfig(strategy="fedprox")).proximal_mu == 0.01
    assert _strategy(DemoConfig(strategy="fedprox", proximal_mu=0.5)).proximal_mu == 0.5
    with pytest.raises(ValueError, match="proximal_mu"):
        DemoConfig(proximal_mu=-1.0)
    assert main(SMALL + ["--strategy", "fedprox", "--proximal-mu", "0.1", "--no-plot",
                         "--output", str(tmp_path)]) == 0
    assert _report(tmp_path)["configuration"]["proximal_mu"] == 0.1


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_run_without_dp_fedavg_and_are_refused_before_training(strategy, tmp_path, capsys):
    assert main(SMALL + ["--mode", "none", "--strategy", strategy, "--no-plot",
                         "--output", str(tmp_path)]) == 0
    assert _report(tmp_path)["configuration"]["strategy"] == strategy
    capsys.readouterr()
    out = tmp_path / "dp"
    assert main(SMALL + ["--strategy", strategy, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--mode local-dp or --mode none" in err and "main run" not in err and not out.exists()


def test_krum_runs_under_local_dp(tmp_path, capsys):
    assert main(SMALL + ["--mode", "local-dp", "--strategy", "krum", "--no-plot",
                         "--output", str(tmp_path)]) == 0
    rounds = _report(tmp_path)["main"]["rounds"]
    assert not any(r["skipped"] for r in rounds) and 0 < rounds[-1]["epsilon"] <= 8.0


def test_local_dp_each_client_plans_its_rounds_within_the_target():
    cfg = DemoConfig(mode="local-dp", clients=10, rounds=5)
    sizes = [1, 7, 16, 17, 40, 130]  # one step per fit at q=1 up to 9 steps at q=1/9
    plans = plan_clients(cfg, sizes)
    assert all(p.fits == 5 and p.max_epsilon == 8.0 for p in plans)
    # each client's own sigma: its planned spend is the target within 1%, never above
    assert all(7.92 <= p.planned_epsilon <= 8.0 for p in plans), [p.planned_epsilon for p in plans]
    assert len({round(p.noise_multiplier, 3) for p in plans}) > 3
    # clients sampled: each plans for its expected share of the rounds
    assert planned_fits(DemoConfig(mode="local-dp", clients=10, rounds=5, clients_per_round=3)) == 2


def test_local_dp_demo_trains_every_round_and_the_sweep_starts_from_fresh_clients(tmp_path, capsys):
    assert main(["demo", "--quick", "--mode", "local-dp", "--clients", "6", "--rounds", "3",
                 "--no-progress", "--no-plot", "--output", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    report = _report(tmp_path)
    rounds = report["main"]["rounds"]
    assert not any(r["skipped"] or r["dropped"] for r in rounds)  # was: skipped after round 1
    eps = [r["epsilon"] for r in rounds]
    assert all(a < b for a, b in zip(eps, eps[1:])) and 7.9 <= eps[-1] <= 8.0
    assert "calibrates its own sigma" in captured.err
    assert "epsilon is per client, record-level" in captured.out
    # a fresh run at twice the noise spends less than the main run; reused clients carried the
    # main run's spend over (the x2 point then read >= 8)
    by_label = {s["label"]: s for s in report["sweep"]}
    assert by_label["sigma x2 (per client)"]["final_epsilon"] < 0.6 * eps[-1]
    assert by_label["sigma x0.5 (per client)"]["final_epsilon"] > 1.5 * eps[-1]
    assert report["local_dp_plan"].startswith("local-dp: each client calibrates")


def test_a_given_sigma_keeps_the_local_dp_cap_and_refusals_are_explained(tmp_path, capsys):
    assert main(["demo", "--mode", "local-dp", "--noise-multiplier", "0.7", "--clients", "6",
                 "--rounds", "3", "--no-progress", "--no-plot", "--output", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    report = _report(tmp_path)
    assert report["configuration"]["target_epsilon"] == 8.0  # was: None, no cap
    assert all(r["epsilon"] <= 8.0 for r in report["main"]["rounds"])
    refused = [d for r in report["main"]["rounds"] for d in r["dropped"] if d["reason"] == "budget"]
    assert refused, "sigma 0.7 over 3 rounds should take some clients to their cap"
    assert "stays capped at 8" in captured.err
    assert f"left out {len(refused)} client fit(s): its epsilon would pass its cap" in captured.out


def test_output_naming_a_file_fails_before_training(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert main(SMALL + ["--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "main run" not in err
    assert target.read_text() == "x"


def test_ray_backend_without_ray_is_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(SMALL + ["--backend", "ray", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'ppml_fast[ray]'" in err


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_mode_none_draws_its_accuracy_curve_only(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(SMALL + ["--mode", "none", "--output", str(tmp_path / "none")]) == 0
    assert main(SMALL + ["--output", str(tmp_path / "dp")]) == 0
    w_none, _ = _png_size(tmp_path / "none" / "privacy_utility.png")
    w_dp, _ = _png_size(tmp_path / "dp" / "privacy_utility.png")
    assert w_none == 660 and w_dp == 1200  # one panel (5.5 in) vs two (10 in) at 120 dpi
    assert "epsilon is user-level: per client" in capsys.readouterr().out


def test_seeds_give_the_sweep_and_baseline_error_bars(tmp_path, capsys):
    assert main(SMALL + ["--seeds", "2", "--output", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert len(report["baseline"]["seed_accuracies"]) == 2
    assert all(len(s["seed_accuracies"]) == 2 for s in report["sweep"])
    # the first entry is the run itself, the second a different seed's run
    assert all(s["seed_accuracies"][0] == s["final_accuracy"] for s in report["sweep"])
    assert "over 2 seeds" in capsys.readouterr().out
    with pytest.raises(ValueError, match="seeds"):
        DemoConfig(seeds=0)

"""The ``ppml-fast`` command: ``bench`` prints a table with every case and baseline, or JSON whose
ratios follow from its medians; ``python -m ppml_fast`` is the same command.

Runs at ``--sizes tiny --quick --compile none`` (seconds); only the structure and the arithmetic
are checked, never the speed (the machine may be busy).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ppml_fast
from ppml_fast.benchmarks import PROFILES, op_cases
from ppml_fast.cli import main

TINY = ["bench", "--quick", "--sizes", "tiny", "--compile", "none"]
QUICK = PROFILES["quick"]
CASES = op_cases("tiny")


def _split(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


@pytest.fixture(scope="module")
def table() -> str:
    """stdout of one tiny run, shared by the table tests."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(TINY) == 0
    return out.getvalue()


def test_table_header_and_columns(table):
    lines = table.splitlines()
    assert lines[0].startswith("date: ")
    for field in ("torch_threads: ", "sizes: tiny", "profile: quick", "cpu: "):
        assert field in lines[0]
    assert _split(lines[1]) == [
        "case", "implementation", "median ms", "IQR ms", "runs", "ratio", "target", "met?"
    ]
    assert set(lines[2]) <= {"-", " "}


def test_table_has_one_row_per_case_and_impl_with_numbers(table):
    names = tuple(c.name for c in CASES)
    body = [_split(line) for line in table.splitlines() if line.startswith(names)]
    expected = [(c, i) for c in CASES for i in c.impls if not i.costly]  # --compile none
    assert [(r[0], r[1]) for r in body] == [(c.name, i.name) for c, i in expected]
    for cells, (_, impl) in zip(body, expected):
        assert len(cells) == 8, cells
        _, _, median, iqr, runs, ratio, target, met = cells
        assert float(median) > 0 and float(iqr) >= 0, cells
        assert QUICK.min_runs <= int(runs) <= QUICK.repeats, cells
        if impl.role == "ppml_fast":
            assert ratio == "-", cells
        else:
            assert re.fullmatch(r"\d+\.\d\dx", ratio) and float(ratio[:-1]) > 0, cells
        if impl.target is None:
            assert (target, met) == ("-", "-"), cells
        else:
            assert target == str(impl.target) and met in ("yes", "NO"), cells


def test_table_names_the_baselines_of_the_issue(table):
    for name in (
        "ppml_fast.clip_and_accumulate",
        "torch eager",
        "dst.copy_(G) [floor]",
        "ppml_fast.add_gaussian_noise_",
        "x.add_(torch.randn_like(x))",
        "ppml_fast.weighted_aggregate",
        "ppml_fast on numpy list",
        "(w[:,None]*U).sum(0)/w.sum()",
        "w @ U [floor]",
        "Flower aggregate() (numpy)",
    ):
        assert name in table
    assert "torch.compile" not in table  # --compile none


def test_json_ratios_follow_from_the_medians(capsys):
    clip, agg = CASES[0], CASES[-2]
    assert main(TINY + ["--json", "--only", clip.key, agg.key]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["meta"]["sizes"] == "tiny" and doc["meta"]["torch_threads"] >= 1
    rows = doc["results"]
    assert {r["case_key"] for r in rows} == {clip.key, agg.key}
    by_key = {(r["case_key"], r["impl_key"]): r for r in rows}
    assert by_key[(agg.key, "flower")]["versus"] == "ppml_numpy"
    assert by_key[(clip.key, "copy")]["versus"] == "ppml"
    compared = 0
    for r in rows:
        assert r["error"] is None and r["median_ms"] > 0
        if r["role"] == "ppml_fast":
            assert r["ratio"] is None and r["versus"] is None
            continue
        ref = by_key[(r["case_key"], r["versus"])]["median_ms"]
        # a baseline's ratio is the speedup of ppml_fast; a floor's is ppml_fast's cost in floors
        expected = ref / r["median_ms"] if r["role"] == "floor" else r["median_ms"] / ref
        assert r["ratio"] == pytest.approx(expected, rel=1e-12)
        if r["target"] is not None:
            op, value = r["target"].split()
            bound = float(value.rstrip("x"))
            assert r["met"] is (r["ratio"] >= bound if op == ">=" else r["ratio"] <= bound)
        compared += 1
    assert compared == 6  # clip: eager, copy; aggregate: eager, w @ U twice (plain, clipped), Flower


def test_python_dash_m_runs_the_same_command():
    package_root = str(Path(ppml_fast.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "ppml_fast", *TINY, "--json", "--only", "noise"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    assert [r["impl_key"] for r in rows] == ["ppml", "torch"]


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err
    assert main(TINY + ["--only", "no-such-case"]) == 2
    assert "matches no case" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--sizes", "huge"])
    assert e.value.code == 2

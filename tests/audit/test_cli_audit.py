"""``ppml-fast audit``: prints the lower bound next to the claimed epsilon (or JSON), exits 1
when the claim is refuted and 2 on bad input. Small settings (one epoch, 200 canaries)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

pytest.importorskip("sklearn")

from ppml_fast.audit import digits as digits_module  # noqa: E402
from ppml_fast.cli import main  # noqa: E402
from ppml_fast.privacy import optimizer as optimizer_module  # noqa: E402

SMALL = ["audit", "--epochs", "1", "--canaries", "200", "--seed", "1"]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_audit_prints_bound_next_to_claim():
    code, out, _ = _run(SMALL)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("DP-SGD on digits: noise multiplier 1, max grad norm 1, 1 epochs, 23 steps")
    claimed = float(lines[1].split()[2])
    bound = float(lines[2].split()[3])
    assert lines[1].startswith("claimed epsilon") and "rdp accountant, delta 1e-05" in lines[1]
    assert lines[2].startswith("epsilon lower bound") and "200 dirac canaries" in lines[2]
    assert 0 <= bound <= claimed and lines[3].startswith("consistent")


def test_audit_json_many_runs():
    code, out, _ = _run(["audit", "--epochs", "1", "--runs", "4", "--json", "--noise-multiplier", "2"])
    assert code == 0
    d = json.loads(out)
    assert d["method"] == "clopper_pearson" and d["details"]["runs"] == 4
    assert d["details"]["noise_multiplier"] == 2.0 and d["flagged"] is False
    assert d["epsilon_lower_bound"] <= d["epsilon_claimed"]


def test_audit_exit_status_when_refuted(monkeypatch):
    class NoNoise(optimizer_module.DPOptimizer):
        def add_noise(self, grads):
            pass

    # what a bug in the DP step would look like to the command: the optimizer adds no noise
    real = digits_module.audit_dp_sgd
    monkeypatch.setattr(digits_module, "audit_dp_sgd",
                        lambda *a, **k: real(*a, **{**k, "dp_optimizer_class": NoNoise}))
    code, out, _ = _run(["audit", "--epochs", "3", "--noise-multiplier", "4"])
    assert code == 1
    assert "REFUTED" in out


def test_audit_bad_input():
    code, _, err = _run(["audit", "--confidence", "2"])
    assert code == 2 and "confidence" in err
    code, _, err = _run(["audit", "--canaries", "0"])
    assert code == 2 and "canaries" in err

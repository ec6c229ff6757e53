"""``ppml-fast check-model MODULE:FACTORY``: a factory file's model is checked and the exit status
says whether it stays within the bound (0), exceeds it or is refused (1), or the spec is bad (2)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap

import pytest

from ppml_fast.cli import main

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn
    from ppml_fast.privacy.optimizer import DPOptimizer


    class NoClip(DPOptimizer):
        def clip_and_accumulate(self):
            c, self.max_grad_norm = self.max_grad_norm, 1e9
            try:
                super().clip_and_accumulate()
            finally:
                self.max_grad_norm = c


    def _spec():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        return {"model": nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)),
                "loss_fn": nn.CrossEntropyLoss(),
                "batch": (torch.randn(8, 6, generator=g), torch.randint(0, 2, (8,), generator=g)),
                "max_grad_norm": 0.05, "make_private": {"grad_sample_mode": "materialize"}}


    def honest():
        return _spec()


    def leaky():
        return dict(_spec(), optimizer_class=NoClip)


    def flat():
        class Flat(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 2)

            def forward(self, x):
                return self.lin(x.reshape(-1, 4)).reshape(x.shape[0], -1, 2).mean(1)

        g = torch.Generator().manual_seed(0)
        return {"model": Flat(), "loss_fn": nn.CrossEntropyLoss(),
                "batch": (torch.randn(8, 5, 4, generator=g), torch.randint(0, 2, (8,), generator=g))}


    def not_a_dict():
        return 3
''')


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY)
    return path


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_an_honest_model_exits_0_and_prints_the_report(factory):
    code, out, _ = _run("check-model", f"{factory}:honest", "--trials", "3")
    assert code == 0 and "max ratio" in out and ": ok" in out


def test_json_report(factory):
    code, out, _ = _run("check-model", f"{factory}:honest", "--json", "--neighbours", "replace",
                        "--max-grad-norm", "0.02", "--trials", "2")
    d = json.loads(out)
    assert code == 0 and d["ok"] and d["bound"] == pytest.approx(0.04) and d["trials"] == 2


def test_a_leaky_optimizer_exits_1(factory):
    code, out, _ = _run("check-model", f"{factory}:leaky", "--json", "--trials", "2")
    d = json.loads(out)
    assert code == 1 and not d["ok"] and d["max_ratio"] > 1.5


def test_a_refused_model_exits_1(factory):
    code, out, _ = _run("check-model", f"{factory}:flat", "--trials", "2")
    assert code == 1 and ("REFUSED" in out or "EXCEEDS" in out)


@pytest.mark.parametrize("spec, match", [
    ("no_colon", "MODULE:FACTORY"),
    ("{f}:missing", "no callable 'missing'"),
    ("{f}:not_a_dict", "must return a dict"),
    ("/nonexistent/x.py:make", "no such file"),
    ("no_such_module_xyz:make", "cannot import"),
])
def test_bad_specs_exit_2(factory, spec, match):
    code, _, err = _run("check-model", spec.format(f=factory))
    assert code == 2 and match in err


def test_python_m_ppml_fast_with_a_module_path(factory):
    proc = subprocess.run([sys.executable, "-m", "ppml_fast", "check-model", "my_models:leaky",
                           "--trials", "1"], cwd=factory.parent, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert "EXCEEDS THE BOUND" in proc.stdout

"""The privacy journal and crash-safe resume (issue 15 item 4; DESIGN.md invariants 3 and 4).

kill -9 trials in subprocesses (tests/privacy/journal_worker.py): a run checkpointing every 10
steps is killed at a random step; a new process resumes from the last checkpoint. After the
resume the epsilon must be at least that of every step whose gradient was released, and the
noise of the resumed steps must be uncorrelated with every released step's noise (the
pre-journal resume replayed it: correlation 1.0). Plus the journal's file rules: record before
release, torn tails, one writer, edited files.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent
from ppml_fast.ops import noise
from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy.journal import PrivacyJournal
from tests.privacy import journal_worker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "journal_worker.py")
P = 20 * 50 + 50  # parameters of the worker's model
EVENT = PoissonSampledEvent(0.25, GaussianEvent(1.0))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run_trial(directory, mode: str, kill_after: int, *, steps: int = 40, every: int = 10, resumed: int = 4):
    """Trains in a subprocess, kill -9 once it printed "step kill_after", resumes here; returns
    (released noise (n, P), resumed noise (resumed, P), the resume's numbers)."""
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.Popen([sys.executable, WORKER, "train", str(directory), mode, str(steps), str(every)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        for line in proc.stdout:
            if line.strip() == f"step {kill_after}":
                break
        os.kill(proc.pid, signal.SIGKILL)  # the child runs on meanwhile: a random point of a step
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    info = journal_worker.resume(str(directory), mode, resumed)
    released = np.fromfile(os.path.join(directory, "released.bin"), dtype=np.float32)
    again = np.fromfile(os.path.join(directory, "resumed.bin"), dtype=np.float32)
    return released[: len(released) // P * P].reshape(-1, P), again.reshape(-1, P), info


def max_abs_correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)
    b = (b - b.mean(1, keepdims=True)) / b.std(1, keepdims=True)
    return float(np.abs(a @ b.T / a.shape[1]).max())


def test_kill_9_resume_counts_every_released_step_and_never_replays_noise(tmp_path):
    rng = random.Random(15)
    for trial in range(2):
        kill_after = rng.randint(12, 28)  # a checkpoint 2-8 steps back; the child runs on a little
        released, resumed, info = run_trial(tmp_path / f"t{trial}", "journal", kill_after)
        n = len(released)
        assert n >= kill_after
        want = PLDAccountant().compose(EVENT, n).get_epsilon(1e-5)  # the default (issue 17 item 3)
        assert info["epsilon"] >= want, (trial, n, info)
        assert info["counted"] >= n  # every released step (and at most the one in flight more)
        assert info["counted"] <= n + 1
        # released steps' noise: 1050 N(0, (1/16)^2) coordinates each; independent vectors have
        # |correlation| ~ 1/sqrt(1050) = 0.031, a replayed one exactly 1
        assert max_abs_correlation(resumed, released) < 0.2, trial
        assert max_abs_correlation(resumed, resumed - 0) == pytest.approx(1.0)
        assert np.isclose(resumed.std(), 1.0 / 16, rtol=0.1)


def test_kill_9_resume_without_journal_never_replays_noise(tmp_path):
    # without a journal the lost steps cannot be counted (the warning says so), but the noise
    # is re-keyed: nothing released is drawn again
    released, resumed, info = run_trial(tmp_path, "checkpoint", 15)
    assert max_abs_correlation(resumed, released) < 0.2
    assert info["counted"] == 10


def _setup(tmp_path, journal=True, **kw):
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    data = TensorDataset(torch.randn(32, 6), torch.zeros(32))
    engine = PrivacyEngine(**kw.pop("engine", {}))
    m, o, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
        noise_seed=3, journal=(tmp_path / "j") if journal else None, **kw)
    return engine, m, o, data.tensors[0][:8]


def _step(m, o, x):
    o.zero_grad()
    m(x).pow(2).sum().backward()
    o.step()


def test_each_step_is_on_disk_before_its_noise_is_drawn(tmp_path, monkeypatch):
    engine, m, o, x = _setup(tmp_path)
    seen = []
    real = noise.run_noise

    def spy(*args, **kwargs):  # what a crash at this instant would leave on disk
        lines = (tmp_path / "j").read_bytes().count(b"\n")
        seen.append((lines - 1, o.steps, o.offset))
        return real(*args, **kwargs)

    monkeypatch.setattr(noise, "run_noise", spy)
    for _ in range(3):
        _step(m, o, x)
    assert [s[0] for s in seen] == [1, 2, 3]  # record k+1 written before step k's noise
    records = o.journal.records
    assert [r.offset for r in records] == [(s[2], s[2] + noise.blocks(list(m.parameters()))) for s in seen]
    assert records[-1].offset[1] == o.offset and all(r.event == EVENT.__class__(0.25, GaussianEvent(1.0))
                                                   for r in records)
    assert o.seed.to_bytes(8, "little").hex() not in (tmp_path / "j").read_text()  # no key on disk


def test_failed_noise_over_reports_on_resume_never_under(tmp_path, monkeypatch):
    engine, m, o, x = _setup(tmp_path)
    _step(m, o, x)
    engine.save_checkpoint(tmp_path / "c.pt", module=m, optimizer=o)

    def boom(*args, **kwargs):
        raise RuntimeError("kernel died")

    monkeypatch.setattr(noise, "run_noise", boom)
    o.zero_grad()
    m(x).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="kernel died"):
        o.step()
    monkeypatch.undo()
    assert len(o.journal.records) == 2 and sum(h[-1] for h in engine.accountant.history) == 1
    o.journal.close()
    engine2, m2, o2, _ = _setup(tmp_path)
    engine2.load_checkpoint(tmp_path / "c.pt", module=m2, optimizer=o2)
    assert sum(h[-1] for h in engine2.accountant.history) == 2  # the unreleased step counted
    assert o2.offset == o.offset == o.journal.records[-1].offset[1]


def test_resume_in_process_counts_lost_steps_and_continues_the_stream(tmp_path):
    engine, m, o, x = _setup(tmp_path, engine={"accountant": "pld"})
    for _ in range(3):
        _step(m, o, x)
    engine.save_checkpoint(tmp_path / "c.pt", module=m, optimizer=o, checkpoint_dict={"epoch": 4})
    for _ in range(4):
        _step(m, o, x)  # released, then "lost"
    eps, offset = engine.get_epsilon(1e-5), o.offset
    o.journal.close()
    engine2, m2, o2, _ = _setup(tmp_path, engine={"accountant": "pld"})
    assert engine2.get_epsilon(1e-5) == pytest.approx(eps, rel=1e-12)  # the journal's 7 steps
    rest = engine2.load_checkpoint(tmp_path / "c.pt", module=m2, optimizer=o2)
    assert rest == {"epoch": 4}
    assert engine2.get_epsilon(1e-5) == pytest.approx(eps, rel=1e-12) and o2.offset == offset
    assert o2.steps == 3  # the training position is the checkpoint's
    for a, b in zip(m2.parameters(), m.parameters()):
        assert not torch.equal(a, b)  # the model is the checkpoint's (step 3)


def test_journal_file_rules(tmp_path):
    path = tmp_path / "j"
    j = PrivacyJournal(path)
    with pytest.raises(RuntimeError, match="one writer"):
        PrivacyJournal(path)
    j.reserve(step=0, event=EVENT, unnoised=False, seed=5, offset=(0, 10))
    j.reserve(step=1, event=None, unnoised=True, seed=5, offset=(10, 10))
    j.close()
    whole = path.read_bytes()
    # a record cut short by a crash (never acknowledged) is dropped; a whole one missing only
    # its newline is kept
    path.write_bytes(whole + b'{"seq": 2, "step": 2, "ev')
    j = PrivacyJournal(path)
    assert len(j.records) == 2 and path.read_bytes() == whole
    j.close()
    last = whole.rstrip(b"\n").split(b"\n")[-1].replace(b'"seq": 1', b'"seq": 2')
    path.write_bytes(whole + last)
    j = PrivacyJournal(path)
    assert len(j.records) == 3 and path.read_bytes() == whole + last + b"\n"
    assert j.next_offset(5) == 10 and j.next_offset(6) == 0
    j.close()
    for bad in (whole.replace(b'"seq": 1', b'"seq": 4'), b'{"format": "other"}\n',
                whole.replace(b'"offset": [0, 10]', b'"offset": [10, 0]')):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="journal|seq|format|malformed"):
            PrivacyJournal(path)
        assert path.read_bytes() == bad  # never rewritten


def test_a_journal_in_use_is_refused_before_the_optimizer_exists(tmp_path):
    engine, m, o, x = _setup(tmp_path)
    with pytest.raises(RuntimeError, match="one writer"):
        _setup(tmp_path)
    o.journal.close()
    _setup(tmp_path)


def test_load_checkpoint_is_atomic(tmp_path):
    engine, m, o, x = _setup(tmp_path)
    _step(m, o, x)
    engine.save_checkpoint(tmp_path / "c.pt", module=m, optimizer=o)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    _step(m, o, x)
    before = ([p.detach().clone() for p in m.parameters()], engine.accountant.history, o.offset, o.steps)

    def unchanged():
        assert all(torch.equal(a, b) for a, b in zip(before[0], m.parameters()))
        assert (engine.accountant.history, o.offset, o.steps) == before[1:]

    bad_module = {**ckpt, "module_state_dict": {**ckpt["module_state_dict"],
                                                "_module.weight": torch.zeros(2, 2)}}
    bad_opt = {**ckpt, "optimizer_state_dict": {**ckpt["optimizer_state_dict"], "offset": -1}}
    bad_acc = {**ckpt, "privacy_accountant_state_dict": {"orders": [2.0], "history": [["x", 1]]}}
    for i, bad in enumerate((bad_module, bad_opt, bad_acc)):
        torch.save(bad, tmp_path / f"bad{i}.pt")
        with pytest.raises((ValueError, RuntimeError)):
            engine.load_checkpoint(tmp_path / f"bad{i}.pt", module=m, optimizer=o)
        unchanged()
    with pytest.raises(ValueError, match="optimizer"):  # the lost steps would not be counted
        engine.load_checkpoint(tmp_path / "c.pt", module=m)
    unchanged()
    assert sorted(os.listdir(tmp_path)) == ["bad0.pt", "bad1.pt", "bad2.pt", "c.pt", "j", "j.lock"]

"""State loading is validated and atomic; a failing step fails closed (issue 15 item 8;
DESIGN.md invariant 6). Each bad state must be refused naming the field, with nothing changed —
the DP optimizer, the wrapped optimizer's state, the shared accountant — and the next step must
be bit-identical to that of a twin that never saw the bad state. A step that fails after
clipping must leave no un-noised gradient readable and no counter or accountant moved.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.ops import noise
from ppml_fast.privacy import PrivacyEngine


def _setup(journal=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data = TensorDataset(torch.randn(32, 6), torch.zeros(32))
    engine = PrivacyEngine()
    m, o, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
        noise_seed=3, journal=journal)
    return engine, m, o, data.tensors[0][:8]


def _backward(m, o, x):
    o.zero_grad()
    m(x).pow(2).sum().backward()


def _step(m, o, x):
    _backward(m, o, x)
    o.step()


def _snapshot(engine, m, o):
    return (copy.deepcopy(o.state_dict()), engine.accountant.history,
            [p.detach().clone() for p in m.parameters()], o.unnoised_steps)


def _same(a, b):
    assert a[0]["noise_multiplier"] == b[0]["noise_multiplier"]
    for k in ("seed", "offset", "steps", "unnoised_steps", "accountant"):
        assert a[0][k] == b[0][k], k
    sa, sb = a[0]["optimizer"]["state"], b[0]["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert a[1] == b[1] and a[3] == b[3]
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


BAD = [
    ("noise_multiplier", math.nan), ("noise_multiplier", math.inf), ("noise_multiplier", -0.5),
    ("noise_multiplier", True), ("noise_multiplier", "1.0"),
    ("offset", -5), ("offset", 1 << 63), ("offset", 2.0), ("seed", -1), ("seed", 1 << 64),
    ("seed", 1.5), ("steps", -3), ("steps", "3"), ("unnoised_steps", -1),
    ("accountant", {"orders": [2.0], "history": [["gaussian", 0.25, math.nan, 1]]}),
    ("accountant", {"orders": [2.0], "history": [["gaussian", 0.25, 1.0, -1]]}),
    ("accountant", "rdp"), ("optimizer", None),
    ("optimizer", {"state": {}, "param_groups": []}),  # does not fit the wrapped optimizer
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_bad_state_is_refused_and_changes_nothing(field, value):
    engine, m, o, x = _setup()
    twin_engine, tm, to, _ = _setup()
    for _ in range(2):
        _step(m, o, x), _step(tm, to, x)
    good = copy.deepcopy(o.state_dict())
    _step(m, o, x), _step(tm, to, x)  # the momentum buffers and the history differ from `good`
    bad = copy.deepcopy(good)
    bad[field] = value
    before = _snapshot(engine, m, o)
    with pytest.raises(ValueError, match=field):
        o.load_state_dict(bad)
    _same(before, _snapshot(engine, m, o))
    _step(m, o, x), _step(tm, to, x)  # the next step: exactly the twin's
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(m.parameters(), tm.parameters()))
    assert engine.get_epsilon(1e-5) == twin_engine.get_epsilon(1e-5)


def test_missing_field_and_not_a_dict():
    engine, m, o, x = _setup()
    state = o.state_dict()
    del state["seed"]
    with pytest.raises(ValueError, match="seed"):
        o.load_state_dict(state)
    with pytest.raises(ValueError, match="dict"):
        o.load_state_dict([1, 2])


def test_engine_load_state_dict_is_validated_and_atomic():
    engine, m, o, x = _setup()
    _step(m, o, x)
    good = copy.deepcopy(engine.state_dict())
    _step(m, o, x)
    before = _snapshot(engine, m, o)
    for bad in ({"optimizer": {**good["optimizer"], "offset": -1}, "accountant": good["accountant"]},
                {"accountant": {"orders": [2.0], "history": [["nope", 1]]}, "optimizer": None},
                {"optimizer": good["optimizer"]}, None):
        with pytest.raises(ValueError):
            engine.load_state_dict(bad)
        _same(before, _snapshot(engine, m, o))


def _boom(*args, **kwargs):
    raise RuntimeError("injected")


def _fail_once(monkeypatch, where):
    engine, m, o, x = _setup()
    _step(m, o, x)
    o.signal_skip_step()  # a virtual step first: its clipped sums are discarded too
    _backward(m, o, x)
    o.step()
    _backward(m, o, x)
    before = (engine.accountant.history, o.steps, o.unnoised_steps, o.offset)
    summed = list(o._summed.values())
    assert summed and any(float(s.abs().sum()) > 0 for s in summed)  # un-noised clipped sums
    where(monkeypatch, o, engine)
    with pytest.raises(RuntimeError, match="injected"):
        o.step()
    monkeypatch.undo()
    assert all(p.grad is None for p in m.parameters())  # nothing readable in p.grad
    assert o._summed == {} and all(float(s.abs().sum()) == 0 for s in summed)  # nor kept
    assert (engine.accountant.history, o.steps, o.unnoised_steps) == before[:3]
    return engine, m, o, x, before[3]


@pytest.mark.parametrize("where", [
    lambda mp, o, e: mp.setattr(noise, "run_noise", _boom),  # the noise kernel
    lambda mp, o, e: mp.setattr(e.accountant, "compose", _boom),  # the accountant
    lambda mp, o, e: mp.setattr(o, "_reduce", _boom),  # the all-reduce
], ids=["noise", "accountant", "reduce"])
def test_step_failing_after_clipping_fails_closed(monkeypatch, where):
    engine, m, o, x, offset = _fail_once(monkeypatch, where)
    assert o.offset >= offset  # a reserved range is never used again
    _step(m, o, x)  # and the next step works
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert o.steps == 2


def test_journal_write_failure_fails_closed(tmp_path, monkeypatch):
    engine, m, o, x = _setup(journal=tmp_path / "j")
    _step(m, o, x)
    _backward(m, o, x)
    history, size = engine.accountant.history, (tmp_path / "j").stat().st_size
    monkeypatch.setattr("os.fsync", _boom)
    with pytest.raises(RuntimeError, match="injected"):
        o.step()
    monkeypatch.undo()
    assert all(p.grad is None for p in m.parameters()) and engine.accountant.history == history
    assert (tmp_path / "j").stat().st_size == size and len(o.journal.records) == 1  # no half record
    _step(m, o, x)
    assert len(o.journal.records) == 2 and o.steps == 2


def test_nan_noise_multiplier_set_by_hand_is_refused_before_clipping():
    engine, m, o, x = _setup()
    _step(m, o, x)
    _backward(m, o, x)
    o.noise_multiplier = math.nan
    with pytest.raises(ValueError, match="noise_multiplier"):
        o.step()
    assert all(p.grad is None for p in m.parameters()) and o.steps == 1
    o.noise_multiplier = 1.0
    o.step()  # the captured batch was kept: the step goes on
    assert o.steps == 2


@pytest.mark.parametrize("field,value", [("seed", -1), ("offset", 1 << 63), ("noise_multiplier", -1.0)])
def test_bad_settings_set_by_hand_are_refused_before_clipping(field, value):
    engine, m, o, x = _setup()
    _backward(m, o, x)
    good = getattr(o, field)
    setattr(o, field, value)
    with pytest.raises(ValueError, match=field):
        o.step()
    assert all(p.grad is None for p in m.parameters()) and o.steps == 0 and engine.accountant.history == []
    setattr(o, field, good)
    o.step()
    assert o.steps == 1

"""The DP step's reusable per-sample memory (ppml_fast.privacy.per_sample.workspace): slices handed
out again only when nothing refers to them, never overlapping within a step or across threads,
and the same results as fresh memory."""

import copy
import pickle
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy.per_sample import workspace as ws_mod
from ppml_fast.privacy.per_sample.workspace import Workspace


@pytest.fixture(autouse=True)
def _workspaces_on(monkeypatch):
    """The workspace is off by default (its docstring); these tests are about it: on."""
    monkeypatch.setattr(Workspace, "enabled", True)


def _span(t):
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlap(a, b):
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _take(ws, shapes, like):
    with ws.arena():
        return [ws_mod.empty(s, like=like) for s in shapes]


def test_slices_of_one_step_never_overlap_and_are_aligned():
    ws, like = Workspace(), torch.zeros(1)
    _take(ws, [(3, 5), (7,), (2, 2, 2)], like)  # sizes the buffer
    got = _take(ws, [(3, 5), (7,), (2, 2, 2)], like)
    assert ws.nbytes > 0
    base = ws._buffers[torch.float32].tensor
    for t in got:  # reused: inside the workspace's buffer
        assert _span(base)[0] <= _span(t)[0] and _span(t)[1] <= _span(base)[1]
        assert t.data_ptr() % 64 == 0 and t.is_contiguous()
    assert not any(_overlap(a, b) for i, a in enumerate(got) for b in got[i + 1:])


def test_memory_is_reused_only_when_nothing_refers_to_it():
    ws, like = Workspace(), torch.zeros(1)
    _take(ws, [(100,)], like)
    first = _take(ws, [(100,)], like)[0]
    first.fill_(7.0)
    view = first[10:20]  # a derived view keeps the buffer alive as well
    del first
    second = _take(ws, [(100,)], like)[0]
    second.fill_(-1.0)
    assert not _overlap(view, second)
    assert torch.equal(view, torch.full((10,), 7.0))
    del view, second
    third = _take(ws, [(100,)], like)[0]  # nothing refers to the last buffer: reused
    assert _span(ws._buffers[torch.float32].tensor)[0] == third.data_ptr()


def test_more_than_the_buffer_holds_comes_from_fresh_memory_then_the_buffer_grows():
    ws, like = Workspace(), torch.zeros(1)
    _take(ws, [(10,)], like)
    big = _take(ws, [(10,), (1000,)], like)
    base = ws._buffers[torch.float32].tensor
    assert not _overlap(big[1], base)
    del big
    again = _take(ws, [(10,), (1000,)], like)
    assert ws._buffers[torch.float32].tensor.numel() >= 1010
    assert not _overlap(again[0], again[1])


def test_dtypes_get_their_own_buffers_and_cuda_or_no_arena_gets_fresh_memory():
    ws = Workspace()
    f32, f64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    _take(ws, [(4,)], f32)
    _take(ws, [(4,)], f64)
    with ws.arena():
        a = ws_mod.empty((4,), like=f32)
        b = ws_mod.empty((4,), like=f64)
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    outside = ws_mod.empty((4,), like=f32)  # no arena open: plain torch.empty
    assert not any(_overlap(outside, t.tensor) for t in ws._buffers.values())


def test_concurrent_steps_on_threads_never_share_memory():
    ws, like = Workspace(), torch.zeros(1)
    _take(ws, [(1000,)], like)
    inside, release, got = threading.Event(), threading.Event(), {}

    def first():
        with ws.arena():
            got["a"] = ws_mod.empty((1000,), like=like)
            inside.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    inside.wait(10)
    with ws.arena():  # the other thread's arena is open: fresh memory here
        got["b"] = ws_mod.empty((1000,), like=like)
    release.set()
    t.join()
    assert not _overlap(got["a"], got["b"])


def test_copies_and_pickles_start_empty():
    ws = Workspace()
    _take(ws, [(10,)], torch.zeros(1))
    _take(ws, [(10,)], torch.zeros(1))
    assert ws.nbytes > 0
    assert copy.deepcopy(ws).nbytes == 0 and pickle.loads(pickle.dumps(ws)).nbytes == 0


def _private(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Flatten(), nn.Linear(16 * 5, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=net, optimizer=opt, data_loader=loader, noise_multiplier=0.7, max_grad_norm=0.5,
            poisson_sampling=False, grad_sample_mode="materialize", noise_seed=3)[:2]


@pytest.mark.parametrize("steps", [3])
def test_dp_steps_equal_with_and_without_the_workspace(monkeypatch, steps):
    """Same model, data and noise seed: bit-identical parameters after several steps, with the
    kept per-sample gradients in reused memory or in fresh memory; and the reused memory is
    really used (the buffer exists after the first step)."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 5, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(steps)]
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(ws_mod, "ENABLED", enabled)
        model, opt = _private()
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
        assert (model.workspace.nbytes > 0) == enabled
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_a_kept_plan_after_a_nonfinite_refusal_is_not_overwritten(monkeypatch):
    """A step refused for a non-finite per-sample gradient keeps its plan (kept per-sample
    gradients) for the nonfinite='drop' retry; a step of another private model in between, and
    the retry itself, must not hand that memory out again."""
    from ppml_fast.privacy import NonFiniteGradientError

    model, opt = _private()
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    for _ in range(2):  # size the workspace
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    bad = x.clone()
    bad[2] = float("inf")
    opt.zero_grad()
    nn.functional.cross_entropy(model(bad), y).backward()
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    batch = [b for b in model.recorder.batches if b.backpropagated][0]
    kept = [v.clone() for st in batch.plan["states"] if st and isinstance(st[1], dict)
            for v in st[1].values() if isinstance(v, torch.Tensor)]
    assert kept
    with model.workspace.arena():  # the next arena must not overlap what the plan holds
        n = model.workspace._buffers[torch.float32].tensor.numel()
        fresh = ws_mod.empty((n,), like=torch.zeros(1))
        fresh.fill_(123.0)
    now = [v for st in batch.plan["states"] if st and isinstance(st[1], dict)
           for v in st[1].values() if isinstance(v, torch.Tensor)]
    assert len(kept) == len(now)
    for a, b in zip(kept, now):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_off_by_default_and_on_per_model(monkeypatch):
    """Off by default (it holds memory between steps, across the next forward's activations);
    ``model.workspace.enabled = True`` opts one model in, and copies keep the choice."""
    monkeypatch.setattr(Workspace, "enabled", False)  # the library's default
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    held = []
    for opt_in in (False, True):
        model, opt = _private()
        if opt_in:
            model.workspace.enabled = True
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        held.append(model.workspace.nbytes)
        assert copy.deepcopy(model.workspace).enabled is opt_in
        assert pickle.loads(pickle.dumps(model.workspace)).enabled is opt_in
    assert held[0] == 0 and held[1] > 0

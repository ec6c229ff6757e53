"""Review (session 7) of the DP step's reusable per-sample memory (per_sample/workspace.py, commit
14ff422), by an attacker: can a kept per-sample gradient (or a norm or clipped sum derived from it)
be overwritten, or read after its memory was handed out again, so that what is summed is not what
was clipped, or so that results differ from fresh memory?

The detector: every slice the arena hands out, and every buffer the workspace decides is idle, is
filled with NaN at that moment ("poison"). A live tensor that aliases reused memory then carries
NaN into the norms or sums, and the step differs from (or refuses where) the same step with the
workspace off (fresh memory) does not. Each scenario runs both ways with the same noise seed and
must give bit-identical parameters, and must really have reused memory.

Held (these tests pass): plain steps, a nonfinite="raise" refusal then another model's steps then
the nonfinite="drop" retry, virtual batches (BatchMemoryManager), same_records, two private models
interleaved, two models stepping on two threads, float64, float32 and float64 layers in one model,
per-layer clipping, a parameter used by two calls (the materialised shared path), tied embedding /
head (the fold path, index_add_ into the kept gradients), a deep copy of the PrivateModule midway,
an exception thrown in the middle of _norms (the traceback's kept views are never handed out
again), torch without torch._C._storage_Use_Count (nothing reused), and the float64 per-record
reference through virtual batches on a warm workspace.

Broke (fails now, low severity): a kept gradient's memory referred to only through its
UntypedStorage (``t.untyped_storage()``) is handed out again: the storage's Python object is the
one ``_use_count`` itself borrows, so it adds nothing to ``_storage_Use_Count``. The library never
holds storages, so the DP sums are not affected; the workspace's stated guarantee ("reused only
when nothing refers to it") is. Fix (checked): keep the storage object on the buffer
(``self.storage = self.tensor.untyped_storage()``) and require ``sys.getrefcount(self.storage)``
to equal its value at creation as well as the use count.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import BatchMemoryManager, NonFiniteGradientError, PrivacyEngine, PrivacyError
from ppml_fast.privacy.per_sample import linear as lin
from ppml_fast.privacy.per_sample import workspace as ws_mod
from ppml_fast.privacy.per_sample.workspace import Workspace


@pytest.fixture(autouse=True)
def _workspaces_on(monkeypatch):
    """The workspace is off by default (its docstring); these tests are about it: on."""
    monkeypatch.setattr(Workspace, "enabled", True)
from tests.privacy.sensitivity._harness import Case, check_sum, rtol

_TAKE, _RESERVE = ws_mod._Arena.take, ws_mod.Workspace._reserve


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def poison(monkeypatch):
    """Workspace on, every slice and every reused buffer NaN-filled when handed out; counts the
    slices that came from a buffer (reuse really happened)."""
    seen = {"reused": 0}

    def take(self, shape, dtype):
        t = _TAKE(self, shape, dtype)
        buf = self.buffers.get(dtype)
        if buf is not None and t.untyped_storage().data_ptr() == buf.tensor.untyped_storage().data_ptr():
            seen["reused"] += 1
        return t.fill_(float("nan"))

    def reserve(self):
        out = _RESERVE(self)
        for b in (out or {}).values():
            b.tensor.fill_(float("nan"))
        return out

    def on(flag: bool):
        monkeypatch.setattr(ws_mod, "ENABLED", flag)
        monkeypatch.setattr(ws_mod._Arena, "take", take if flag else _TAKE)
        monkeypatch.setattr(ws_mod.Workspace, "_reserve", reserve if flag else _RESERVE)

    seen["on"] = on
    return seen


def _both(poison, scenario):
    """Runs ``scenario()`` (-> list of tensors) poisoned and with fresh memory; bit-identical."""
    poison["on"](True)
    poison["reused"] = 0
    a = scenario()
    reused = poison["reused"]
    poison["on"](False)
    b = scenario()
    assert reused > 0, "the workspace was never reused: the scenario tests nothing"
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs with the workspace (reused memory)"


# -- models -----------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Materialise-path linears (T = 5, d = 8, p = 16), two LayerNorms of one shape (a group)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n1 = nn.Linear(8, 16), nn.LayerNorm(16)
        self.b, self.n2 = nn.Linear(16, 16), nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.n1(torch.tanh(self.a(x)))
        h = self.n2(torch.tanh(self.b(h)))
        return self.head(h.mean(1))


class Mixed(nn.Module):
    """A float64 layer and float32 layers in one model: one buffer per dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16).double(), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x.double())).float())).mean(1))


class Shared(nn.Module):
    """One Linear called twice: its per-sample gradients materialised and summed over the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.a(torch.tanh(self.a(x))).mean(1))


class Tied(nn.Module):
    """Embedding and head share the weight (tied.py's fold path: index_add_ into kept gradients)."""

    def __init__(self, V: int = 12, D: int = 8) -> None:
        super().__init__()
        self.emb, self.mid = nn.Embedding(V, D), nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids)))).mean(1)


def _make(build, b=6, seed=3, mode="materialize", **kw):
    """A private ``build()`` (built under a fixed seed) and its DP optimizer (noise seeded)."""
    kw.setdefault("max_grad_norm", 0.5)
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(torch.arange(b)), batch_size=b),
            noise_multiplier=0.7, poisson_sampling=False, grad_sample_mode=mode, noise_seed=seed, **kw)[:2]


def _data(n, b=6, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 5, 8, generator=g).to(dtype), torch.randint(0, 3, (b,), generator=g))
            for _ in range(n)]


def _step(m, o, x, y):
    o.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    o.step()


def _params(*models):
    return [p.detach().clone() for m in models for p in m.parameters()]


def _train(build, n=3, dtype=torch.float32, **kw):
    def run():
        m, o = _make(build, **kw)
        for x, y in _data(n, dtype=dtype):
            _step(m, o, x, y)
        return _params(m)
    return run


# -- held -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, scenario", [
    ("plain", _train(MLP, 4)),
    ("float64", _train(lambda: MLP().double(), dtype=torch.float64)),
    ("float32_and_float64_layers", _train(Mixed)),
    ("per_layer", _train(MLP, clipping="per_layer", max_grad_norm=[0.3] * 10)),
    ("shared_parameter_materialised", _train(Shared)),
])
def test_steps_equal_fresh_memory(poison, name, scenario):
    _both(poison, scenario)


def test_tied_fold_path(poison):
    def run():
        m, o = _make(Tied)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            _step(m, o, torch.randint(0, 12, (6, 5), generator=g), torch.randint(0, 12, (6,), generator=g))
        return _params(m)
    _both(poison, run)


def test_nonfinite_refusal_other_model_then_drop_retry(poison):
    """The refused step's plan (kept gradients) lives on the batch; another model's steps and the
    retry's own arena must not hand its memory out again."""
    def run():
        m, o = _make(MLP)
        refused = 0
        for i, (x, y) in enumerate(_data(5)):
            if i == 2:
                x = x.clone()
                x[1] = float("inf")
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            try:
                o.step()
            except NonFiniteGradientError:
                refused += 1
                m2, o2 = _make(MLP, seed=9)
                for x2, y2 in _data(2, seed=9):
                    _step(m2, o2, x2, y2)
                o.nonfinite = "drop"
                o.step()
                o.nonfinite = "raise"
        assert refused == 1
        return _params(m)
    _both(poison, run)


def test_virtual_batches(poison):
    def run():
        m, o = _make(MLP, b=8)
        for x, y in _data(3, b=8):
            loader = DataLoader(TensorDataset(x, y), batch_size=8)
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=o) as ph:
                for xb, yb in ph:
                    _step(m, o, xb, yb)
        return _params(m)
    _both(poison, run)


def test_same_records_two_forwards_one_arena(poison):
    def run():
        m, o = _make(MLP)
        for x, y in _data(3):
            o.zero_grad()
            with m.same_records():
                loss = nn.functional.cross_entropy(m(x), y) + nn.functional.cross_entropy(m(x.flip(1)), y)
            loss.backward()
            o.step()
        return _params(m)
    _both(poison, run)


def test_two_models_interleaved_and_on_two_threads(poison):
    def interleaved():
        m1, o1 = _make(MLP)
        m2, o2 = _make(MLP, seed=4)
        for x, y in _data(4):
            o1.zero_grad()
            nn.functional.cross_entropy(m1(x), y).backward()
            o2.zero_grad()
            nn.functional.cross_entropy(m2(x * 2), y).backward()
            o1.step()
            o2.step()
        return _params(m1, m2)

    def threads():
        models = [_make(MLP, seed=s) for s in (3, 4)]
        data, barrier, errors = _data(6), threading.Barrier(2), []

        def work(k):
            try:
                m, o = models[k]
                for x, y in data:
                    barrier.wait(30)
                    _step(m, o, x * (k + 1), y)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                barrier.abort()

        ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        return _params(models[0][0], models[1][0])

    _both(poison, interleaved)
    _both(poison, threads)


def test_deep_copy_midway_gets_its_own_workspace(poison):
    def run():
        m, o = _make(MLP)
        data = _data(4)
        for x, y in data[:2]:
            _step(m, o, x, y)
        twin = copy.deepcopy(m)
        assert twin.workspace is not m.workspace and twin.workspace.nbytes == 0
        for x, y in data[2:]:
            _step(m, o, x, y)
        return _params(m)
    _both(poison, run)


def test_exception_inside_norms_kept_views_never_handed_out_again(poison, monkeypatch):
    """A rule raising in the middle of _norms: the arena closes while the first layer's kept
    gradients are alive in the traceback; later steps must not overwrite them."""
    poison["on"](True)
    m, o = _make(MLP)
    data = _data(6)
    for x, y in data[:2]:
        _step(m, o, x, y)
    stock, n = lin.LinearRule.norms_sq, {"k": 0}

    def boom(self, cap, g, **kw):
        n["k"] += 1
        if n["k"] == 2:
            raise RuntimeError("boom")
        return stock(self, cap, g, **kw)

    monkeypatch.setattr(lin.LinearRule, "norms_sq", boom)
    x, y = data[2]
    o.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="boom") as info:
        o.step()
    monkeypatch.setattr(lin.LinearRule, "norms_sq", stock)
    tb, kept = info.value.__traceback__, []
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_norms":
            kept = [v for s in tb.tb_frame.f_locals["states"] if s and isinstance(s[1], dict)
                    for v in s[1].values() if isinstance(v, torch.Tensor)]
        tb = tb.tb_next
    buf = m.workspace._buffers[torch.float32].tensor
    assert kept and all(k.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for k in kept)
    snap = [k.clone() for k in kept]
    with pytest.raises(PrivacyError):  # captures were released: the batch must be run again
        o.step()
    m.discard()
    before = poison["reused"]
    for x, y in data[3:]:
        _step(m, o, x, y)
    assert poison["reused"] > before
    for a, b in zip(kept, snap):
        assert torch.equal(a, b), "a kept gradient alive in a traceback was overwritten"


def test_without_storage_use_count_nothing_is_reused_and_results_hold(poison, monkeypatch):
    """Another torch (no torch._C._storage_Use_Count): fresh memory for every slice. (Noted, not
    asserted: the workspace then still allocates and holds a never-used buffer of the last
    step's size per dtype.)"""
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    run = _train(MLP)
    poison["on"](True)
    a = run()
    assert poison["reused"] == 0
    poison["on"](False)
    b = run()
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_virtual_batches_on_a_warm_workspace_equal_the_float64_reference():
    """The harness's BatchMemoryManager path (one private model, its workspace reused from chunk
    to chunk), float32 materialise path, against the float64 per-record reference."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)

    def build():
        torch.manual_seed(0)
        return MLP().double()

    case = Case(name="ws-chunks", build=build, inputs=(x,), target=y, mode="materialize", C=0.3,
                dtype=torch.float32, chunk=2)
    _, rel, detail = check_sum(case, build())
    assert rel <= rtol(torch.float32), detail


# -- broke ------------------------------------------------------------------------------------------
def test_a_kept_gradient_held_through_its_storage_is_not_handed_out_again():
    """FAILS NOW. ``s = kept.untyped_storage()`` refers to the kept memory, yet the next arena
    hands the same bytes out (the storage object is invisible to ``_storage_Use_Count``: it is
    the object ``_use_count`` itself borrows). Fix: _Buffer keeps ``self.storage`` and checks
    ``sys.getrefcount(self.storage)`` against its value at creation as well."""
    ws, like = Workspace(), torch.zeros(1)

    def take():
        with ws.arena():
            return ws_mod.empty((100,), like=like)

    take()  # sizes the buffer
    kept = take().fill_(7.0)
    storage, offset = kept.untyped_storage(), kept.storage_offset()
    del kept
    other = take().fill_(-1.0)
    seen = torch.empty(0).set_(storage, offset, (100,))
    assert torch.equal(seen, torch.full((100,), 7.0)), (
        "memory referred to by a live UntypedStorage was handed out again and overwritten "
        f"(overlap: {other.data_ptr() == seen.data_ptr()})")

"""Issue 16 (per-layer cost of the private forward): the checks made cheaper keep firing.

Each forward walks the model's modules, buffers and parameters directly
(:func:`~ppml_fast.privacy.ownership.model_tensors`, instead of ``named_buffers()`` /
``named_parameters()``) for the version check of state written by the forward, and the
parameter watch reuses that walk. Nothing is cached between forwards: each test below changes
the model *after* a first private step (when a cache, had there been one, would be filled) in
one way an attacker or a fine-tuning script could, and fails if the change went unseen.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules import module as torch_module

from ppml_fast.privacy import PrivateModule, UnsupportedModuleError
from ppml_fast.privacy.ownership import UnownedParameterError, model_tensors

C = 1.0
B = 4


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.zeros(3))


class Net(nn.Module):
    """Two captured Linears; ``write`` names a tensor (dotted path) that the forward writes in
    place from record 0 (state computed from the batch); ``leak`` names a module whose weight
    the forward uses outside that module's calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)
        self.write = None
        self.leak = None

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.leak is not None:
            w = functools.reduce(getattr, self.leak.split("."), self).weight
            out = out + x @ w.T
        if self.write is not None:
            t = functools.reduce(getattr, self.write.split("."), self)
            with torch.no_grad():
                t.add_(x[0, 0])
        return out


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, generator=g), torch.randint(0, 3, (B,), generator=g)


def _step(private):
    """One private step's capture and clipping; returns the clipped sums."""
    x, y = _data()
    nn.functional.cross_entropy(private(x), y).backward()
    try:
        sums, seen = private.clipped_sums(max_grad_norm=C)
    finally:
        private.discard()
    assert seen == B
    return sums


def _warm():
    torch.manual_seed(0)
    model = Net()
    private = PrivateModule(model)
    _step(private)  # a first step on this input layout: the records probe does not run again
    _step(private)
    return model, private


def _refused(private, match):
    with pytest.raises(UnsupportedModuleError, match=match):
        _step(private)


# -- buffers and parameters written during the forward: seen however they were added ------------
def test_buffer_registered_after_the_first_step_and_written_is_refused():
    model, private = _warm()
    model.register_buffer("late", torch.zeros(3))
    model.write = "late"
    _refused(private, r"\['late'\] of the model were updated during a private forward")


def test_buffer_of_a_submodule_added_after_the_first_step_is_refused():
    model, private = _warm()
    model.extra = Holder()  # setattr of a new module holding a buffer
    model.write = "extra.buf"
    _refused(private, r"\['extra\.buf'\]")


def test_buffer_replaced_by_assignment_then_written_is_refused():
    torch.manual_seed(0)
    model = Net()
    model.fc1.register_buffer("b", torch.zeros(3))
    private = PrivateModule(model)
    _step(private)
    model.fc1.b = torch.zeros(3)  # another tensor under the same name
    model.write = "fc1.b"
    _refused(private, r"\['fc1\.b'\]")


def test_buffer_put_into_the_dict_directly_is_refused():
    model, private = _warm()
    model.fc2._buffers["raw"] = torch.zeros(3)  # no registration hook sees this
    model.write = "fc2.raw"
    _refused(private, r"\['fc2\.raw'\]")


def test_frozen_parameter_replaced_by_another_object_then_written_is_refused():
    torch.manual_seed(0)
    model = Net()
    model.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    private = PrivateModule(model)
    _step(private)
    model.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    model.write = "frozen"
    _refused(private, r"\['frozen'\]")


def test_submodule_swapped_in_with_a_buffer_is_refused():
    torch.manual_seed(0)
    model = Net()
    model.extra = Holder()
    private = PrivateModule(model)
    _step(private)
    model.extra = Holder()  # a new module (and a new buffer) under the old name
    model.write = "extra.buf"
    _refused(private, r"\['extra\.buf'\]")


def test_shared_buffer_is_named_once_by_its_first_name():
    torch.manual_seed(0)
    model = Net()
    model.a, model.b = Holder(), Holder()
    model.b.buf = model.a.buf  # one tensor, two names
    private = PrivateModule(model)
    _step(private)
    model.write = "b.buf"
    with pytest.raises(UnsupportedModuleError) as e:
        _step(private)
    assert "['a.buf']" in str(e.value)  # as named_buffers() lists it (duplicates removed)


class CustomNet(Net):
    """Classes that override what model_tensors reads: the walk falls back to the methods."""

    def named_buffers(self, *args, **kwargs):
        yield from super().named_buffers(*args, **kwargs)


class CustomModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.zeros(3))

    def named_modules(self, *args, **kwargs):
        yield from super().named_modules(*args, **kwargs)


@pytest.mark.parametrize("where", ["root", "child"])
def test_classes_overriding_the_listing_methods_fall_back_and_are_refused(where):
    torch.manual_seed(0)
    model = CustomNet() if where == "root" else Net()
    if where == "child":
        model.extra = CustomModules()
    private = PrivateModule(model)
    _step(private)
    assert model_tensors(model) is None
    if where == "root":
        model.register_buffer("late", torch.zeros(3))
        model.write = "late"
    else:
        model.write = "extra.buf"
    _refused(private, "were updated during a private forward")


# -- the parameter watch: parameters that appear or become trainable later ------------------------
def test_submodule_swapped_after_the_first_step_is_watched():
    model, private = _warm()
    model.fc2 = nn.Linear(4, 3)  # not wrapped: its weight reaches autograd outside any capture
    x, y = _data()
    nn.functional.cross_entropy(private(x), y).backward()
    assert model.fc2.weight.grad is None or not bool(model.fc2.weight.grad.any())  # zeroed
    with pytest.raises(UnownedParameterError, match=r"fc2\.weight"):
        private.clipped_sums(max_grad_norm=C)


def test_parameter_unfrozen_after_the_first_step_and_leaked_is_refused():
    torch.manual_seed(0)
    model = Net()
    model.aux = nn.Linear(4, 3)
    model.aux.requires_grad_(False)
    model.leak = "aux"  # frozen: a constant, nothing to clip
    private = PrivateModule(model)
    _step(private)
    model.aux.weight.requires_grad_(True)
    x, y = _data()
    nn.functional.cross_entropy(private(x), y).backward()
    with pytest.raises(UnownedParameterError, match=r"aux\.weight"):
        private.clipped_sums(max_grad_norm=C)


def test_parameter_replaced_in_a_wrapped_layer_is_the_one_clipped():
    model, private = _warm()
    old = model.fc1.weight
    model.fc1.weight = nn.Parameter(old.detach().clone())
    sums = _step(private)
    assert model.fc1.weight in sums and all(p is not old for p in sums)


def test_layer_frozen_then_unfrozen_between_steps():
    model, private = _warm()
    model.fc1.requires_grad_(False)
    assert set(_step(private)) == {model.fc2.weight, model.fc2.bias}
    assert model.fc1.weight.grad is None
    model.fc1.requires_grad_(True)
    assert set(_step(private)) == set(model.parameters())


def _swap_fc2(mod, args):
    mod.fc2 = nn.Linear(4, 3)


def test_a_pre_hook_running_before_the_watch_is_not_skipped():
    # the watch's own walk is skipped when PrivateModule.forward has just made it, but only when
    # no other pre-hook runs in between (one could change the parameters)
    model, private = _warm()
    handle = model.register_forward_pre_hook(_swap_fc2, prepend=True)
    try:
        x, y = _data()
        nn.functional.cross_entropy(private(x), y).backward()
        with pytest.raises(UnownedParameterError, match=r"fc2\.weight"):
            private.clipped_sums(max_grad_norm=C)
    finally:
        handle.remove()


def test_a_global_pre_hook_is_not_skipped():
    model, private = _warm()

    def swap(mod, args):
        if mod is model:
            _swap_fc2(mod, args)

    handle = torch_module.register_module_forward_pre_hook(swap)
    try:
        x, y = _data()
        nn.functional.cross_entropy(private(x), y).backward()
        with pytest.raises(UnownedParameterError, match=r"fc2\.weight"):
            private.clipped_sums(max_grad_norm=C)
    finally:
        handle.remove()
    assert not private.parameter_watch.primed


def test_direct_calls_of_the_model_still_refresh_the_watch():
    model, private = _warm()
    model.fc2 = nn.Linear(4, 3)
    model(torch.zeros(B, 4))  # the root's pre-hook (no PrivateModule.forward) hooks fc2
    assert id(model.fc2.weight) in private.parameter_watch._hooked


def test_remove_hooks_leaves_plain_gradients():
    model, private = _warm()
    private.remove_hooks()
    x, y = _data()
    nn.functional.cross_entropy(private(x), y).backward()  # through the wrapper, unhooked
    assert all(p.grad is not None and bool(p.grad.any()) for p in model.parameters())
    assert not private.parameter_watch._hooked


# -- the rule layers' overridden forward -------------------------------------------------------
def test_frozen_layer_keeps_the_signature_check_and_records_nothing():
    model, private = _warm()
    model.fc1.requires_grad_(False)
    private.recorder.start_batch(B)
    with pytest.raises(TypeError, match="takes one argument, 'input'"):
        model.fc1(torch.zeros(B, 4), torch.zeros(1))
    model.fc1(input=torch.zeros(B, 4))
    model.fc1(torch.zeros(B + 1, 4))  # frozen: its rows are not per-record gradients
    assert not private.recorder.batches[-1].calls and private.recorder.batches[-1].refusal is None
    model.fc1.requires_grad_(True)
    model.fc1(torch.zeros(B + 1, 4))
    assert "rows" in private.recorder.batches[-1].refusal
    private.discard()


def test_functional_call_inside_a_captured_forward_records_nothing():
    model, private = _warm()
    x, _ = _data()
    private(x)
    calls = len(private.recorder.batches[-1].calls)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    out = functional_call(model, params, (x,))
    assert len(private.recorder.batches[-1].calls) == calls
    assert all(g is not None for g in torch.autograd.grad(out.sum(), list(params.values())))
    private.discard()


# -- model_tensors lists what named_buffers() / named_parameters() list --------------------------
def _tricky():
    torch.manual_seed(0)
    m = Net()
    m.shared = m.fc1  # a module twice
    m.tied = nn.Linear(4, 4, bias=False)  # bias None
    m.tied.weight = m.fc1.weight  # a parameter twice
    m.pd = nn.ParameterDict({"a": nn.Parameter(torch.zeros(2))})
    m.h = Holder()
    m.h.register_buffer("none", None)
    m.loop = nn.Sequential()
    m.loop.add_module("back", m)  # a cycle
    return m


def test_model_tensors_match_the_named_methods():
    for m in (_tricky(), nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2)), nn.Linear(2, 2)):
        bufs, params = model_tensors(m)
        for got, named in ((bufs, m.named_buffers()), (params, m.named_parameters())):
            want = [t for _, t in named]
            assert {id(t) for t in got} == {id(t) for t in want}
            assert all(t is not None for t in got)


class WriteThenDrop(Net):
    """Writes a buffer in place, then removes it from the model, in one forward."""

    def forward(self, x):
        out = super().forward(x)
        if self.write is not None:
            del self._buffers[self.write]
        return out


def test_buffer_written_then_removed_during_the_forward_is_refused():
    torch.manual_seed(0)
    model = WriteThenDrop()
    private = PrivateModule(model)
    _step(private)
    model.register_buffer("gone", torch.zeros(3))
    model.write = "gone"
    _refused(private, r"'1 removed during the forward'")


# -- a buffer or parameter assigned (not written in place) during the forward -------------------
class Stash(Net):
    """Assigns record 0 to a registered buffer (or a new Parameter) once armed, i.e. after the
    records probe of the first steps: no version counter of the old tensors moves."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.register_buffer("stash", torch.zeros(4))
        self.what, self.armed = what, False

    def forward(self, x):
        if self.armed:
            if self.what == "buffer":
                self.stash = x[0].detach().clone()
            elif self.what == "new buffer":
                self.register_buffer("fresh", x[0].detach().clone())
            else:
                self.fc1.bias = nn.Parameter(x[0].detach().clone(), requires_grad=False)
        return super().forward(x)


@pytest.mark.parametrize("what,name", [("buffer", "stash"), ("new buffer", "fresh"),
                                       ("parameter", r"fc1\.bias")])
def test_a_tensor_assigned_during_the_forward_is_refused(what, name):
    model = Stash(what)
    private = PrivateModule(model)
    _step(private)
    _step(private)
    model.armed = True
    _refused(private, name + r" \(assigned\).*updated during a private forward")

"""PrivateModule.forward walks the model once before the call and once after
(:func:`~ppml_fast.privacy.ownership.slots`): the walk before gives both the tensors whose
version counters are stamped and each module's slots; the walk after gives the slots compared
with those (:func:`~ppml_fast.privacy.ownership.assigned_names`) and the parameters the watch
refreshes from (in place of a third walk by ``refresh()``). These tests pin what those
shortcuts must keep: state changed during the forward is refused, parameters made trainable or
replaced during the forward are hooked, classes overriding the listing methods take the
fallback through the methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppml_fast.privacy import PrivateModule, UnsupportedModuleError
from ppml_fast.privacy.ownership import UnownedParameterError, model_tensors, slots

C = 1.0
B = 4


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, generator=g), torch.randint(0, 3, (B,), generator=g)


class Holder(nn.Module):
    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("buf", torch.full((4,), value))


class Net(nn.Module):
    """Two captured Linears and a frozen Linear ``aux``; ``attack(self, x)`` runs inside the
    forward once ``armed`` (after the records probe of the first steps); ``leak`` adds
    ``x @ aux.weight.T`` (aux's weight used outside aux's calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)
        self.aux = nn.Linear(4, 3)
        self.aux.requires_grad_(False)
        self.h1, self.h2 = Holder(1.0), Holder(1.0)  # equal values: a swap moves no stamp
        self.attack = None
        self.armed = False
        self.leak = False

    def forward(self, x):
        if self.armed and self.attack is not None:
            self.attack(self, x)
        out = self.fc2(torch.tanh(self.fc1(x)))
        if self.leak:
            out = out + x @ self.aux.weight.T
        return out


def _step(private):
    x, y = _data()
    nn.functional.cross_entropy(private(x), y).backward()
    try:
        sums, seen = private.clipped_sums(max_grad_norm=C)
    finally:
        private.discard()
    assert seen == B
    return sums


def _armed(attack, model=None):
    torch.manual_seed(0)
    model = Net() if model is None else model
    model.attack = attack
    private = PrivateModule(model)
    _step(private)  # the records probe runs on the first steps of a layout
    _step(private)
    model.armed = True
    return model, private


def _forward(private):
    """One armed forward and backward; returns the batch's refusal (None: accepted)."""
    x, y = _data()
    nn.functional.cross_entropy(private(x), y).backward()
    return private.recorder.batches[-1].refusal


def _hooked(private, p) -> bool:
    entry = private.parameter_watch._hooked.get(id(p))
    return entry is not None and entry[0] is p


# -- the watch refreshes from the walk made after the call --------------------------------------
def _unfreeze(m, x):
    m.aux.weight.requires_grad_(True)


def test_parameter_unfrozen_inside_the_forward_is_hooked_and_its_leak_refused():
    model, private = _armed(_unfreeze)
    assert not _hooked(private, model.aux.weight)
    model.leak = True
    assert _forward(private) is None  # unfreezing is no state change
    assert _hooked(private, model.aux.weight)
    try:
        with pytest.raises(UnownedParameterError, match=r"aux\.weight"):
            private.clipped_sums(max_grad_norm=C)
    finally:
        private.discard()


def _replace(m, x):  # a new trainable Parameter in place of aux.weight
    m.aux.weight = nn.Parameter(m.aux.weight.detach().clone())


def test_parameter_replaced_inside_the_forward_is_refused_and_the_new_one_hooked():
    # the walk before the call does not hold the new Parameter: refreshing from it (every
    # parameter it lists is hooked already) would leave the new one unwatched
    model, private = _armed(_replace)
    old = model.aux.weight
    model.leak = True
    why = _forward(private)
    assert model.aux.weight is not old
    assert why is not None and r"aux.weight (assigned)" in why
    assert _hooked(private, model.aux.weight)
    try:
        with pytest.raises(UnownedParameterError, match=r"aux\.weight"):
            private.clipped_sums(max_grad_norm=C)
    finally:
        private.discard()


def _add_layer(m, x):  # a new submodule with trainable parameters, registered in the forward
    if not hasattr(m, "late"):
        m.late = nn.Linear(4, 3)


def test_module_added_inside_the_forward_is_refused_and_its_parameters_hooked():
    model, private = _armed(_add_layer)
    why = _forward(private)
    assert why is not None and "late.weight (assigned)" in why and "late.bias (assigned)" in why
    assert _hooked(private, model.late.weight) and _hooked(private, model.late.bias)
    private.discard()


# -- slots changed during the forward: refused, whatever the version counters say -----------------
def _swap_buffers(m, x):
    m.h1.buf, m.h2.buf = m.h2.buf, m.h1.buf


def _swap_parameter_into_buffer(m, x):  # the tensor object stays in the model, under another slot
    t = m.h1._buffers.pop("buf")
    m.h1._parameters["buf"] = t


def _rename_buffer(m, x):
    m.h1._buffers["other"] = m.h1._buffers.pop("buf")


def _none_bias(m, x):
    m.aux.bias = None


def _same_object_new_module(m, x):  # a new module holding the old module's very buffer
    new = Holder()
    new.buf = m.h1.buf
    m.h1 = new


@pytest.mark.parametrize("attack,names", [
    (_swap_buffers, ["h1.buf (assigned)", "h2.buf (assigned)"]),
    (_swap_parameter_into_buffer, ["h1.buf (assigned)"]),
    (_rename_buffer, ["h1.buf (assigned)", "h1.other (assigned)"]),
    (_none_bias, ["aux.bias (assigned)"]),
    (_same_object_new_module, ["h1.buf (assigned)", "1 module(s) removed (assigned)"]),
])
def test_slots_changed_during_the_forward_are_refused_by_name(attack, names):
    model, private = _armed(attack)
    why = _forward(private)
    private.discard()
    assert why is not None and "updated during a private forward" in why
    for n in names:
        assert n in why


def test_unchanged_slots_are_accepted():
    model, private = _armed(lambda m, x: None)
    assert _forward(private) is None
    private.discard()
    before, after = slots(model), slots(model)
    from ppml_fast.privacy.ownership import assigned_names
    assert assigned_names(model, before, after) == []


# -- the walk: what model_tensors lists, and the fallback when a class overrides a method ----------
class _HideValues(dict):
    def values(self):
        return [v for k, v in self.items() if k != "hidden"]


def test_walk_lists_a_module_a_modules_dict_subclass_hides_from_values():
    torch.manual_seed(0)
    model = Net()
    model.hidden = Holder()
    model._modules = _HideValues(model._modules)

    def write(m, x):
        with torch.no_grad():
            m.hidden.buf.add_(x[0])

    assert "hidden.buf" in dict(model.named_buffers())
    assert any(b is model.hidden.buf for b in model_tensors(model)[0])
    _, private = _armed(write, model)
    why = _forward(private)
    private.discard()
    assert why is not None and "hidden.buf" in why


@pytest.mark.parametrize("key", ["plain", "duplicates", "none bias"])
def test_slots_and_model_tensors_list_the_same_tensors(key):
    torch.manual_seed(0)
    model = Net()
    if key == "duplicates":
        model.again = model.fc1  # one module under two names
        model.h2.buf = model.h1.buf  # one buffer under two names
    if key == "none bias":
        model.nb = nn.Linear(4, 4, bias=False)
    w, found = slots(model), model_tensors(model)
    assert w.stock and found is not None
    assert [id(t) for t in w.buffers] == [id(t) for t in found[0]]
    assert [id(t) for t in w.parameters] == [id(t) for t in found[1]]
    assert {id(t) for t in w.buffers} == {id(b) for _, b in model.named_buffers()}
    assert {id(t) for t in w.parameters} == {id(p) for _, p in model.named_parameters()}


class Extra(Net):
    """Overrides named_parameters to list a Parameter the module tree does not hold: only the
    fallback through the methods sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.outside = [nn.Parameter(torch.zeros(3), requires_grad=False)]

    def named_parameters(self, *args, **kwargs):
        yield from super().named_parameters(*args, **kwargs)
        yield "outside", self.outside[0]


def _write_outside(m, x):
    with torch.no_grad():
        m.outside[0].add_(x[0, :3])


def test_class_overriding_named_parameters_takes_the_fallback_for_the_version_check():
    model, private = _armed(_write_outside, Extra())
    assert not slots(model).stock and model_tensors(model) is None
    why = _forward(private)
    private.discard()
    assert why is not None and "['outside']" in why


def _unfreeze_outside(m, x):
    m.outside[0].requires_grad_(True)


def test_class_overriding_named_parameters_takes_the_fallback_for_the_watch():
    # refresh() walks named_parameters() itself: the parameter listed only there, made
    # trainable in the forward and used outside any captured call, is hooked and refused
    model, private = _armed(_unfreeze_outside, Extra())
    x, y = _data()
    out = private(x)
    assert _hooked(private, model.outside[0])
    loss = nn.functional.cross_entropy(out + (model.outside[0] * x[:, :3]), y)
    loss.backward()
    try:
        with pytest.raises(UnownedParameterError, match="outside"):
            private.clipped_sums(max_grad_norm=C)
    finally:
        private.discard()


class CustomModules(Holder):
    def named_modules(self, *args, **kwargs):
        yield from super().named_modules(*args, **kwargs)


def test_a_child_overriding_named_modules_turns_the_walk_off():
    torch.manual_seed(0)
    model = Net()
    model.c = CustomModules()
    assert not slots(model).stock and model_tensors(model) is None

    def write(m, x):
        with torch.no_grad():
            m.c.buf.add_(x[0])

    _, private = _armed(write, model)
    why = _forward(private)
    private.discard()
    assert why is not None and "['c.buf']" in why


def test_state_added_between_forwards_is_seen_by_the_next_walk():
    model, private = _armed(None)
    model.late = Holder()  # after the first steps: a cache would miss it

    def write(m, x):
        with torch.no_grad():
            m.late.buf.add_(x[0])

    model.attack = write
    why = _forward(private)
    private.discard()
    assert why is not None and "['late.buf']" in why
    model.attack = None
    model.late2 = nn.Linear(4, 3)  # trainable, not wrapped: hooked at the next forward
    model.leak = False
    x, y = _data()
    nn.functional.cross_entropy(private(x) + model.late2(x), y).backward()
    assert _hooked(private, model.late2.weight)
    try:
        with pytest.raises(UnsupportedModuleError):
            private.clipped_sums(max_grad_norm=C)
    finally:
        private.discard()

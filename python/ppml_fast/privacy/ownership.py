"""Which module a parameter belongs to for capture, and a watch that refuses a DP step when a
trainable parameter was used outside every captured call.

Per-record gradients are recorded per module call (:mod:`ppml_fast.privacy.capture`): a call's
record covers the parameters of the module that ran. A parameter is *owned* by the module that
registers it, or, when it sits in a ``nn.ParameterDict`` / ``nn.ParameterList`` child (a
container that has no forward of its own; peft's LoRA layers keep ``lora_embedding_A`` there),
by that container's parent, the nearest module that actually runs it (dotted names such as
``lora_embedding_A.default`` work with ``torch.func.functional_call``).

A parameter used anywhere else (``x @ self.fc.weight.T`` in a parent of ``fc``) is in no record:
its gradient would be neither per-record nor clipped. Captured calls never let autograd reach a
trainable parameter (rule layers compute on detached parameters, hooked layers switch
``requires_grad`` off while they run, the torch.func path works on detached copies), so a
gradient that reaches one while a batch is captured is such a use. :class:`ParameterWatch` hooks
every trainable parameter, zeroes what reaches it (no unclipped gradient lands in ``.grad``) and
remembers its name; the DP step (``clipped_sums``) then raises :class:`UnownedParameterError`
before it changes anything.

Every private forward lists the model's buffers and parameters (the watch hooks new trainable
ones; ``PrivateModule.forward`` refuses state the forward writes, :func:`moved_names`, or
assigns, :func:`assigned_names`). :func:`slots` walks the module tree directly, once before the
call and once after, never from a cache, so no change to the model between forwards can be
missed (issue 16: ``named_buffers()`` + ``named_parameters()`` cost 0.18 ms a forward on BERT).
Each walk gives both the slots and the tensors (:func:`model_tensors`' lists), and the walk
after the call is what the watch refreshes from (bench-size BERT-LoRA: 235 -> 146 us of
bookkeeping a forward, against four walks before).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ppml_fast.privacy.layers import UnsupportedModuleError

_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


class UnownedParameterError(UnsupportedModuleError):
    """A trainable parameter got a gradient outside every captured module call."""


def is_container(mod: nn.Module) -> bool:
    """Whether ``mod`` only holds parameters for its parent (ParameterDict / ParameterList)."""
    return isinstance(mod, _CONTAINERS)


def owned_parameters(mod: nn.Module) -> dict[str, nn.Parameter]:
    """``mod``'s own parameters and those of its ParameterDict / ParameterList children, by the
    (dotted) name ``functional_call`` takes: role -> parameter (None entries left out)."""
    out = {role: p for role, p in mod._parameters.items() if p is not None}
    for name, child in mod._modules.items():
        if child is not None and is_container(child):
            for sub, p in child.named_parameters():
                out[f"{name}.{sub}"] = p
    return out


_STOCK = {name: getattr(nn.Module, name) for name in
          ("named_modules", "named_buffers", "named_parameters", "_named_members")}


class Slots(NamedTuple):
    """One walk of a model (:func:`slots`): what each module binds under each buffer and
    parameter name, and the tensors bound."""

    sig: list  # per module: (id(module), (names, ids of the tensors or None) of its buffer
    #            items or (), the same of its parameter items or ())
    modules: list  # the modules walked, each once: they (and ``buffers`` / ``parameters``) keep
    #                the objects of ``sig``'s ids alive, so no other object can take those ids
    buffers: list  # the buffers (not None), in the order model_tensors gives them
    parameters: list  # the parameters (not None), likewise
    stock: bool  # no class overrides what named_buffers() / named_parameters() read


def _walk(root: nn.Module, signature: bool) -> Slots:
    """The walk of :func:`model_tensors` and :func:`slots`: ``_modules`` / ``_buffers`` /
    ``_parameters`` read by ``.items()``, as ``named_modules()``, ``named_buffers()`` and
    ``state_dict()`` read them (review S7); every module once, breadth first; with ``signature``
    the slots of each module too."""
    cls = type(root)
    stock = all(getattr(cls, n, None) is f for n, f in _STOCK.items())
    stock_modules = _STOCK["named_modules"]
    mods = [root]
    seen = {id(root)}
    sig: list = []
    buffers: list = []
    params: list = []
    for m in mods:  # grows while it is read: every module once
        if type(m).named_modules is not stock_modules:
            stock = False
        # (names, tensors) of the items, or () (a view's truth is its dict's real size)
        b = m._buffers.items()
        b = tuple(zip(*b)) if b else ()
        p = m._parameters.items()
        p = tuple(zip(*p)) if p else ()
        if b:
            buffers += b[1]
            if signature:
                b = (b[0], tuple(map(id, b[1])))
        if p:
            params += p[1]
            if signature:
                p = (p[0], tuple(map(id, p[1])))
        if signature:
            sig.append((id(m), b, p))
        for _, c in m._modules.items():
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                mods.append(c)
    # without the registered Nones (bias=False registers bias None)
    return Slots(sig, mods, [t for t in buffers if t is not None],
                 [t for t in params if t is not None], stock)


def model_tensors(root: nn.Module) -> Optional[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(buffers, parameters) of ``root``: the tensors ``root.named_buffers()`` and
    ``root.named_parameters()`` list, in another order and possibly more than once (a tensor
    that two modules hold), found by a direct walk of ``_modules`` / ``_buffers`` /
    ``_parameters`` (a third to a fifth of the cost of those generators, which build every
    qualified name). Nothing is cached: a module, buffer or parameter added, removed or replaced
    in any way is seen by the next walk. None when a class overrides what those methods read
    (``root``'s ``named_buffers``, ``named_parameters`` or ``_named_members``, or any module's
    ``named_modules``): the caller then uses the methods themselves."""
    w = _walk(root, False)
    return (w.buffers, w.parameters) if w.stock else None


def slots(root: nn.Module) -> Slots:
    """What each module of ``root`` binds under each buffer and parameter name (``sig``: the
    module's id, the names and the ids of the tensors, or of None), with the tensors that
    :func:`model_tensors` lists (``buffers``, ``parameters``; valid when ``stock``, i.e. when
    model_tensors would not return None): one walk for both. Two of these differ when a slot
    was added, removed, set to None or rebound, also to a tensor the model already held (two
    buffers swapped): :func:`assigned_names` (review S7). The ids are compared while both walks'
    objects are alive (each keeps its modules and tensors), so equal ids are the same objects."""
    return _walk(root, True)


def stamps(tensors: list) -> list:
    """(version, data pointer, shape) of each tensor: an in-place write moves the version;
    ``.data = other`` and ``torch.utils.swap_tensors`` (which may keep the version) move the
    storage. Writes through ``.data`` or numpy into the same storage are not seen here (only the
    records probe, which compares values, sees them)."""
    return [(t._version, t.data_ptr(), t.shape) for t in tensors]


def assigned_names(root: nn.Module, before: Slots, after: Slots) -> list[str]:
    """The qualified names of the buffer and parameter slots that differ between ``before`` and
    ``after`` (two :func:`slots` of ``root``, both held until now): a tensor assigned,
    registered, deleted or swapped in during the forward (e.g. ``self.stash = x[0].clone()`` on
    a registered buffer, or two buffers swapped on a condition of the data) is state computed
    from the batch just as an in-place write is, and the old tensors' version counters do not
    see it (review S7). Equal signatures (one list comparison): nothing changed."""
    if after.sig == before.sig:
        return []
    names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
    old = {mid: (bufs, params) for mid, bufs, params in before.sig}
    out = []
    for mid, bufs, params in after.sig:
        prev = old.pop(mid, None)
        prefix = names.get(mid, "?")
        prefix = f"{prefix}." if prefix else ""
        for items, was in ((bufs, prev[0] if prev else ()), (params, prev[1] if prev else ())):
            a, b = dict(zip(*items)), dict(zip(*was))
            out += [f"{prefix}{n} (assigned)" for n in sorted(set(a) | set(b))
                    if a.get(n, -1) != b.get(n, -1)]  # -1: no object has it
    out += [f"{len(old)} module(s) removed (assigned)"] if old else []
    return out or ["a buffer or parameter slot (assigned)"]


def moved_names(root: nn.Module, found: tuple, versions: tuple) -> list[str]:
    """The names, in the order ``named_buffers()`` then ``named_parameters()`` list them, of the
    tensors of ``found`` (buffers, parameters) whose version counter moved from ``versions``."""
    out: list[str] = []
    for ts, vs, named in zip(found, versions, (root.named_buffers, root.named_parameters)):
        now = stamps(ts)
        if now == vs:  # nothing moved (every forward but a refused one)
            continue
        ids = {id(t) for t, v, w in zip(ts, vs, now) if v != w}
        if ids:
            listed = [(n, id(t)) for n, t in named() if id(t) in ids]
            out += [n for n, _ in listed]
            if len(listed) < len(ids):  # no longer in the model: no name to give
                out.append(f"{len(ids) - len(listed)} removed during the forward")
    return out


def inner_aliases(root: nn.Module) -> dict[int, set[int]]:
    """id(module) -> ids of the parameters it registers as its own that one of its submodules
    registers too (Hugging Face's BertLMPredictionHead.bias is its decoder's bias; Opacus's
    DPLSTM renames its cells' parameters). Such a parameter belongs, for capture, to the
    innermost module that registers it: that is the module whose calls use it. A use by the
    outer module itself is a use outside its owner's calls, which the parameter watch refuses."""
    owners: dict[int, list[str]] = {}
    mods = dict(root.named_modules(remove_duplicate=False))
    for name, mod in mods.items():
        if is_container(mod):  # a ParameterDict/List's parameters are its parent's own
            continue
        for p in owned_parameters(mod).values():
            owners.setdefault(id(p), []).append(name)
    out: dict[int, set[int]] = {}
    for pid, names in owners.items():
        for outer in names:
            prefix = outer + "." if outer else ""
            if any(n != outer and n.startswith(prefix) for n in names):
                out.setdefault(id(mods[outer]), set()).add(pid)
    return out


class ParameterWatch:
    """Hooks on the trainable parameters of ``root`` that flag a gradient reaching one while
    ``captured()`` is true. Parameters that become trainable later (unfrozen, or new Parameters
    assigned to a module) are hooked at the next forward of ``root``."""

    def __init__(self, root: nn.Module, captured: Callable[[], bool]) -> None:
        self.flagged: dict[int, str] = {}  # id(parameter) -> its qualified name
        self._hooked: dict[int, tuple] = {}  # id(parameter) -> (parameter, handle)
        self._root, self._captured = root, captured
        # set by refresh(for_call=True) for the root's next call only: its pre-hook then skips
        # the walk that refresh() just made
        self.primed = False
        self._pre = None
        self._hook_new()

        def pre(mod, args):  # a closure (deep copies of root share it): copies are not watched
            if mod is root:
                if self.primed:
                    self.primed = False
                else:
                    self.refresh()

        self._pre = root.register_forward_pre_hook(pre, prepend=True)  # before the switches

    def refresh(self, params: Optional[list[torch.Tensor]] = None, for_call: bool = False) -> None:
        """Hooks the trainable parameters not hooked yet. ``params``: every parameter of the
        model now (:func:`model_tensors`; walked here when not given). When each trainable one
        is hooked already (the common case) nothing else is done; otherwise the parameters are
        listed again with their names (the hooks' names). ``for_call``: the caller calls the
        root right after this, running nothing in between (``PrivateModule.forward``): the
        root's pre-hook then skips its own refresh, unless another pre-hook runs before it (a
        global one, or one registered later with ``prepend=True``), which could change the
        parameters in between; the caller resets ``primed`` after the call."""
        self.primed = False
        if self._pre is None:  # removed: hooks nothing any more
            return
        if params is None:
            found = model_tensors(self._root)
            params = found[1] if found is not None else None
        if params is None or not all(
                not p.requires_grad or not isinstance(p, nn.Parameter)
                or (id(p) in self._hooked and self._hooked[id(p)][0] is p) for p in params):
            self._hook_new()
        self.primed = for_call and self._runs_first()

    def _runs_first(self) -> bool:
        """Whether this watch's pre-hook is the first code a call of the root runs."""
        global_pre = getattr(_torch_module, "_global_forward_pre_hooks", None)
        return (global_pre is not None and not global_pre
                and next(iter(self._root._forward_pre_hooks), None) == self._pre.id)

    def _hook_new(self) -> None:
        """Hooks the trainable parameters not hooked yet (the full walk, with names)."""
        names: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for name, p in self._root.named_parameters(remove_duplicate=False):
            # not Parameter: swapped in by torch.func.functional_call (the fallback's reruns)
            if p.requires_grad and isinstance(p, nn.Parameter):
                names.setdefault(id(p), []).append(name)
                params[id(p)] = p
        for pid, p in params.items():
            if pid not in self._hooked or self._hooked[pid][0] is not p:
                self._hooked[pid] = (p, p.register_hook(self._hook(pid, " = ".join(names[pid]))))

    def _hook(self, pid: int, name: str):
        def hook(grad: torch.Tensor):
            if not self._captured():
                return None
            self.flagged[pid] = name
            return torch.zeros_like(grad)  # the unclipped gradient does not reach .grad

        return hook

    def check(self, step: int = 0) -> None:
        """Raises UnownedParameterError naming the flagged parameters (nothing is changed)."""
        if not self.flagged:
            return
        names = sorted(self.flagged.values())
        raise UnownedParameterError(
            f"step {step}: trainable parameter(s) {', '.join(names[:10])} received a gradient "
            "outside every call of the module that owns them (e.g. `x @ self.fc.weight.T` in a "
            "parent of fc, a parameter of one module read in another's forward, or a penalty on "
            "it added to the loss): that gradient is not per-record, so it cannot be clipped. "
            "Use each parameter through a "
            "call of its own module (fc(x)), move it into the module whose forward uses it, or "
            "tie it by assigning the same Parameter to two modules; call zero_grad() before "
            "the next step")

    def clear(self) -> None:
        self.flagged.clear()

    def remove(self) -> None:
        if self._pre is not None:
            self._pre.remove()
        self._pre = None
        self.primed = False
        for _, h in self._hooked.values():
            h.remove()
        self._hooked.clear()
        self.flagged.clear()

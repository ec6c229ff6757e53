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
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

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
        self.refresh()

        def pre(mod, args):  # a closure (deep copies of root share it): copies are not watched
            if mod is root:
                self.refresh()

        self._pre = root.register_forward_pre_hook(pre, prepend=True)  # before the switches

    def refresh(self) -> None:
        """Hooks the trainable parameters not hooked yet."""
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
        self._pre.remove()
        for _, h in self._hooked.values():
            h.remove()
        self._hooked.clear()
        self.flagged.clear()

"""Capture of what per-sample clipping needs, without per-sample gradients: each supported
layer's input and the gradient of the loss with respect to its output (a tensor hook), per
forward pass of the model (one physical batch).

Autograd must never compute a captured layer's summed, unclipped parameter gradients (the work
DP-SGD would throw away). The rule layers with a known functional (Linear, Conv, Embedding,
LayerNorm, GroupNorm, RMSNorm) and attention have their forward replaced by
:class:`~ppml_fast.privacy.module.PrivateModule`, which runs it on detached parameters; the other
layers are captured by the forward hooks of :meth:`Recorder.attach`, which switch the layer's own
trainable parameters to ``requires_grad=False`` while it runs (and back right after, also when
forward raises). Gradients still flow to earlier layers;
a layer whose output would then not require a gradient (the first layer) is attached to the
graph by adding a zero "anchor" scalar. The clipped sums are computed later from the captured
tensors (book-keeping, Bu et al. 2023), by the rules of :mod:`ppml_fast.privacy.per_sample`, or
by torch.func for other modules (:mod:`ppml_fast.privacy.fallback`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ppml_fast.privacy.per_sample import Captured


@dataclass
class Call:
    """One call of a captured layer in one forward pass."""

    module: nn.Module
    params: dict[str, nn.Parameter]  # role -> trainable parameter
    cap: Optional[Captured] = None  # rule path
    inputs: Optional[tuple] = None  # torch.func path: the module's positional inputs
    grad: Optional[torch.Tensor] = None  # d loss / d output, batch first
    seq_first: bool = False  # the output is (T, B, ...): its gradient is moved to batch first
    # role -> [start, stop) of the parameter's flattened elements when the call uses only that part
    # of it (the packed attention projections); ``cap.params[role]`` is then that part's view
    spans: Optional[dict[str, tuple[int, int]]] = None


@dataclass
class Batch:
    """The calls of one forward pass of the model."""

    size: int
    calls: list[Call] = field(default_factory=list)

    @property
    def backpropagated(self) -> bool:
        return any(c.grad is not None for c in self.calls)


class Recorder:
    """Owns the hooks and the captured batches of one model."""

    def __init__(self, batch_first: bool = True) -> None:
        self.batch_first = batch_first
        self.batches: list[Batch] = []
        self.enabled = True
        self._anchor = torch.zeros((), requires_grad=True)
        self._handles: list[Any] = []

    # -- batches --------------------------------------------------------------------------------
    def start_batch(self, size: int) -> None:
        if self.enabled and torch.is_grad_enabled():
            self.batches.append(Batch(size))

    def take(self) -> list[Batch]:
        """The batches captured so far (and forgets them)."""
        out, self.batches = self.batches, []
        return out

    @contextlib.contextmanager
    def paused(self):
        """No capture inside (the torch.func fallback reruns modules)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def _current(self) -> Optional[Batch]:
        if not (self.enabled and torch.is_grad_enabled() and self.batches):
            return None
        return self.batches[-1]

    # -- hooks ----------------------------------------------------------------------------------
    def attach(self, module: nn.Module, make_call) -> None:
        """Hooks ``module``: ``make_call(module, inputs) -> Call`` builds the record of a call
        (of the parameters trainable at that call; a call with none is not recorded)."""
        switched: list[list[nn.Parameter]] = []  # a stack: a module may run inside itself

        def pre(mod, inputs):
            # a deep copy of the module carries these hooks: it is not recorded (nor switched)
            mine = mod is module and self._current() is not None
            off = [p for p in mod._parameters.values()
                   if p is not None and p.requires_grad] if mine else []
            for p in off:
                p.requires_grad_(False)
            switched.append(off)

        def post(mod, inputs, output):
            batch = self._current()
            for p in switched.pop() if switched else ():
                p.requires_grad_(True)
            if batch is None or mod is not module or not isinstance(output, torch.Tensor):
                return None
            call = make_call(mod, inputs)
            if not call.params:  # frozen: nothing to record
                return None
            batch.calls.append(call)
            return self.tap(output, call)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def tap(self, output: torch.Tensor, call: Call) -> torch.Tensor:
        """Connects ``output`` to the graph if needed and records its gradient into ``call``."""
        if not output.requires_grad:
            output = output + self._anchor.to(output.dtype)

        def sink(grad: torch.Tensor) -> None:
            if call.seq_first:
                grad = grad.movedim(1, 0)
            call.grad = grad if call.grad is None else call.grad + grad

        output.register_hook(sink)
        return output

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.batches.clear()

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
from torch.utils import _pytree as pytree

from ppml_fast.privacy.fallback import Rerun, detach_tree, output_leaves, tappable
from ppml_fast.privacy.per_sample import Captured


@dataclass
class Call:
    """One call of a captured layer in one forward pass."""

    module: nn.Module
    params: dict[str, nn.Parameter]  # role -> trainable parameter
    cap: Optional[Captured] = None  # rule path
    inputs: Optional[tuple] = None  # torch.func path: the module's positional inputs (detached)
    grad: Optional[torch.Tensor] = None  # d loss / d output, batch first
    seq_first: bool = False  # the output is (T, B, ...): its gradient is moved to batch first
    # role -> [start, stop) of the parameter's flattened elements when the call uses only that part
    # of it (the packed attention projections); ``cap.params[role]`` is then that part's view
    spans: Optional[dict[str, tuple[int, int]]] = None
    kwargs: Optional[dict] = None  # torch.func path: the module's keyword inputs (detached)
    # torch.func path: what reruns the call (inputs, tapped outputs, batch size); ``grad`` is
    # then a list, one gradient (or None: none reached it) per tapped output
    rerun: Optional[Rerun] = None
    # version counters of what the call ran on, when it was recorded: a tensor changed in place
    # afterwards would make the per-sample norms and sums use values the layer never saw
    versions: Optional[tuple] = None
    # torch.func path: the values of the call's non-tensor inputs and of its module's own public
    # attributes when it ran (records._plain_inputs compares them between probe runs: a value
    # computed from the batch in an object the forward mutates, or set on the layer, review S9
    # round 4: 2.0 C)
    plain: Optional[list] = None


@dataclass
class Batch:
    """The calls of one forward pass of the model."""

    size: int
    calls: list[Call] = field(default_factory=list)
    # why this batch's rows cannot be tied to its records (ppml_fast.privacy.records): the DP
    # step refuses it, naming the layer, before anything changes; None when they can
    refusal: Optional[str] = None
    # kept by a zero_grad() before its backward came (PrivateModule.discard): the next one
    # forgets it if it is still not backpropagated
    kept: bool = False

    @property
    def backpropagated(self) -> bool:
        return any(c.grad is not None for c in self.calls)


def call_tensors(call: Call) -> list[torch.Tensor]:
    """What a captured call ran on: the rule's activation, or the torch.func path's inputs."""
    if call.cap is not None:
        return [call.cap.activation]
    return [t for t in pytree.tree_leaves((call.inputs or (), call.kwargs or {}))
            if isinstance(t, torch.Tensor)]


def plain_values(mod: nn.Module, args, kwargs) -> list:
    """Keys (:func:`arguments.value_key`) of a torch.func-path call's non-tensor inputs and of
    its module's public attributes that are not tensors or modules, taken when it runs."""
    from ppml_fast.privacy.arguments import value_key

    inputs = [v for v in pytree.tree_leaves((tuple(args), dict(kwargs)))
              if not isinstance(v, torch.Tensor)]
    own = {k: v for k, v in vars(mod).items()
           if not k.startswith("_") and k != "training" and not isinstance(v, (torch.Tensor, nn.Module))}
    return [value_key(v) for v in inputs] + [value_key(own)]


def stamp(call: Call) -> None:
    """Records the version counters of what ``call`` ran on (see :func:`changed_in_place`)."""
    if call.cap is not None:  # call_tensors(call), without building the list (every rule call)
        call.versions = (call.cap.activation._version,)
    else:
        call.versions = tuple(t._version for t in call_tensors(call))


def changed_in_place(call: Call) -> bool:
    """Whether a tensor ``call`` ran on was modified in place after it was recorded (its
    captured copy is a view that sees the change)."""
    return call.versions is not None and call.versions != tuple(t._version for t in call_tensors(call))


def graph_building(call: Call, batch: Optional[Batch]) -> None:
    """Refuses (at the step, before anything changes) a batch whose captured output gradients
    came (also) from a backward pass that builds a graph: ``torch.autograd.grad(...,
    create_graph=True)`` or ``backward(create_graph=True)`` through the private forward, as an
    input-gradient penalty does (review S9: 1.04 C). Such a pass runs the hooks with grad mode on
    (the engine sets it to ``create_graph``; a plain backward, also the nested one of a reentrant
    checkpoint, runs them with it off). Its output gradients are not the loss's (the sinks would
    add them to the loss's, and the mean loss's scale B would then multiply them: a record's
    clipped gradient would depend on the batch size), and the per-sample gradients of a loss on
    gradients (double backward) are not something ppml_fast computes. Called by the sinks only
    when grad mode is on (one flag read per sink otherwise)."""
    if batch is None or batch.refusal:
        return
    batch.refusal = (
        f"{type(call.module).__name__}: a backward pass that builds a graph "
        "(torch.autograd.grad(..., create_graph=True) or backward(create_graph=True), e.g. an "
        "input-gradient penalty or a second-order term) went through the private forward: its "
        "output gradients are not the loss's, and per-sample gradients of a loss on gradients "
        "(double backward) are not computed by ppml_fast, so the per-sample clipping would not "
        "bound a record's contribution. Remove the penalty (or compute it without "
        "differentiating through the private model) and run the forward and backward again")


class Recorder:
    """Owns the hooks and the captured batches of one model."""

    def __init__(self, batch_first: bool = True) -> None:
        self.batch_first = batch_first
        self.batches: list[Batch] = []
        self.enabled = True
        self._anchor = torch.zeros((), requires_grad=True)
        self._handles: list[Any] = []
        self.inside = 0  # forwards of the private model running now (PrivateModule.forward)

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

    def check_inside(self, call: Call, batch: Optional[Batch]) -> None:
        """Refuses (at the step) a call captured while no forward of the private model runs:
        a layer called after the forward returned (``model.module.head(model(x))``, or in the
        loss) was never probed (:mod:`ppml_fast.privacy.records`), and its rows may be any mix
        of records (``head(h - h.mean(0))``, ``head(h.roll(1, 0))`` moved the clipped sum by up
        to 1.93 C). Calls rerun by autograd during backward (activation checkpointing) are the
        forward's own calls recomputed and are allowed."""
        if batch is None or self.inside or batch.refusal:  # inside: every call of a forward
            return
        if getattr(torch._C, "_current_graph_task_id", lambda: 0)() != -1:  # in backward
            return
        batch.refusal = (
            f"{type(call.module).__name__}: called outside the forward of the private model "
            "(after it returned: e.g. `private.module.head(private(x))`, or a layer used in the "
            "loss); ppml_fast proves that a layer's rows are records only for the calls made "
            "inside the forward. Call it inside the model's forward (wrap the model and the "
            "layer in one nn.Module and make that private)")

    # -- hooks ----------------------------------------------------------------------------------
    def attach(self, module: nn.Module, make_call, owned=None, label: str = "") -> None:
        """Hooks ``module``. Rule path (``owned`` None): ``make_call(module, inputs) -> Call``
        builds the record of a call of one tensor output. torch.func path: ``owned(module)``
        gives the parameters the call records (role -> parameter: the module's own and its
        parameter containers', :func:`~ppml_fast.privacy.ownership.owned_parameters`); inputs
        (positional and keyword) and outputs are pytrees, every floating-point output is tapped.
        Only the parameters trainable at the call are recorded (a call with none is not)."""
        params_of = owned or (lambda m: {r: p for r, p in m._parameters.items() if p is not None})
        switched: list[list[nn.Parameter]] = []  # a stack: a module may run inside itself

        def pre(mod, args, kwargs):
            # a deep copy of the module carries these hooks: it is not recorded (nor switched)
            mine = mod is module and self._current() is not None
            off = [p for p in params_of(mod).values() if p.requires_grad] if mine else []
            for p in off:
                p.requires_grad_(False)
            switched.append(off)

        def post(mod, args, kwargs, output):
            batch = self._current()
            on = switched.pop() if switched else []
            for p in on:
                p.requires_grad_(True)
            if batch is None or mod is not module or not on:
                return None
            if owned is None:
                if not isinstance(output, torch.Tensor):
                    return None
                call = make_call(mod, args)
                if not call.params:  # frozen: nothing to record
                    return None
                batch.calls.append(call)
                return self.tap(output, call)
            params = {r: p for r, p in params_of(mod).items() if any(p is q for q in on)}
            return self._tap_tree(mod, params, args, kwargs, output, batch, label)

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _tap_tree(self, mod, params, args, kwargs, output, batch: Batch, label: str):
        """Records a torch.func call: taps each floating-point tensor of ``output`` (a pytree)
        through a fresh node (so that each tap sees only the uses of what it returns, also when
        outputs alias each other) and returns the output rebuilt around the taps."""
        leaves, spec = output_leaves(label or type(mod).__name__, output)
        where = [i for i, a in enumerate(leaves) if tappable(a)]
        if not where:  # nothing a gradient can reach: nothing to record
            return None
        rerun = Rerun(detach_tree(tuple(args)), detach_tree(dict(kwargs)),
                      [leaves[i].detach() for i in where], batch.size, label)
        call = Call(mod, params, inputs=rerun.args, kwargs=rerun.kwargs, rerun=rerun,
                    plain=plain_values(mod, args, kwargs))
        stamp(call)
        self.check_inside(call, batch)
        batch.calls.append(call)
        n = len(where)
        for k, i in enumerate(where):
            leaves[i] = leaves[i] + self._anchor.to(leaves[i].dtype)
            leaves[i].register_hook(self._sink(call, k, n, batch))
        return pytree.tree_unflatten(leaves, spec)

    @staticmethod
    def _sink(call: Call, k: int, n: int, batch: Optional[Batch] = None):
        def sink(grad: torch.Tensor) -> None:
            if torch.is_grad_enabled():  # a backward that builds a graph: see graph_building
                graph_building(call, batch)
            if call.grad is None:
                call.grad = [None] * n
            call.grad[k] = grad if call.grad[k] is None else call.grad[k] + grad

        return sink

    def tap(self, output: torch.Tensor, call: Call, batch: Optional[Batch] = None) -> torch.Tensor:
        """Connects ``output`` to the graph if needed and records its gradient into ``call``.
        ``batch``: the current batch (``_current()``) when the caller has just read it."""
        stamp(call)
        if batch is None:
            batch = self._current()
        self.check_inside(call, batch)
        if not output.requires_grad:
            anchor = self._anchor
            output = output + (anchor if anchor.dtype == output.dtype else anchor.to(output.dtype))

        def sink(grad: torch.Tensor) -> None:
            if torch.is_grad_enabled():  # a backward that builds a graph: see graph_building
                graph_building(call, batch)
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

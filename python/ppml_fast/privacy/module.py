"""PrivateModule: the user's model, hooked so that each forward pass records what per-sample
clipping needs (:mod:`ppml_fast.privacy.capture`), and the clipped per-sample sums computed from
those records (:meth:`PrivateModule.clipped_sums`, :mod:`ppml_fast.privacy.clipping`) for the
DP optimizer.

Every layer with trainable parameters of its own is handled by a rule (ghost norms and
book-keeping sums; :mod:`ppml_fast.privacy.per_sample`), by the nn.MultiheadAttention path
(:mod:`ppml_fast.privacy.attention`: self- and cross-attention as linear-rule calls, some on
disjoint parts of a packed parameter, whose norms add up and whose clipped sums fill their parts)
or by torch.func (:mod:`ppml_fast.privacy.fallback`).
Layers that cannot be private (BatchNorm, ...) are refused at construction, naming the layer.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import types
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ppml_fast.privacy import arguments, attention, heap, records, recurrent
from ppml_fast.privacy.capture import Call, Recorder
from ppml_fast.privacy.clipping import ClippedSums, NonFiniteGradientError
from ppml_fast.privacy.layers import UnsupportedModuleError, functional_forward, refusal, rule_for
from ppml_fast.privacy.ownership import (ParameterWatch, assigned_names, inner_aliases, is_container,
                                         moved_names, owned_parameters, slots, stamps)
from ppml_fast.privacy.per_sample import Captured, make_rules

__all__ = ["GRAD_SAMPLE_MODES", "NonFiniteGradientError", "PrivateModule", "trainable"]



_EAGER_FORWARD: list = []


def _eager_forward():
    """``PrivateModule._private_forward`` under ``torch.compiler.disable`` (made once, when a
    compiled call first reaches a private model: torch._dynamo is loaded by then)."""
    if not _EAGER_FORWARD:
        _EAGER_FORWARD.append(torch.compiler.disable(PrivateModule._private_forward))
    return _EAGER_FORWARD[0]


def _compiled(m: nn.Module) -> bool:
    """Whether ``m`` is torch.compile's module wrapper (``torch._dynamo``'s OptimizedModule),
    told by its class alone (importing torch._dynamo to ask would cost every import ~1 s)."""
    cls = type(m)
    return cls.__name__ == "OptimizedModule" and cls.__module__.startswith("torch._dynamo")

_MARK = "_ppml_fast_private_forward"  # on the forwards a PrivateModule installs: their module


def _installed_for(mod: nn.Module):
    """The module a PrivateModule installed ``mod``'s instance forward for (``mod`` itself, or
    the original of which ``mod`` is a deep copy), or None when it has no such forward."""
    return getattr(getattr(mod.__dict__.get("forward"), "__func__", None), _MARK, None)


def _own_forward(mod: nn.Module):
    """``mod``'s instance forward, unless it is one a PrivateModule installed on another module
    (``mod`` is a deep copy of that one): such a stale forward records nothing and is replaced."""
    owner = _installed_for(mod)
    return None if owner is not None and owner is not mod else mod.__dict__.get("forward")
# grad_sample_mode -> the rules' mode. Opacus's names are accepted: "hooks", "functorch" and "ew"
# (expanded weights) all materialise per-sample gradients, here through the same exact rules;
# "ghost" picks per layer the cheaper of ghost norms and materialised gradients.
GRAD_SAMPLE_MODES = {"ghost": "auto", "materialize": "materialize", "hooks": "materialize",
                     "functorch": "materialize", "ew": "materialize"}
_SEQUENCE_OPS = ("linear", "linear_t", "layer_norm", "rms_norm")


def _linear_or_bias(x: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, w, b) if w is not None else b.expand(*x.shape[:-1], b.shape[0])


def trainable(mod: nn.Module) -> dict[str, nn.Parameter]:
    """``mod``'s own parameters (with those of its ParameterDict / ParameterList children,
    :func:`~ppml_fast.privacy.ownership.owned_parameters`) that require a gradient now (role ->
    parameter)."""
    if not mod._modules:  # no ParameterDict / ParameterList child: its own parameters only
        return {role: p for role, p in mod._parameters.items() if p is not None and p.requires_grad}
    return {role: p for role, p in owned_parameters(mod).items() if p.requires_grad}


# distinct input layouts probed before a warning that arguments change every batch
REPROBE_WARNING = 16
# verdicts kept per model (the oldest dropped first: its layout is probed again if it returns)
VERIFIED_MAX = 1024


class PrivateModule(ClippedSums, nn.Module):
    """Wraps ``module`` for DP training; calling it calls ``module``.

    Args:
        module: the model (changed only by hooks; ``remove_hooks()`` restores it).
        grad_sample_mode: ``"ghost"`` (per layer the cheaper of ghost norms and materialised
            per-sample gradients; never materialised where that would not fit) or
            ``"materialize"`` (per-sample gradients everywhere; the reference path).
        batch_first: whether inputs are (B, ...) (else sequence layers see (T, B, ...)).
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of a batch.
    """

    def __init__(self, module: nn.Module, *, grad_sample_mode: str = "ghost",
                 batch_first: bool = True, loss_reduction: str = "mean") -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {sorted(GRAD_SAMPLE_MODES)}; "
                             f"got {grad_sample_mode!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum'; got {loss_reduction!r}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool; got {type(batch_first).__name__}")
        problems = [r for r in (refusal(n, m) for n, m in module.named_modules()) if r]
        problems += [f"{n or 'the model'} is a torch.compile'd module (compile the private model "
                     "instead: torch.compile(private_model))" for n, m in module.named_modules()
                     if _compiled(m)]
        if problems:
            raise UnsupportedModuleError("; ".join(problems))
        self._module = module
        self.grad_sample_mode = grad_sample_mode
        self.loss_reduction = loss_reduction
        self.rules = make_rules(GRAD_SAMPLE_MODES[grad_sample_mode])
        self.recorder = Recorder(batch_first)
        self._restore: list[tuple[nn.Module, object, object]] = []  # (module, before, ours)
        # input layout -> (why its rows are not records or None, why its outputs that are not
        # per record mix records or None, whether shared embedding indices stay unexpanded,
        # the probed outputs' signature): _verify_records
        self._verified: dict[tuple, tuple] = {}
        self._same_records: Optional[list] = None  # [the batch] inside same_records()
        # embeddings whose shared (leading size 1) indices were expanded per record in this
        # forward (records.verify checks that the model's outputs did not change), and a
        # switch that keeps the indices as they are (a layout where they did change)
        self._broadcasts: list = []
        self._broadcast_off = False
        self._attach(module)
        # after _attach (which may refuse): flags parameters used outside their module's calls
        self.parameter_watch = ParameterWatch(module, lambda: bool(self.recorder.batches))
        if any(p.device.type == "cpu" for p in module.parameters()):
            heap.keep_freed_memory()  # steps stop faulting in the pages the last step freed

    # -- wiring ---------------------------------------------------------------------------------
    def _attach(self, root: nn.Module) -> None:
        for name, mod in root.named_modules():
            if _installed_for(mod) is mod:
                raise ValueError(
                    f"{name or 'the model'} ({type(mod).__name__}) is already wrapped by a "
                    "PrivateModule (make_private called twice on one model?); call remove_hooks() "
                    "on that one first")
        aliases = inner_aliases(root)

        def owned_of(m: nn.Module) -> dict[str, nn.Parameter]:
            skip = aliases.get(id(m), ())
            return {r: p for r, p in owned_parameters(m).items() if id(p) not in skip}

        claimed: set[int] = set()
        for name, mod in root.named_modules():
            if id(mod) in claimed or is_container(mod):  # a container's parameters: its parent's
                continue
            patched = _own_forward(mod) is not None  # a forward the user replaced on the instance
            if isinstance(mod, nn.MultiheadAttention):
                if patched:
                    raise UnsupportedModuleError(
                        f"{name or 'the model'} (MultiheadAttention): its forward was replaced on "
                        "the instance; ppml_fast computes attention's per-sample gradients from "
                        "the stock forward")
                claimed.update(id(m) for m in mod.modules())
                self._override_attention(mod)
                continue
            if recurrent.handles(mod) and not patched:  # nn.LSTM / GRU / RNN: linear-rule calls
                recurrent.install(self, mod)
                continue
            owned = owned_of(mod)
            if not owned:
                continue
            # every layer with parameters, also frozen ones: which of them are trainable is read
            # at each call (a layer unfrozen later is then clipped, not left to the noise alone)
            # patched, or parameters in containers: torch.func runs the user's forward
            in_containers = len(owned) != sum(p is not None for p in mod._parameters.values())
            spec = None if patched or in_containers else rule_for(mod)
            functional = functional_forward(mod) if spec is not None else None
            if functional is not None:
                self._override_rule(mod, self._rule_call(spec), functional,
                                    broadcast=spec[0] == "embedding")
            elif spec is not None:
                self.recorder.attach(mod, self._rule_call(spec))
            else:
                self.recorder.attach(mod, None, owned=owned_of,
                                     label=f"{name or 'the model'} ({type(mod).__name__})")

    def _rule_call(self, spec):
        key, kwargs_of, activation_of = spec
        seq_rank = 2 if key == "embedding" else 3
        sequence = key in _SEQUENCE_OPS or key == "embedding"
        rec = self.recorder

        def make(mod: nn.Module, inputs: tuple, params=None, batch=None) -> Call:
            """The record of a call on ``inputs``; ``params`` (``trainable(mod)``) and ``batch``
            (``rec._current()``) when the caller has just read them."""
            x = inputs[0]
            if activation_of is not None:
                x = activation_of(mod, x)
            seq_first = sequence and not rec.batch_first and x.dim() >= seq_rank
            if seq_first:
                x = x.movedim(1, 0)
            if params is None:
                params = trainable(mod)
            if batch is None:
                batch = rec._current()
            if params and batch is not None and (x.dim() == 0 or x.shape[0] != batch.size):
                batch.refusal = batch.refusal or (
                    f"{self._name(mod)}: its input has {x.shape[0] if x.dim() else 'no'} rows "
                    f"{'(after moving the sequence dimension) ' if seq_first else ''}in a forward "
                    f"of {batch.size} records: per-sample clipping needs one row per record (a "
                    "reshape of (B, T, d) to (B*T, d), or a sequence-first input under "
                    "batch_first=True? pass batch_first=False to make_private for (T, B, ...) "
                    "inputs)")
            cap = Captured(key, x.detach(), params, kwargs_of(mod))
            return Call(mod, params, cap=cap, seq_first=seq_first)

        return make

    def _name(self, mod: nn.Module) -> str:
        """``mod``'s qualified name in the model and its class, for error messages."""
        name = next((n for n, m in self._module.named_modules() if m is mod), None)
        return f"{name or 'the model'} ({type(mod).__name__})" if name is not None else type(mod).__name__

    def _broadcast(self, x: torch.Tensor, batch, mod: nn.Module) -> torch.Tensor:
        """An embedding index tensor shared by the batch (Hugging Face's default position_ids
        (1, T), broadcast over the records) expanded to one row per record: each record's
        per-sample gradient is then the gradient of its own rows, as the broadcast defines it.
        Valid only where the model broadcasts the output over the records: the records probe
        compares the outputs with those of the unexpanded model (review S9: peft's prompt
        tuning repeats a (1, P, d) prompt B times), and refuses the layout if they differ."""
        d = 0 if self.recorder.batch_first or x.dim() < 2 else 1
        if x.dim() > d and x.shape[d] == 1 and batch.size > 1 and not self._broadcast_off:
            shape = list(x.shape)
            shape[d] = batch.size
            self._broadcasts.append(mod)
            return x.expand(shape)
        return x

    def _override_rule(self, mod: nn.Module, make, functional, broadcast: bool = False) -> None:
        """Records ``mod``'s calls by replacing its forward (instead of hooks): while a batch is
        captured, the module's own functional runs on detached trainable parameters, so autograd
        skips their summed gradients (book-keeping computes the clipped sums) without the hooks'
        ``requires_grad`` switching. Outside a captured pass (and for a deep copy of the module,
        or under ``torch.func.functional_call``) the class's forward runs unchanged; inside one,
        a call with other arguments than the one input raises TypeError (skipping it would leave
        the layer to the noise alone). ``remove_hooks()`` restores the module."""
        rec = self.recorder
        input_name = list(inspect.signature(type(mod).forward).parameters)[1]

        def dp_forward(m, *args, **kwargs):
            batch = rec._current()
            if batch is None or m is not mod:  # not captured, or a deep copy (not recorded)
                return type(m).forward(m, *args, **kwargs)
            params = {}  # trainable(m), read at every call: a layer may be frozen or unfrozen
            for r, p in m._parameters.items():
                if p is not None:
                    if not isinstance(p, nn.Parameter):
                        # torch.func.functional_call swapped the parameters in
                        return type(m).forward(m, *args, **kwargs)
                    if p.requires_grad:
                        params[r] = p
            if m._modules:  # with those of its ParameterDict / ParameterList children
                params = trainable(m)
            if len(args) == 1 and not kwargs:
                x = args[0]
            elif not args and list(kwargs) == [input_name]:
                x = kwargs[input_name]
            else:
                raise TypeError(
                    f"{type(m).__name__}.forward takes one argument, {input_name!r}; got "
                    f"{len(args)} positional and keyword {sorted(kwargs)} (ppml_fast records "
                    "the call of the stock forward)")
            if not params:
                return type(m).forward(m, x)  # frozen now: nothing to record
            if broadcast:
                x = self._broadcast(x, batch, m)
            call = make(m, (x,), params, batch)
            out = functional(m, x, {r: p.detach() for r, p in params.items()})
            batch.calls.append(call)
            return rec.tap(out, call, batch)

        self._set_forward(mod, dp_forward)

    def _set_forward(self, mod: nn.Module, fn) -> None:
        """Replaces ``mod``'s forward by ``fn`` (marked as this wrapper's), for remove_hooks()."""
        setattr(fn, _MARK, mod)
        bound = types.MethodType(fn, mod)
        self._restore.append((mod, _own_forward(mod), bound))
        mod.forward = bound

    def _linear(self, owner: nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` recorded as a call of the linear rule (the attention
        projections, :data:`attention.LinearCall`). ``weight`` and ``bias`` are each a parameter,
        an :class:`attention.Part` of one (the packed projections: the call records the part's
        elements in ``Call.spans`` and gives the rule the part's view) or None; weight None is a
        bias-only call whose output is the bias broadcast over ``x.shape[:-1]``."""
        batch = self.recorder._current()
        operands = {r: t for r, t in (("weight", weight), ("bias", bias)) if t is not None}
        full = {r: t.param if isinstance(t, attention.Part) else t for r, t in operands.items()}
        own = {r: p for r, p in full.items() if p.requires_grad}
        if batch is None or not own:
            views = {r: t.view() if isinstance(t, attention.Part) else t for r, t in operands.items()}
            return _linear_or_bias(x, views.get("weight"), views.get("bias"))
        views, spans = {}, {}
        for r, t in operands.items():
            if isinstance(t, attention.Part):
                views[r] = t.view(t.param.detach())
                if r in own:
                    spans[r] = (t.start, t.stop)
            else:
                views[r] = t.detach()
        if x.shape[0] != batch.size:  # attention works batch first (its own batch_first flag)
            batch.refusal = batch.refusal or (
                f"{self._name(owner)}: its batch-first input has {x.shape[0]} rows in a forward of "
                f"{batch.size} records (a sequence-first model under batch_first=True? pass "
                "batch_first=False to make_private for (T, B, ...) inputs)")
        out = _linear_or_bias(x, views.get("weight"), views.get("bias"))
        call = Call(owner, own, cap=Captured("linear", x.detach(), {r: views[r] for r in own}, {}),
                    spans=spans or None)
        batch.calls.append(call)
        return self.recorder.tap(out, call)

    def _override_attention(self, mha: nn.Module) -> None:
        """Replaces ``mha.forward`` by :func:`attention.forward` (every nn.MultiheadAttention call:
        self- and cross-attention, kdim/vdim, bias_k/bias_v, add_zero_attn) with its parameters
        used through :meth:`_linear`; ``remove_hooks()`` restores it."""
        private = self

        def dp_forward(mod, query, key, value, key_padding_mask=None, need_weights=True,
                       attn_mask=None, average_attn_weights=True, is_causal=False):
            if mod is not mha:  # a deep copy of the module: not recorded
                return nn.MultiheadAttention.forward(
                    mod, query, key, value, key_padding_mask, need_weights, attn_mask,
                    average_attn_weights, is_causal)
            return attention.forward(mod, private._linear, query, key, value, key_padding_mask,
                                     need_weights, attn_mask, average_attn_weights, is_causal)

        self._set_forward(mha, dp_forward)

    def __deepcopy__(self, memo: dict) -> "PrivateModule":
        """A new PrivateModule, with the same settings, around a deep copy of the model (the
        copy's layers would otherwise keep forwards and hooks that record into this one's
        recorder); batches captured but not yet clipped are not copied."""
        inner = copy.deepcopy(self._module, memo)
        new = PrivateModule(inner, grad_sample_mode=self.grad_sample_mode,
                            batch_first=self.recorder.batch_first, loss_reduction=self.loss_reduction)
        memo[id(self)] = new
        return new

    def remove_hooks(self) -> nn.Module:
        """Detaches everything; returns the original module, as it was."""
        self.recorder.detach()
        self.parameter_watch.remove()
        for mod, before, ours in self._restore:
            if mod.__dict__.get("forward") is not ours:
                continue  # replaced since (by the user): left as it is
            if before is None:
                del mod.forward
            else:
                mod.forward = before
        self._restore.clear()
        return self._module

    # -- use ------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self._module

    def forward(self, *args, **kwargs):
        # torch.compile(private_model): the private forward and everything it calls (the
        # capture's hooks, the records probe, the parameter watch) run eagerly, through
        # torch.compiler.disable; compiled, the probe's backward reached the watch's hooks with
        # gradients None (TypeError). The rest of a compiled step (the loss) still compiles. The
        # wrapper is made on first use: decorating at import loaded torch._dynamo (+0.8 s).
        if torch.compiler.is_compiling():
            return _eager_forward()(self, *args, **kwargs)
        return self._private_forward(*args, **kwargs)

    def _private_forward(self, *args, **kwargs):
        x = arguments.primary(args, kwargs)
        rec = self.recorder
        if x is None and rec.enabled and torch.is_grad_enabled():
            hidden = arguments.hidden_tensors(args, kwargs)
            if hidden:  # no batch would be captured: the step would release noise alone
                raise UnsupportedModuleError(arguments.hidden_refusal(hidden))
        if x is not None and x.dim() > 0:
            size = x.shape[arguments.record_dim(x, rec.batch_first)]
            why = mixing = probed_outputs = None
            unexpanded = False
            if rec.enabled and torch.is_grad_enabled():
                why, mixing, unexpanded, probed_outputs = self._verify_records(args, kwargs, size)
                same = self._same_records
                if same is not None and same[0] is not None and rec.batches and rec.batches[-1] is same[0]:
                    if size != same[0].size:  # not the same records: refused at the step
                        same[0].refusal = same[0].refusal or (
                            f"forwards of {same[0].size} and {size} records inside one "
                            "same_records() block: they cannot hold the same records")
                else:
                    rec.start_batch(size)
                    if same is not None and rec.batches:
                        same[0] = rec.batches[-1]
            if why and rec.batches:
                rec.batches[-1].refusal = rec.batches[-1].refusal or why
        else:
            why = mixing = probed_outputs = None
            unexpanded = False
        batch = rec._current()
        if batch is None:
            return self._module(*args, **kwargs)
        # buffers and parameters (frozen ones too): a write by the forward is state computed from
        # the batch (writes through .data bypass version counters: the probe compares values).
        # One walk before the call (slots: every module's buffer and parameter slots and the
        # tensors in them), one after; nothing cached, so nothing goes stale
        root, watch = self._module, self.parameter_watch
        bound = slots(root)
        self._refuse_compiled(bound.modules)  # assigned since: refused before the call
        if bound.stock:  # hooks the parameters trainable now, in place of the root's pre-hook
            found = (bound.buffers, bound.parameters)
            watch.refresh(found[1], for_call=True)
        else:  # a class overrides named_buffers() / named_parameters() / ...
            found = ([b for _, b in root.named_buffers()], [p for _, p in root.named_parameters()])
        versions = (stamps(found[0]), stamps(found[1]))
        rec.inside += 1  # calls captured now are this forward's (Recorder.check_inside)
        self._broadcast_off = unexpanded
        try:
            out = self._module(*args, **kwargs)
        finally:
            rec.inside -= 1
            watch.primed = False
            self._broadcast_off = False
        moved = moved_names(root, found, versions)
        now = slots(root)
        # parameters made trainable during the call (in the forward, or in a __call__ override
        # that runs before the root's pre-hook): hooked now, their use in backward is watched.
        # now.parameters is what model_tensors(root) lists at this point (the same walk, just
        # made), i.e. what refresh() would walk again
        watch.refresh(now.parameters if now.stock else None)
        moved += assigned_names(root, bound, now)
        if moved:  # state computed from the batch would leave the step without noise
            batch.refusal = batch.refusal or (
                f"buffer(s) or parameter(s) {moved[:5]} of the model were updated during a private "
                "forward: a buffer or parameter changed by the batch (its data, or even its size) "
                "is released with the model without noise (as BatchNorm's running statistics "
                "would be); keep them constant while training privately, or update them outside "
                "the private forward")
        if probed_outputs is not None and not why:
            # outputs the probe did not check per record: the step is refused if the loss uses
            # one (an aggregate mixing records, or an output not per record at this batch size)

            def refuse(reason: str, batch=batch) -> None:
                batch.refusal = batch.refusal or reason
            records.tap_outputs(out, batch.size, rec.batch_first, probed_outputs, mixing, refuse)
        return out

    @contextlib.contextmanager
    def same_records(self):
        """Forwards of the model inside this block hold the same records, row for row (two
        views of one batch, a consistency loss, a model run twice): their gradients are one
        record's and clipped together. Without it, two backpropagated forwards before one step
        are refused (they could be two sampled batches)::

            with model.same_records():
                loss = crit(model(view1), y) + crit(model(view2), y)
            loss.backward()
        """
        before, self._same_records = self._same_records, [None]
        try:
            yield self
        finally:
            self._same_records = before

    def _refuse_compiled(self, modules) -> None:
        """Raises UnsupportedModuleError for a torch.compile'd module in ``modules``: its
        compiled backward hands the capture's and the parameter watch's hooks no gradients
        (review S8: a TypeError deep in backward)."""
        compiled = next((m for m in modules if _compiled(m)), None)
        if compiled is not None:
            raise UnsupportedModuleError(
                f"{self._name(compiled)} is a torch.compile'd module: ppml_fast records per-sample "
                "quantities with Python hooks that a compiled graph does not run; compile the "
                "private model instead (torch.compile(private_model): its forward runs eagerly "
                "inside) or pass the module uncompiled to make_private")

    def _verify_records(self, args: tuple, kwargs: dict, size: int) -> tuple:
        """Proves, once per input layout, that every captured call's rows are records
        (:mod:`ppml_fast.privacy.records`); returns (why not, naming the layer, or None; why the
        outputs that are not per record mix records, or None; whether the forward must keep
        shared embedding indices unexpanded; the probed outputs' signature,
        :func:`records.output_signature`). The DP step refuses a batch with a reason (the
        forward itself runs, e.g. for evaluation), or whose loss used such an output."""
        if size == 0:  # no records: nothing to prove (the step releases noise only)
            return None, None, False, None
        key = arguments.layout(args, kwargs, self.recorder.batch_first, self._module.training, size)
        if key in self._verified:
            return self._verified[key]
        # a batch of one record proves nothing about mixing records, only that the forward is a
        # function of its batch (the probe's repeated run): verified on its own key, and the
        # layout is probed again at its first batch of two or more (review S9: physical batches
        # of one were never probed; an EMA in a plain attribute then moved a step by 3.6 C)
        probed = key if size >= 2 else (key, "one record")
        if probed in self._verified:
            return self._verified[probed]
        self._refuse_compiled(self._module.modules())  # before the probe runs the model
        if len(self._verified) == REPROBE_WARNING:
            warnings.warn(
                f"ppml_fast has probed this model for {REPROBE_WARNING} different input layouts "
                "(the records probe runs once per layout: input shapes other than the batch "
                "size, the arguments' structure and non-tensor values). Arguments that change "
                "every batch, such as a Python list of per-record lengths or a step counter, "
                "make every batch a new layout and cost a probe each (tens of forwards): pass "
                "per-record values as tensors", RuntimeWarning, stacklevel=4)
        if len(self._verified) >= VERIFIED_MAX:  # bounded: the oldest layout is probed again
            self._verified.pop(next(iter(self._verified)))
        try:
            mixing, probed_outputs = records.verify(self, args, kwargs, size)
            self._verified[probed] = (None, mixing, False, probed_outputs)
        except records.BroadcastRefusal as e:  # the real forward keeps the shared indices
            self._verified[probed] = (str(e), None, True, None)
        except UnsupportedModuleError as e:
            self._verified[probed] = (str(e), None, False, None)
        return self._verified[probed]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._module.parameters() if p.requires_grad]

    def pending_batches(self) -> int:
        return len(self.recorder.batches)

    def discard(self) -> None:
        """Forgets the batches whose gradients arrived (zero_grad) and parameters flagged as used
        outside their module's calls. A batch forwarded but not yet backpropagated is kept: its
        backward may come after ``zero_grad()`` (``loss = crit(model(x), y);
        optimizer.zero_grad(); loss.backward(); optimizer.step()``, a common loop that Opacus
        supports): forgotten, its per-sample gradients were lost and the step released noise
        alone. A batch already kept by an earlier ``zero_grad()`` and still not backpropagated is
        forgotten (its output was dropped, e.g. an evaluation with grad enabled: the memory of
        kept forwards stays bounded). The step takes (and forgets) every batch."""
        rec = self.recorder
        keep = [b for b in rec.batches if not b.backpropagated and not b.kept]
        for b in keep:
            b.kept = True
        rec.batches = keep
        self.parameter_watch.clear()

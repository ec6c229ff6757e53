"""Records, not rows (DESIGN.md, privacy invariant 1): a proof, per model and input layout, that
every captured call's leading dimension is the batch of records of the forward it belongs to.

Per-sample norms are taken per row of each captured call (its activation and its output
gradient, batch dimension first). That is a norm per *record* only if row j of the call depends
on record j alone, and row j of the call's output feeds record j's output alone. Shapes cannot
prove it: a model that reshapes (B, T, d) to (B*T, d) before a Linear, a sequence-first tensor
under ``batch_first=True`` or an operation that mixes the records of a batch (``x - x.mean(0)``)
all give layers whose rows are not records, and when B = T the shapes even agree.

:func:`verify` runs the user's model on the batch itself, several ways, before the real forward
of a new input layout (same RNG state for each, so dropout draws the same masks; buffers and
gradients restored afterwards). It tests the records in groups: for each bit b of a record's
index, the group S of records whose bit b is 1 and the group of those whose bit b is 0
(2 ceil(log2 B) groups; any two records i != j are told apart by some bit, so some group holds
i and not j: non-adaptive group testing, as in Du and Hwang, Combinatorial Group Testing, ch. 1):

1. backward with a cotangent on the rows of the model's outputs of the records outside S only
   (a fixed random one, run on the inputs of 2.): the output gradient every captured call
   receives must vanish on the rows in S (else a row of that layer feeds another record: e.g.
   ``pos_emb(ids)[0]`` broadcast to every record); as S ranges over the groups, so does its
   complement;
2. forward with the inputs of the records in S perturbed (in every input tensor that holds the
   records, not only the first): every captured call's rows outside S,
   and every input of a call that is not per record (leading size != B), must be unchanged
   (else the layer mixes records);
3. that backward's output-gradient rows outside S must equal those of the unperturbed batch
   under the same cotangent on all records' outputs (a dependence that the
   forward values hide: ``out + eps * sin((h @ w + h.detach().mean()) / eps)`` changes the
   outputs by eps, below any rounding tolerance, and the gradients by O(1)). With 2., each
   record's per-sample gradient (its activation row and its output-gradient row) is then shown
   not to depend on the other records.

Testing only a few records is not enough: a model that swaps records 0 and 1 inside a layer, or
centres the activations of the first half of the batch, passed a probe of records B//2 and B-1
and moved the clipped sum by up to 1.9 C (tests/privacy/sensitivity/test_review_attacks.py).
The groups are perturbed with independent random values, so a dependence of row j on record i
is missed only if the perturbations cancel exactly at row j (probability zero for the
continuous perturbations of floating-point inputs).

Outputs: each differentiable output's record dimension is :func:`record_dim`'s where it has B
entries, else its first dimension of B entries (a classifier's (B, K) logits under
``batch_first=False``); outputs with none (a loss the model computes, a 0-dim auxiliary loss
over the batch) get a fixed cotangent too in the backward of check 3, so a gradient they send
to a row must not move when other records change. Besides the groups, the batch runs a second
time unchanged (same RNG): the layers' inputs and the outputs must repeat, else the forward
depends on state outside its batch (a plain tensor attribute updated from the batch) and a
record would reach the gradients of later batches. Arguments are walked through tuples, lists,
mappings and dataclasses; another object holding tensors, or per-record values in a Python list,
is refused (the probe cannot perturb what it holds): :mod:`ppml_fast.privacy.arguments`.

A call whose rows cannot be tied to records raises :class:`UnsupportedModuleError` naming the
layer, before any gradient exists. A layout is verified once (the input tensors' ranks, dtypes
and non-record sizes, the arguments' structure and non-tensor values, and the training flag); a
batch of one record is probed for the repeat alone, and its layout again at its first batch of
two or more. The cost is 2 ceil(log2 B) + 2 forwards and about as many backwards per probed
batch, twice (synthetic and real batch), once per layout.

What a probe cannot see: a model whose mixing depends on something that differs between the
probed batch and later ones: its batch size (the layout leaves it out), a call counter, a
trigger value in a record that arrives in a later batch (measured: 5.7 C, 1.3 C and 2.0 C).
The model's code is trusted not to behave differently after the probe; the probe catches
models that mix records whatever their batch (``check_sensitivity`` tries crafted records too).
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ppml_fast.privacy.arguments import (check_replaced, hidden_refusal, hidden_tensors, leaves,
                                         record_dim, replace, value_key)
from ppml_fast.privacy.capture import call_tensors
from ppml_fast.privacy.layers import UnsupportedModuleError

_EXACT = {torch.float64: 1e-9, torch.float32: 1e-5}  # relative change that counts as "changed"


def output_record_dim(t: torch.Tensor, batch_first: bool, size: int) -> Optional[int]:
    """The record dimension of a model output: :func:`record_dim`'s where it has ``size``
    entries, else the first dimension that has (a classifier's (B, K) logits under
    ``batch_first=False``, a (K, B) output under ``batch_first=True``: review S9, 1.7-2.3 C when
    such outputs were left out of the checks), else None (not per record: :func:`verify` checks
    it as an aggregate). A dimension of ``size`` entries that is not the records' makes the probe
    refuse (every record reaches every row), never accept."""
    if t.dim() == 0:
        return None
    d = record_dim(t, batch_first)
    if t.shape[d] == size:
        return d
    return next((i for i, n in enumerate(t.shape) if n == size), None)


def groups(size: int) -> list[list[int]]:
    """For each bit b of a record index < ``size``: the records whose bit b is 1, and those whose
    bit b is 0 (every pair of records is separated by some group; see the module docstring)."""
    out = []
    for b in range(max(1, (size - 1).bit_length())):
        ones = [i for i in range(size) if i >> b & 1]
        out += [ones, [i for i in range(size) if not i >> b & 1]]
    return [g for g in out if g]


def _perturbed(x: torch.Tensor, dim: int, ks: list[int], gen: torch.Generator) -> torch.Tensor:
    """``x`` with the records ``ks`` (indices along ``dim``) changed; other records untouched."""
    y = x.detach().clone()
    for k in ks:
        _perturb_row(x, y.select(dim, k), gen)
    return y


def _perturb_row(x: torch.Tensor, row: torch.Tensor, gen: torch.Generator) -> None:
    """Changes ``row`` (one record of a copy of ``x``) in place."""
    if row.dtype == torch.bool:
        row.logical_not_()
    elif row.is_floating_point() or row.is_complex():
        scale = float(row.abs().max()) + 1.0 if row.numel() else 1.0
        row.add_(torch.randn(row.shape, generator=gen).to(row) * scale)
    elif row.numel():  # token ids: values taken from elsewhere in the batch (valid ids)
        pick = torch.randint(0, x.numel(), row.shape, generator=gen)
        row.copy_(x.detach().reshape(-1).cpu()[pick].to(row))


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per leading row: whether ``b`` differs from ``a`` beyond rounding (any shape, B >= 1)."""
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return torch.ones(a.shape[0] if a.dim() else 1, dtype=torch.bool)
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    if not a.is_floating_point():
        return (a != b).reshape(a.shape[0], -1).any(1).cpu()
    diff = (a.double() - b.double()).abs().reshape(a.shape[0], -1)
    scale = max(float(a.double().abs().max()) if a.numel() else 0.0, 1e-30)
    tol = _EXACT.get(a.dtype, 1e-2) * scale
    return (diff > tol).any(1).cpu() if diff.shape[1] else torch.zeros(a.shape[0], dtype=torch.bool)


class _Probe:
    """The calls of one probe forward (into a batch of the recorder of its own)."""

    def __init__(self, private, args, kwargs, size: int, rng, then=None) -> None:
        rec = private.recorder
        saved, rec.batches = rec.batches, []
        try:
            _set_rng(rng)
            rec.start_batch(size)
            rec.inside += 1
            try:
                with torch.enable_grad():
                    self.output = private._module(*args, **kwargs)
            finally:
                rec.inside -= 1
            self.calls = list(rec.batches[0].calls) if rec.batches else []
            if then is not None:  # while the probe's batch is the recorder's (recomputations)
                then(self)
        finally:
            rec.batches = saved


def _get_rng(devices) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for i, s in enumerate(cuda):
        torch.cuda.set_rng_state(s, i)


@contextlib.contextmanager
def _restored(module: nn.Module):
    """Buffers, parameter gradients and RNG states as they were before the probe runs."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    grads = [(p, p.grad) for p in module.parameters()]
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices, enabled=True):
        try:
            yield _get_rng(devices)
        finally:
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)
            for p, g in grads:
                p.grad = g


def verify(private, args: tuple, kwargs: dict, size: int) -> Optional[str]:
    """Raises UnsupportedModuleError when the rows of a captured call of ``private``'s model on
    this input are not its records (see the module docstring). Returns (None, or why the
    model's outputs that are not per record mix the records of a batch (an auxiliary loss over
    the batch, a loss the model computes with a batch-wide token count); each differentiable
    output's record dimension, or None): the caller then refuses a step in which such a mixing
    output, or an output that is not per record as probed, receives a gradient
    (:func:`tap_outputs`), as a model that computes such an output but trains on its per-record
    outputs is private.

    The probes run twice: on a synthetic batch (the floating-point inputs of the batch's records
    replaced by standard normal values) and on the batch itself. Adversarial records can hide a
    mixing of records behind saturation (a record of 1e9 makes ``tanh(h - h.mean(0))`` constant
    for every other record); the synthetic batch cannot, and the real one exercises the paths the
    data takes (padding masks from token ids, say)."""
    bf = private.recorder.batch_first
    hidden = hidden_tensors(args, kwargs, size)
    if hidden:
        raise UnsupportedModuleError(hidden_refusal(hidden))
    names = {id(m): n or "the model" for n, m in private._module.named_modules()}
    gen = torch.Generator().manual_seed(size)
    sets = groups(size)
    cotangent: dict = {}  # one fixed cotangent per output shape, shared by base and perturbed runs

    def with_aggregates(probe, then):  # outputs that are not per record: a second backward
        two = bool(_aggregate_outputs(probe, size, bf))
        then(two)
        probe.agg_grads = (_grads_under(probe, cotangent, size, bf, gen, aggregates=True)
                           if two else None)

    def base_grads(probe):
        with_aggregates(probe, lambda two: setattr(
            probe, "grads", _grads_under(probe, cotangent, size, bf, gen, retain=two)))

    def group_grads(ks):
        rest = [i for i in range(size) if i not in set(ks)]

        def first(probe, two):  # cotangent on the other records only: it must not reach rows ks
            probe.grads = _grads_under(probe, cotangent, size, bf, gen, rest, retain=two)
            if rest:
                _check_reach(probe, rest, size, names)
        return lambda probe: with_aggregates(probe, lambda two: first(probe, two))

    seed = secrets.randbits(63)
    state = _fingerprints(private._module, seed)
    why: Optional[str] = None
    with _restored(private._module) as rng:
        for a, kw in (_synthetic(args, kwargs, size, bf, gen), (args, kwargs)):
            private._broadcasts = []
            try:
                base = _Probe(private, a, kw, size, rng, then=base_grads)
            except Exception as e:
                if private._broadcasts:  # maybe the expanded shared indices (PrivateModule._broadcast)
                    _check_broadcast(private, a, kw, rng, names, error=e)
                raise
            if private._broadcasts:
                _check_broadcast(private, a, kw, rng, names, output=base.output)
            # the same batch again: the forward must be a function of its batch (review S9: an
            # EMA in a plain attribute carried records across physical batches of one, 3.6 C)
            _check_repeat(base, _Probe(private, a, kw, size, rng, then=base_grads), names)
            for ks in sets:
                a2, k2 = _perturbed_inputs(a, kw, size, bf, ks, gen)
                other = _Probe(private, a2, k2, size, rng, then=group_grads(ks))
                _check_rows(base, other, ks, size, bf, names)
                why = why or _aggregate_mixing(base, other, ks, size, names)
        moved = [n for n, f in _fingerprints(private._module, seed).items()
                 if f != state.get(n) and not (f != f and state.get(n) != state.get(n))]  # NaN == NaN
        if moved:
            raise UnsupportedModuleError(
                f"the model's forward wrote to its parameter(s) or buffer(s) {moved[:5]} (also "
                "through .data, which no version counter sees): state computed from the batch is "
                "released with the model without noise; keep them constant during a private "
                "forward")
    return why, output_signature(base.output, size, bf)


def output_signature(output: Any, size: int, batch_first: bool) -> tuple:
    """Per differentiable output (in :func:`leaves` order): its dtype, its record dimension
    (:func:`output_record_dim`, or None) and its sizes with that dimension masked. Equal at a
    real forward and at the probe of its layout: the outputs are what was probed, position by
    position (review S9 round 3: an output present only at some batch sizes shifted an
    aggregate into a per-record output's place: 6.1 C)."""
    out = []
    for t in leaves(output):
        if t.is_floating_point() and t.requires_grad:
            d = output_record_dim(t, batch_first, size)
            out.append((t.dtype, d, tuple(-1 if i == d else n for i, n in enumerate(t.shape))))
    return tuple(out)


def tap_outputs(output: Any, size: int, batch_first: bool, probed: tuple,
                mixing: Optional[str], refuse) -> None:
    """Hooks on the differentiable outputs of a real forward that the layout's probe did not
    check as per record: the aggregates (no record dimension) when the probe found them mixing
    records (``mixing``); every output when the outputs are not those probed (``probed``,
    :func:`output_signature`: another number, order, shape or record dimension at this batch
    size; review S9: an (E,) router-load aggregate probed at B = 6 looked per record at
    B = E = 4, 6.1 C). A non-zero gradient reaching a hooked output calls ``refuse(why)``."""
    outs = [t for t in leaves(output) if t.is_floating_point() and t.requires_grad]
    same = output_signature(output, size, batch_first) == probed
    if same and not mixing:
        return
    for i, t in enumerate(outs):
        if same:
            if probed[i][1] is not None:
                continue  # per record, as probed
            why = mixing
        else:
            why = (f"the model's outputs at this batch of {size} records are not those its input "
                   f"layout was probed with (their number, order, shapes or record dimensions "
                   f"differ; output {i} has shape {tuple(t.shape)}): their gradients cannot be "
                   "tied to records")

        def hook(g, why=why):
            if g is not None and bool((g != 0).any()):
                refuse(why)
        t.register_hook(hook)


def _aggregate_mixing(base: _Probe, other: _Probe, ks: list[int], size: int, names) -> Optional[str]:
    """Why, when the gradients that the outputs that are not per record send to the captured
    calls' rows outside ``ks`` moved when ``ks`` changed (compared under the full cotangent)."""
    for cb, gb, go in zip(base.calls, getattr(base, "agg_grads", None) or [],
                          getattr(other, "agg_grads", None) or []):
        for a, b in zip(gb, go):
            if a.dim() and a.shape[0] == size:
                rows = _changed(a, b)
                rows[ks] = False
                if bool(rows.any()):
                    return (f"an output of the model that is not per record (a loss or auxiliary "
                            f"loss computed over the batch) sends {_label(cb, names)} gradients "
                            f"whose row(s) {rows.nonzero().flatten().tolist()[:5]} change when only "
                            f"{_show(ks)} changed: it mixes the records of a batch. Train on "
                            "per-record outputs only (a mean of per-record losses), not on that "
                            "output")
    return None


class BroadcastRefusal(UnsupportedModuleError):
    """An embedding on indices shared by the records whose output the model does not broadcast
    over them: the real forward then runs with the indices as they are (the step is refused)."""


def _check_broadcast(private, args, kwargs, rng, names, output=None, error=None) -> None:
    """Raises :class:`BroadcastRefusal` when the model, run without the capture (the shared
    indices as they are), gives other outputs than ``output`` or succeeds where the captured run
    raised ``error``; returns quietly otherwise (``error`` is then the model's own)."""
    rec = private.recorder
    saved, rec.batches = rec.batches, []
    try:
        _set_rng(rng)
        with torch.no_grad():
            ref = private._module(*args, **kwargs)
    except Exception:
        if error is not None:
            return  # fails either way: the model's own error, raised by the caller
        raise
    finally:
        rec.batches = saved
    if error is None:
        a, b = leaves(ref), leaves(output)
        if len(a) == len(b) and all(x.shape == y.shape and not bool(
                _changed(x.reshape(1, -1), y.reshape(1, -1)).any()) for x, y in zip(a, b)):
            return
    layers = sorted({f"{names.get(id(m), '?')} ({type(m).__name__})" for m in private._broadcasts})
    what = f"raised {type(error).__name__}: {error}" if error is not None else "gave other outputs"
    raise BroadcastRefusal(
        f"{', '.join(layers[:3])}: called on indices shared by all records of the batch (leading "
        "size 1), and the model does not broadcast that output over the records (it "
        f"{what} when ppml_fast expanded the indices to one row per record, which per-record "
        "gradients need; e.g. peft's prompt tuning repeats a shared prompt B times): an output "
        "that every record shares has no per-record gradients. Give the layer one row of "
        "indices per record (ids.expand(batch_size, -1)), or freeze it")


def _fingerprints(module: nn.Module, seed: int) -> dict:
    """name -> a random projection of each parameter and buffer (float64 dot product with
    standard normals from a fresh generator, 2^22 elements at a time): equal before and after
    the probes unless the forward wrote to it (a write the model cannot tune to keep the
    projection: ``seed`` is drawn from OS entropy after the model was built)."""
    out = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        flat = t.detach().reshape(-1)
        if not (flat.is_floating_point() or flat.is_complex()):
            out[name] = hash(flat.cpu().numpy().tobytes()) if flat.numel() <= 2**16 else None
            continue
        g = torch.Generator(device=flat.device).manual_seed(seed)
        acc = torch.zeros((), dtype=torch.float64, device=flat.device)
        for chunk in flat.split(2**22):
            r = torch.randn(chunk.shape, generator=g, device=flat.device, dtype=torch.float32)
            acc += (chunk.real if chunk.is_complex() else chunk).double().mul(r.double()).sum()
        out[name] = float(acc)
    return out


def _differentiable(probe) -> list[torch.Tensor]:
    return [t for t in leaves(probe.output) if t.is_floating_point() and t.requires_grad]


def _per_record_outputs(probe, size: int, bf: bool) -> list[torch.Tensor]:
    return [t for t in _differentiable(probe) if output_record_dim(t, bf, size) is not None]


def _aggregate_outputs(probe, size: int, bf: bool) -> list[torch.Tensor]:
    """Differentiable outputs with no dimension of the batch's size: a loss the model computes
    itself, an auxiliary loss over the batch (an MoE load-balancing loss: 1.7 C when the probe
    left such outputs out, review S9)."""
    return [t for t in _differentiable(probe) if output_record_dim(t, bf, size) is None]


def _grads_under(probe, cotangent: dict, size: int, bf: bool, gen: torch.Generator,
                 keep: Optional[list[int]] = None, aggregates: bool = False,
                 retain: bool = False) -> list:
    """Every captured call's output gradient (per call: its tensors, detached) for one fixed
    random cotangent on all of the model's per-record outputs (only on the rows of the records
    ``keep``, when given), and with ``aggregates`` on its other differentiable outputs too.
    Compared between the base run and a run with some records perturbed (:func:`_check_rows`):
    a row outside the perturbed group must get the same gradient, else the layer's per-sample
    gradient of another record depends on them, also where the forward values do not show it
    (``out + eps * sin((h @ w + h.detach().mean()) / eps)`` changes the outputs by eps but the
    gradients by O(1): 2.1 C in float64, 3.5 C in float32 before this check), or through an
    output computed from the whole batch (a 0-dim auxiliary loss)."""
    outs = _per_record_outputs(probe, size, bf)
    if aggregates:
        outs = outs + _aggregate_outputs(probe, size, bf)
    if not outs:
        return []
    cots = []
    for i, t in enumerate(outs):
        key = (i, tuple(t.shape), t.dtype)
        if key not in cotangent:
            cotangent[key] = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)
        c = cotangent[key]
        d = output_record_dim(t, bf, size)
        if keep is not None and d is not None:  # zero outside the records ``keep``
            mask = torch.zeros(size, dtype=torch.bool)
            mask[keep] = True
            shape = [1] * t.dim()
            shape[d] = size
            c = c * mask.reshape(shape).to(c.device)
        cots.append(c)
    for call in probe.calls:
        call.grad = None
    torch.autograd.backward(outs, cots, retain_graph=retain)
    return [[g.detach().clone() for g in leaves(call.grad) if g is not None] for call in probe.calls]


def _perturbed_inputs(args: tuple, kwargs: dict, size: int, bf: bool, ks: list[int],
                      gen: torch.Generator):
    """``args``/``kwargs`` with the records ``ks`` changed in every input tensor that has the
    batch's records in its record dimension, not only the first: a model given ``(w, x)`` that
    mixed the records of ``x`` in a way autograd does not show (through a detached mean) passed
    a probe that perturbed ``w`` alone and moved the clipped sum by 2.8 C. (An input whose record
    dimension has B entries by coincidence, not records, is perturbed too: the probe may then
    refuse a model that is private; it never accepts one by it.)"""
    swaps = {}
    for t in leaves(list(args) + list(kwargs.values())):
        if t.dim() and t.shape[record_dim(t, bf)] == size and id(t) not in swaps:
            swaps[id(t)] = (t, _perturbed(t, record_dim(t, bf), ks, gen))
    for t, new in swaps.values():
        args, kwargs = replace(args, kwargs, t, new)
    check_replaced(args, kwargs, swaps)
    return args, kwargs


def _synthetic(args: tuple, kwargs: dict, size: int, bf: bool, gen: torch.Generator):
    """``args``/``kwargs`` with every floating-point tensor that has the records in its record
    dimension replaced by standard normal values (same shape, dtype and device)."""
    swaps = {}
    for t in leaves(list(args) + list(kwargs.values())):
        if t.is_floating_point() and t.dim() and t.shape[record_dim(t, bf)] == size and id(t) not in swaps:
            swaps[id(t)] = (t, torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t))
    for t, new in swaps.values():
        args, kwargs = replace(args, kwargs, t, new)
    check_replaced(args, kwargs, swaps)
    return args, kwargs


def _label(call, names) -> str:
    return f"{names.get(id(call.module), '?')} ({type(call.module).__name__})"


def _check_reach(probe: _Probe, ks: list[int], size: int, names) -> None:
    """After a backward with a cotangent on the outputs of records ``ks`` only: every captured
    call's output gradient must vanish outside rows ``ks`` (check 1 of the module docstring)."""
    k = _show(ks)
    for call in probe.calls:
        for g in leaves(call.grad):
            if g is None or g.dim() == 0:
                continue
            if g.shape[0] != size:
                raise _refuse(call, names, "its output is not per record (leading size "
                              f"{g.shape[0]}, batch of {size} records) and reaches the output of {k}")
            if g.numel() == 0:  # nothing per record (an empty sequence): reaches no output
                continue
            rows = (g.detach().reshape(size, -1).abs().amax(1) > 0).cpu()
            rows[ks] = False
            if bool(rows.any()):
                raise _refuse(call, names, f"row(s) {rows.nonzero().flatten().tolist()[:5]} of its "
                              f"output reach the output of {k}: its rows are not records")


def _show(ks: list[int]) -> str:
    """``ks`` for a message: 'record 3', or 'records [0, 2, 4, ...]' (the group perturbed)."""
    return f"record {ks[0]}" if len(ks) == 1 else f"records {ks[:6]}{' ...' if len(ks) > 6 else ''}"


def _plain_inputs(call) -> list:
    """The non-tensor inputs of a torch.func-path call (floats, flags): compared between probe
    runs like its tensors (review S9 round 3: a float computed from the batch, 2.0 C)."""
    if call.cap is not None:
        return []
    if call.plain is not None:  # taken when the call ran (capture.plain_values)
        return call.plain
    return [value_key(v) for v in pytree.tree_leaves((call.inputs or (), call.kwargs or {}))
            if not isinstance(v, torch.Tensor)]


def _check_rows(base: _Probe, other: _Probe, ks: list[int], size: int, bf: bool, names) -> None:
    k = _show(ks)
    if [id(c.module) for c in base.calls] != [id(c.module) for c in other.calls]:
        raise UnsupportedModuleError(
            "the model's layers ran differently when one record of the batch changed (data-"
            "dependent control flow across records): ppml_fast cannot tie the rows of its layers "
            "to records")
    for cb, co in zip(base.calls, other.calls):
        if _plain_inputs(cb) != _plain_inputs(co):
            raise _refuse(cb, names, f"a non-tensor input changed when only {k} changed (a value "
                          "computed from the batch)")
    for cb, co in zip(base.calls, other.calls):
        for a, b in zip(call_tensors(cb), call_tensors(co)):
            if a.dim() and a.shape[0] == size:
                rows = _changed(a, b)
                rows[ks] = False
                if bool(rows.any()):
                    raise _refuse(cb, names, f"row(s) {rows.nonzero().flatten().tolist()[:5]} of its "
                                  f"input changed when only {k} changed")
            elif bool(_changed(a.reshape(1, -1), b.reshape(1, -1)).any()):
                raise _refuse(cb, names, f"an input that is not per record (shape "
                              f"{tuple(a.shape)}, batch of {size}) changed when {k} changed")
    for cb, gb, go in zip(base.calls, getattr(base, "grads", []), getattr(other, "grads", [])):
        for a, b in zip(gb, go):
            if a.dim() and a.shape[0] == size:
                rows = _changed(a, b)
                rows[ks] = False
                if bool(rows.any()):
                    raise _refuse(cb, names, f"the output gradient of its row(s) "
                                  f"{rows.nonzero().flatten().tolist()[:5]} changed when only {k} "
                                  "changed (a dependence on other records that the forward values "
                                  "do not show)")
    for a, b in zip(leaves(base.output), leaves(other.output)):
        d = output_record_dim(a, bf, size)
        if a.shape != b.shape:
            raise UnsupportedModuleError(
                f"the model's output of shape {tuple(a.shape)} became {tuple(b.shape)} when only "
                f"{k} of the batch changed: ppml_fast cannot tie its rows to records")
        if d is not None:
            rows = _changed(a.movedim(d, 0), b.movedim(d, 0))
            rows[ks] = False
            if bool(rows.any()):
                raise UnsupportedModuleError(
                    f"the model's output rows {rows.nonzero().flatten().tolist()[:5]} changed when "
                    f"only {k} of the batch changed: the model mixes the records of a batch "
                    "(per-sample gradients do not exist)")


def _check_repeat(first: _Probe, again: _Probe, names) -> None:
    """The same batch run twice with the same RNG state must give the same layers, captured
    inputs, outputs and, under the same cotangent, captured output gradients: else the forward
    (or the backward: state one forward leaves for the next backward, review S9, 2.8 C with
    physical batches of one) depends on something other than its batch, such as state kept in
    a plain attribute and updated from earlier batches (which no buffer check sees), and a
    record reaches the gradients of the records of later forwards."""
    why = ("the model's forward gave {} for the same batch run twice (state kept between "
           "forwards outside its buffers, e.g. a tensor attribute updated from the batch, or "
           "randomness not drawn from torch's generators): a record would reach the gradients "
           "of later batches' records. Register such state as a buffer and keep it constant "
           "during private forwards")
    if [id(c.module) for c in first.calls] != [id(c.module) for c in again.calls]:
        raise UnsupportedModuleError(why.format("different layers"))
    for c1, c2 in zip(first.calls, again.calls):
        if _plain_inputs(c1) != _plain_inputs(c2):
            raise _refuse(c1, names, why.format("different non-tensor inputs of this layer"))
        t1, t2 = call_tensors(c1), call_tensors(c2)
        if len(t1) != len(t2) or any(
                a.shape != b.shape or bool(_changed(a.reshape(1, -1), b.reshape(1, -1)).any())
                for a, b in zip(t1, t2)):
            raise _refuse(c1, names, why.format("different inputs of this layer"))
    o1, o2 = leaves(first.output), leaves(again.output)
    if len(o1) != len(o2) or any(a.shape != b.shape or bool(_changed(a.reshape(1, -1),
                                                                      b.reshape(1, -1)).any())
                                 for a, b in zip(o1, o2)):
        raise UnsupportedModuleError(why.format("different outputs"))
    for kind in ("grads", "agg_grads"):
        for c1, g1, g2 in zip(first.calls, getattr(first, kind, None) or [],
                              getattr(again, kind, None) or []):
            if len(g1) != len(g2) or any(a.shape != b.shape or bool(
                    _changed(a.reshape(1, -1), b.reshape(1, -1)).any()) for a, b in zip(g1, g2)):
                raise _refuse(c1, names, why.format("different output gradients of this layer"))


def _refuse(call, names, why: str) -> UnsupportedModuleError:
    if call.cap is None:  # the torch.func path: per-record inputs are the ones of leading size B
        why += (" (a layer without a per-sample rule, rerun by torch.func, needs its per-record "
                "inputs and outputs batch first, also under batch_first=False)")
    return UnsupportedModuleError(
        f"{_label(call, names)}: {why}. Per-sample clipping needs every row of a layer's input "
        "to belong to one record: a reshape of (B, T, d) to (B*T, d), a sequence-first input "
        "under batch_first=True (pass batch_first=False to make_private, or build the layers "
        "with batch_first=True) or an operation that mixes the records of a batch make rows "
        "that are not records")

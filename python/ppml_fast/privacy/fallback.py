"""Per-sample gradients of any module's own parameters by torch.func, from the inputs and the
output gradients the recorder captured: for record i, the vector-Jacobian product of the module
applied to record i alone with the gradients of record i's outputs. Exact for every module whose
records do not interact (BatchNorm is refused before it gets here); it reruns the module's
forward, so it is the slow path, used only where no rule applies.

Inputs and outputs are pytrees (``torch.utils._pytree``): positional and keyword arguments,
tuples, lists, dicts, ``None`` (an LSTMCell's first ``hx``). Which input leaves are per-record
is decided by shape, and that is ambiguous: a tensor leaf whose dim 0 equals the batch size B of
the forward pass is taken as per-record (record i gets its row i), any other leaf is shared (each
record gets all of it). A shared tensor that happens to have B rows, or a per-record tensor whose
batch dimension is not dim 0 (``batch_first=False``), would be split wrongly; so each rerun's
outputs are compared with the outputs the forward pass produced, and a mismatch is refused
(:class:`~ppml_fast.privacy.layers.UnsupportedModuleError`, naming the module) instead of giving
a wrong gradient. The same check refuses modules whose records interact.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from ppml_fast.privacy.cells import cell_forward
from ppml_fast.privacy.layers import UnsupportedModuleError

# leaves an output may hold besides tensors (anything else may hide tensors the hooks cannot see)
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
          torch.Size, torch.memory_format, torch.layout)


@dataclass
class Rerun:
    """What the torch.func path needs to rerun one call of a module: its inputs (detached), the
    floating-point outputs the recorder tapped (detached; compared with the rerun's) and the
    batch size B of the forward pass (which input leaves are per-record)."""

    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]  # the tapped output leaves, in tree_flatten order
    batch_size: int
    label: str = ""  # the module's qualified name and class, for error messages


def detach_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, tree)


def output_leaves(label: str, output: Any) -> tuple[list, Any]:
    """(leaves, spec) of a module's output; raises UnsupportedModuleError when a leaf is an
    object of an unregistered type (a container the recorder cannot look into: the tensors in it
    would get no gradient record, so the module's parameters would train on noise alone)."""
    leaves, spec = pytree.tree_flatten(output)
    odd = [type(a).__name__ for a in leaves if not isinstance(a, (torch.Tensor,) + _PLAIN)]
    odd += [f"complex tensor ({a.dtype})" for a in leaves
            if isinstance(a, torch.Tensor) and a.is_complex()]
    if odd:
        raise UnsupportedModuleError(
            f"{label}: its output holds a {odd[0]} object, whose gradient ppml_fast cannot "
            "record (it would be missed); return real tensors in tuples, lists, dicts or "
            "dataclasses registered with torch.utils._pytree.register_pytree_node")
    return leaves, spec


def tappable(a: Any) -> bool:
    """Whether an output leaf is one whose gradient the recorder captures."""
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def per_sample_grads(module: nn.Module, params: dict[str, nn.Parameter], rerun: Rerun,
                     grads_out: list[Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """name -> (B, *param.shape) for the module's own parameters ``params`` (dotted name, as
    ``functional_call`` takes it -> parameter), from the gradients of the tapped outputs
    (``None``: the output got no gradient, i.e. zeros)."""
    label = rerun.label or type(module).__name__
    b = rerun.batch_size
    names = list(params)
    values = tuple(p.detach() for p in params.values())
    live = []  # (index of a tapped output, its gradient): the outputs that got a gradient
    for k, (out, g) in enumerate(zip(rerun.outputs, grads_out)):
        if g is None:
            continue
        if out.dim() == 0 or out.shape[0] != b:
            if bool((g != 0).any()):
                raise UnsupportedModuleError(
                    f"{label}: output {k} has shape {tuple(out.shape)}, not one row per record of "
                    f"the batch of {b}, and its gradient is not zero: its per-record gradients "
                    "are not defined")
            continue
        live.append((k, g))
    leaves, spec = pytree.tree_flatten((rerun.args, rerun.kwargs))
    per_record = [i for i, a in enumerate(leaves)
                  if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == b]
    checked = [k for k, out in enumerate(rerun.outputs) if out.dim() > 0 and out.shape[0] == b]

    cell = cell_forward(module)
    frozen = {r: p.detach() for r, p in module._parameters.items() if p is not None}

    def loss(vals, rows, gs):
        full = list(leaves)
        for i, r in zip(per_record, rows):
            full[i] = r.unsqueeze(0)
        outs = _rerun_outputs(label, module, cell, frozen, names, vals, full, spec,
                              len(rerun.outputs), "on one record")
        total = sum(((outs[k] * g.unsqueeze(0)).sum() for (k, _), g in zip(live, gs)),
                    start=torch.zeros((), dtype=values[0].dtype if values else torch.float32))
        return total, [outs[k] for k in checked]

    rows = [leaves[i] for i in per_record]
    gs = [g for _, g in live]
    try:
        grads, outs = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0))(values, rows, gs)
    except UnsupportedModuleError:
        raise
    except Exception as e:  # e.g. a shape error: an input split into records wrongly
        hint = (" (random operations such as dropout cannot be replayed record by record: move "
                "them into a module without parameters, e.g. nn.Dropout, called outside it)"
                if "random" in str(e) else "")
        raise UnsupportedModuleError(
            f"{label}: rerun record by record (the torch.func path; input leaves with {b} rows "
            f"taken as per-record, the others as shared), it failed: {type(e).__name__}: {e}"
            f"{hint}") from e
    for k, got in zip(checked, outs):
        _check_same(label, k, got, rerun.outputs[k])
    if live and names:
        _check_sum(label, module, cell, frozen, names, values, leaves, spec, rerun, live,
                   dict(zip(names, grads)))
    return dict(zip(names, grads))


def _rerun_outputs(label: str, module: nn.Module, cell, frozen: dict, names: list, vals,
                   full: list, spec: Any, expected: int, where: str) -> list:
    """The floating-point outputs of ``module`` run on the flattened inputs ``full`` with
    ``vals`` for its parameters ``names`` (through the recurrent cells' own forward where vmap
    cannot run their kernels); refused unless there are as many as in the forward."""
    args, kwargs = pytree.tree_unflatten(full, spec)
    if cell is not None:
        out = cell(module, {**frozen, **dict(zip(names, vals))}, *args, **kwargs)
    else:
        out = functional_call(module, dict(zip(names, vals)), args, kwargs, strict=False)
    outs = [a for a in pytree.tree_flatten(out)[0] if tappable(a)]
    if len(outs) != expected:
        raise UnsupportedModuleError(
            f"{label}: rerun {where}, it returned {len(outs)} floating-point tensors, in the "
            f"forward {expected}; its records are not independent")
    return outs


def _check_sum(label: str, module: nn.Module, cell, frozen: dict, names: list, values: tuple,
               leaves: list, spec: Any, rerun: Rerun, live: list, grads: dict) -> None:
    """Raises unless the per-record gradients ``grads`` (B, ...) are the rows of the batch's own
    gradient: for random weights r (drawn here, never seen by the model), sum_i r_i grads[i] must
    equal the gradient of sum_i r_i <g_i, out_i> of ONE rerun of the module on the whole batch
    (every input as it was, nothing split). :func:`_check_same` compares forward values only,
    which a dependence the forward hides passes (review S9: a constant table with B rows by
    coincidence, split row by row, entering the gradient through ``m - m.detach()`` with
    m = w * table.mean(): record i got table[i] instead of the table, 1.55 C): whatever leaf was
    split wrongly, or a dependence between records that only the gradient shows, makes some
    record's gradient differ from its row of the batch's, and a random combination of nonzero
    differences is nonzero with probability one. One forward and backward of the module on the
    batch (the torch.func path already reruns it B times)."""
    b = rerun.batch_size
    dtype = values[0].dtype
    gen = torch.Generator().manual_seed(secrets.randbits(63))
    r = torch.randn(b, generator=gen, dtype=torch.float64)
    rows = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == b]
    with torch.no_grad():  # records whose values are not finite are the non-finite check's (raise
        # or drop): left out (weight 0), their rows of every B-row input replaced by a finite
        # record's (0 * NaN would spread through the batch's gradient)
        bad = torch.zeros(b, dtype=torch.bool)
        for t in [grads[n] for n in names] + [g for _, g in live] + [leaves[i] for i in rows]:
            if t.is_floating_point() or t.is_complex():
                bad |= ~torch.isfinite(t).reshape(b, -1).all(1).cpu()
        full = list(leaves)
        if bool(bad.any()):
            good = (~bad).nonzero().flatten()
            if not len(good):
                return  # every record is the non-finite check's: nothing of this call is released
            src = torch.where(bad, good[0], torch.arange(b))
            for i in rows:
                full[i] = leaves[i].index_select(0, src.to(leaves[i].device))
            r = r.masked_fill(bad, 0.0)
            live = [(k, g.index_select(0, src.to(g.device)).masked_fill(
                bad.to(g.device).reshape((b,) + (1,) * (g.dim() - 1)), 0)) for k, g in live]
            grads = {n: grads[n].index_select(0, src.to(grads[n].device)) for n in names}
    try:
        with torch.enable_grad():
            vals = [v.detach().requires_grad_(True) for v in values]
            outs = _rerun_outputs(label, module, cell, frozen, names, vals, full, spec,
                                  len(rerun.outputs), "on the whole batch")
            total = torch.zeros((), dtype=dtype, device=vals[0].device)
            for k, g in live:
                w = r.to(device=g.device, dtype=g.dtype).reshape((b,) + (1,) * (g.dim() - 1))
                total = total + (outs[k] * (g * w)).sum()
            want = torch.autograd.grad(total, vals, allow_unused=True)
    except UnsupportedModuleError:
        raise
    except Exception as e:
        raise UnsupportedModuleError(
            f"{label}: rerun on the whole batch (the torch.func path's check of its per-record "
            f"gradients), it failed: {type(e).__name__}: {e}") from e
    for name, v, w in zip(names, values, want):
        per = grads[name].detach()
        rr = r.to(device=per.device, dtype=per.dtype)
        got = torch.tensordot(rr, per, dims=1)
        w = torch.zeros_like(got) if w is None else w.detach().to(got.dtype)
        size = per.abs().reshape(b, -1).amax(1) if per.numel() else per.new_zeros(b)
        scale = 1.0 + float((size * rr.abs()).sum()) + (float(w.abs().max()) if w.numel() else 0.0)
        tol = math.sqrt(torch.finfo(got.dtype).eps) * scale
        if not bool(((got - w).abs() <= tol).all()):
            raise UnsupportedModuleError(
                f"{label}: rerun record by record (the torch.func path), its per-record gradients "
                f"of {name} are not the rows of the batch's gradient: an input leaf with {b} rows "
                "was taken as per-record although its rows are not the records' (a constant, "
                "buffer or table that has as many rows as the batch: record i got its row i, not "
                "the whole tensor), or its records interact in the gradient only; per-sample "
                "gradients of this module are not defined as it is called (pass such a tensor "
                "with a size other than the batch's, e.g. unsqueezed, or as the module's own "
                "buffer)")


def _check_same(label: str, k: int, got: torch.Tensor, want: torch.Tensor) -> None:
    """Raises unless the per-record reruns (B, 1, ...) reproduce the batch's output ``want``
    (B, ...) to within rounding (sqrt(eps) of its dtype, relative to its largest finite element;
    non-finite elements must be the same: they are the non-finite check's to handle)."""
    if got.shape[1:2] == (1,):
        got = got.squeeze(1)
    ok = got.shape == want.shape
    if ok:
        # in the outputs' dtype, not float64 copies (and no boolean indexing, whose int64
        # indices were 6x a 3-D output): these temporaries were the DP step's peak memory on
        # ViT (issue 16). Rounding of |got - want| (<= eps |.|) is far below tol (sqrt(eps)).
        got = got.to(want.dtype)
        finite = torch.isfinite(want)
        largest = want.abs().masked_fill_(~finite, 0).amax() if want.numel() else want.new_zeros(())
        scale = 1.0 + float(largest)
        tol = math.sqrt(torch.finfo(want.dtype).eps) * scale
        close = (got - want).abs_() <= tol
        same = torch.where(finite, close, (got == want) | (got.isnan() & want.isnan()))
        ok = bool(same.all())
    if not ok:
        raise UnsupportedModuleError(
            f"{label}: rerun record by record (the torch.func path), it does not reproduce its "
            f"output {k} of the batch: its records interact, or an input's rows were taken as "
            "per-record (dim 0 equal to the batch size) or as shared (any other dim 0) wrongly; "
            "per-record gradients of this module are not defined as it is called")

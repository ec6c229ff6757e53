"""Per-sample norms and clipped sums of one recurrent layer's input and hidden weights (and
biases) from one captured call: op key ``"recurrent"`` (:class:`RecurrentRule`), registered on a
private model by :mod:`ppml_fast.privacy.recurrent`.

What. One direction of one layer of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` records one call whose
activation is ``a = [x | h_prev]`` (B, T, d + Hh) and whose output gradient ``g`` (B, T, n)
holds the gates' pre-activation gradients (:mod:`ppml_fast.privacy.recurrent_layer`). Each role
is a column block of both (:class:`Block`), and record i's gradient of it is a sum of outer
products over its steps (backpropagation through time; McMahan et al. 2018, arXiv 1710.06963,
Sec. 3)::

    weight:  G_i = sum_t g_{i,t}[g0:g1] a_{i,t}[a0:a1]^T,    bias:  b_i = sum_t g_{i,t}[g0:g1]

(rows rolled by ``roll``: the GRU's input block holds the gates as [n, r, z]). The LSTM and the
RNN share one ``g`` block for both weights (so ``db_ih = db_hh``: one sum, one norm).

Paths, per call (the linear rule's, :mod:`ppml_fast.privacy.per_sample.linear`, per block):

- ghost (Li et al. 2021): ``||G_i||^2 = sum_{s,t} (a_s.a_t)(g_s.g_t)`` from Gram matrices, one
  per distinct block (the LSTM's ``g`` Gram serves both weights), with the rounding bound and
  flagged records of :mod:`~ppml_fast.privacy.per_sample.bounds` (:func:`linear.norms_from_grams`
  on the roles' Gram matrices stacked as rows when their widths agree: one call for both
  weights; flagged records materialised in float64, left out of the book-keeping matmul, their
  clipped gradients added on their own). Clipped sums by book-keeping (Bu et al. 2023): per
  ``g`` block one matmul ``g^T (a f)`` over the T B rows, both weights of an LSTM at once.
- materialise: per ``g`` block one ``bmm`` over the union of its weights' columns (the LSTM's
  ``[dW_ih | dW_hh]`` in one), the roles' norms from column views, one matvec for the sums.

``auto`` (:func:`choose_path`): ghost unless the Gram work exceeds ``KAPPA`` times the per-sample
matmul's and the kept gradients fit :data:`~ppml_fast.privacy.per_sample.MATERIALIZE_MAX_ELEMENTS`
(``KAPPA = 1``: set, not fitted beyond the benchmark's shape). At the benchmark's shape (B=16
T=32 d=H=64, one thread, in the DP step, interleaved) the two paths cost about the same (the
materialised one ~3% faster on the GRU model), but the materialised one keeps ``B n (d + H)``
numbers per layer (3-4 MiB there, in the step's reused workspace, or fresh pages that faulted
without it: the GRU model's step peak was 1.96x the non-private step's against 1.02x ghost),
hence ghost there. Every operand is a strided view of the layer's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps
from ppml_fast.privacy.per_sample import bounds, workspace
from ppml_fast.privacy.per_sample import linear as _lin

OP = "recurrent"

# Ghost iff T * (sum of the distinct blocks' widths) <= KAPPA * sum over weights of p * d, i.e.
# the Gram work B T^2 (...) against the per-sample matmul's B T p d (see choose_path).
KAPPA = 1.0


@dataclass(frozen=True)
class Block:
    """A role's columns: ``g[..., g0:g1]`` and, for a weight, ``a[..., a0:a1]``; its per-sample
    rows rolled by ``roll`` (``torch.roll(., -roll, 0)``) into the parameter's order."""

    g0: int
    g1: int
    a0: int = 0
    a1: int = 0
    roll: int = 0


@dataclass
class _Plan:
    """The roles of a call, sorted out once per (roles, blocks)."""

    weights: dict  # role -> Block
    biases: dict  # role -> Block
    by_g: dict  # (g0, g1) -> [weight roles]
    stacks: list  # [[weight roles]] whose (d, p) agree: one norms_from_grams call each


def choose_path(seq: int, weights: dict, batch: int = 1) -> str:
    """"ghost" or "materialize" for a call of ``batch`` records of ``seq`` steps."""
    if seq <= 1:
        return "ghost"
    gram = sum({(b.g0, b.g1): b.g1 - b.g0 for b in weights.values()}.values()) + sum(
        {(b.a0, b.a1): b.a1 - b.a0 for b in weights.values()}.values())
    outer = sum((b.g1 - b.g0) * (b.a1 - b.a0) for b in weights.values())
    if batch * outer > _ps.MATERIALIZE_MAX_ELEMENTS:
        return "ghost"
    return "ghost" if seq * gram <= KAPPA * outer else "materialize"


def _views(cap: _ps.Captured, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(a, g) as (B, T, .) in the accumulation dtype (views where no conversion is needed)."""
    a = cap.activation
    if a.dim() != 3 or grad.dim() != 3 or grad.shape[:2] != a.shape[:2]:
        raise ValueError(f"{OP}: activation (B, T, d) and grad_out (B, T, n) expected; got "
                         f"{tuple(a.shape)} and {tuple(grad.shape)}")
    dt = _ps.acc_dtype(a, grad)
    return (a if a.dtype == dt else a.to(dt)), (grad if grad.dtype == dt else grad.to(dt))


def _rolled(t: Tensor, roll: int) -> Tensor:
    return torch.roll(t, -roll, 0) if roll else t


class RecurrentRule:
    """Rule of :mod:`ppml_fast.privacy.per_sample` for ``"recurrent"`` calls; kwargs:
    ``blocks`` (role -> :class:`Block`, every role the layer has)."""

    def __init__(self, mode: str = "auto") -> None:
        self.mode = _ps.check_mode(mode)
        self._plans: dict = {}

    def _plan(self, cap: _ps.Captured) -> _Plan:
        blocks = cap.kwargs["blocks"]
        key = (tuple(cap.params), tuple(sorted(blocks.items())))
        plan = self._plans.get(key)
        if plan is None:
            ws = {r: blocks[r] for r in cap.params if r.startswith("weight")}
            by_g: dict = {}
            stacks: dict = {}
            for r, b in ws.items():
                by_g.setdefault((b.g0, b.g1), []).append(r)
                stacks.setdefault((b.a1 - b.a0, b.g1 - b.g0), []).append(r)
            plan = _Plan(ws, {r: blocks[r] for r in cap.params if not r.startswith("weight")},
                         by_g, list(stacks.values()))
            self._plans[key] = plan
        return plan

    # -- norms --------------------------------------------------------------------------------
    def norms_sq(self, cap: _ps.Captured, grad_out: Tensor, *, mode: Optional[str] = None):
        mode = self.mode if mode is None else _ps.check_mode(mode)
        _ps.check_batch(cap, grad_out)
        a, g = _views(cap, grad_out)
        plan = self._plan(cap)
        norms: dict[str, Tensor] = {}
        state: dict = {"bias": {}, "kept": {}, "flagged": {}}
        for role, b in plan.biases.items():  # per-sample sums of g, one per g block
            key = (b.g0, b.g1)
            if key not in state["bias"]:
                s = g[..., b.g0:b.g1].sum(1)
                state["bias"][key] = (s, torch.linalg.vector_norm(s, dim=1).square())
            norms[role] = state["bias"][key][1]
        if plan.weights:
            path = mode if mode != "auto" else choose_path(a.shape[1], plan.weights, a.shape[0])
            (self._ghost if path == "ghost" else self._materialise)(a, g, plan, norms, state)
        return norms, state

    @staticmethod
    def _materialise(a, g, plan: _Plan, norms, state) -> None:
        for key, roles in plan.by_g.items():
            w = plan.weights
            a0, a1 = min(w[r].a0 for r in roles), max(w[r].a1 for r in roles)
            gb = g[..., key[0]:key[1]]
            # (B, p, a1 - a0) in the step's reused memory (per_sample.workspace: no page faults)
            outer = workspace.empty((gb.shape[0], gb.shape[-1], a1 - a0), like=a)
            torch.bmm(gb.transpose(1, 2), a[..., a0:a1], out=outer)
            state["kept"][key] = (outer, a0)
            for r in roles:
                # row norms over the contiguous last dimension, then their norm: the strided
                # (1, 2) reduction was 4x slower (0.30 vs 0.08 ms at 16 x 256 x 64)
                rows = torch.linalg.vector_norm(outer[..., w[r].a0 - a0:w[r].a1 - a0], dim=2)
                norms[r] = torch.linalg.vector_norm(rows, dim=1).square()

    @staticmethod
    def _ghost(a, g, plan: _Plan, norms, state) -> None:
        """Gram matrices of each distinct block (bounds.gram_dtype, IEEE precision), written
        into one (L B, T, T) buffer per stack of roles of equal widths; the norms, bounds and
        flags of a stack by one :func:`linear.norms_from_grams` (rows are records either way);
        flagged records materialised in float64 as :func:`linear.ghost_weight_norms` does."""
        batch, seq = a.shape[0], a.shape[1]
        done: dict = {}  # (block, dtype) -> a Gram slice already formed

        def gram(v: Tensor, key, dt, out: Tensor) -> None:
            if (key, dt) in done:
                out.copy_(done[(key, dt)])
                return
            v = v if v.dtype == dt else v.to(dt)
            torch.bmm(v, v.transpose(1, 2), out=out)
            done[(key, dt)] = out

        for roles in plan.stacks:
            b0 = plan.weights[roles[0]]
            d, p = b0.a1 - b0.a0, b0.g1 - b0.g0
            dt = bounds.gram_dtype(a.dtype, seq, (d, p))
            xx = a.new_empty((len(roles) * batch, seq, seq), dtype=dt)
            gg = torch.empty_like(xx)
            with bounds.full_precision():
                for j, r in enumerate(roles):
                    b, rows = plan.weights[r], slice(j * batch, (j + 1) * batch)
                    gram(a[..., b.a0:b.a1], ("a", b.a0, b.a1), dt, xx[rows])
                    gram(g[..., b.g0:b.g1], ("g", b.g0, b.g1), dt, gg[rows])
            n, flags, _ = _lin.norms_from_grams(xx, gg, d, p, a.dtype)
            any_flag = bool(flags.any())
            for j, r in enumerate(roles):
                nr = n[j * batch:(j + 1) * batch]
                if any_flag and bool(flags[j * batch:(j + 1) * batch].any()):
                    b = plan.weights[r]
                    rows = flags[j * batch:(j + 1) * batch].nonzero().flatten()
                    grads = _lin.materialise_flagged(a[..., b.a0:b.a1], g[..., b.g0:b.g1], rows)
                    nr = nr.clone()
                    nr[rows] = bounds.exact_sq_norms(grads, a.dtype)
                    state["flagged"][r] = (rows, grads)  # (k, p, d) float64, g's row order
                norms[r] = nr

    # -- clipped sums -------------------------------------------------------------------------
    def clipped_sum(self, cap: _ps.Captured, grad_out: Tensor, factors: Tensor, state) -> dict:
        _ps.check_batch(cap, grad_out, factors)
        plan = self._plan(cap)
        st = state if isinstance(state, dict) else {"bias": {}, "kept": {}, "flagged": {}}
        a, g = _views(cap, grad_out)
        f = factors if factors.dtype == a.dtype else factors.to(a.dtype)
        out: dict[str, Tensor] = {}
        sums: dict = {}
        for role, b in plan.biases.items():
            key = (b.g0, b.g1)
            if key in sums:  # the LSTM's two biases: equal sums, distinct tensors
                out[role] = _rolled(sums[key].clone(), b.roll)
                continue
            s = st["bias"][key][0] if key in st["bias"] else g[..., b.g0:b.g1].sum(1)
            sums[key] = f @ s
            out[role] = _rolled(sums[key], b.roll)
        if plan.weights and st["kept"]:  # materialised: one matvec per g block
            for key, roles in plan.by_g.items():
                outer, a0 = st["kept"][key]
                total = (f @ outer.flatten(1)).view(outer.shape[1:])  # (p, a1 - a0)
                for r in roles:
                    b = plan.weights[r]
                    out[r] = _rolled(total[:, b.a0 - a0:b.a1 - a0], b.roll)
        elif plan.weights:
            self._book_keeping(a, g, f, plan, st["flagged"], out)
        return {r: t.to(_ps.sum_dtype(cap.params[r])) for r, t in out.items()}

    @staticmethod
    def _book_keeping(a, g, f, plan: _Plan, flagged, out) -> None:
        """``sum_i f_i G_i`` by one matmul per g block, ``g^T (a f)`` over the T B rows (the
        factors folded into the block's activation columns: the narrower operand here), the
        block's roles together unless one has flagged records: those get factors exactly 0 here
        and their materialised gradients added (bounds module docstring)."""
        at, gt = a.transpose(0, 1), g.transpose(0, 1)  # (T, B, .): the buffers' own layout
        rows_n = at.shape[0] * at.shape[1]
        w = plan.weights
        for key, roles in plan.by_g.items():
            xg = gt[..., key[0]:key[1]].reshape(rows_n, key[1] - key[0])
            groups = [roles] if not any(r in flagged for r in roles) else [[r] for r in roles]
            for rs in groups:
                a0, a1 = min(w[r].a0 for r in rs), max(w[r].a1 for r in rs)
                extra, fr = None, f
                if rs[0] in flagged:
                    rows, grads = flagged[rs[0]]
                    extra = f[rows].to(grads.dtype) @ grads.view(grads.shape[0], -1)
                    fr = bounds.split_factors(f, rows)
                # folded per block (not once for all columns): the GRU's step peak is here
                cols = (at[..., a0:a1] * fr[:, None]).reshape(rows_n, a1 - a0)
                with bounds.full_precision():
                    total = torch.mm(xg.t(), cols)
                del cols
                for r in rs:
                    t = total[:, w[r].a0 - a0:w[r].a1 - a0]
                    if extra is not None:
                        t = t + extra.view(t.shape).to(t.dtype)
                    out[r] = _rolled(t, w[r].roll)

    # -- reference ----------------------------------------------------------------------------
    def per_sample(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out)
        a, g = _views(cap, grad_out)
        out = {}
        for role in cap.params:
            b = cap.kwargs["blocks"][role]
            gb = g[..., b.g0:b.g1]
            t = torch.bmm(gb.transpose(1, 2), a[..., b.a0:b.a1]) if role.startswith("weight") else gb.sum(1)
            out[role] = (torch.roll(t, -b.roll, 1) if b.roll else t).to(cap.params[role].dtype)
        return out

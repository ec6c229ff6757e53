"""Per-sample norms and clipped sums for ``F.linear`` on ``(B, d)`` and ``(B, T..., d)`` inputs.

Sample i's weight gradient is ``G_i = sum_t g_{i,t} x_{i,t}^T`` (p x d), its bias gradient
``sum_t g_{i,t}``. The same rule, built with ``transposed=True`` (op key ``"linear_t"``), covers
``x @ W + b`` with ``W`` of shape (d, p): Hugging Face transformers' ``Conv1D`` (GPT-2's c_attn,
c_proj, c_fc); its gradient is ``G_i^T``, so the norms are the same and only the kept per-sample
gradients and the book-keeping sum are formed the other way round (``x^T g``, no transpose copy).
Two ways to ``||G_i||^2``:

- ghost (Li et al. 2021): ``sum_{t,s} (g_t.g_s)(x_t.x_s)``, two T x T Gram matrices per sample,
  ``B T^2 (d + p)`` multiply-adds, nothing kept; the clipped sum is then book-keeping (Bu et al.
  2023): one ``(p, B T) @ (B T, d)`` matmul with the factors folded into the smaller operand, the
  cost of the non-private weight gradient. For T = 1 the norm is ``||g_i||^2 ||x_i||^2``.
  The Gram norm is an upper bound with a rigorous rounding bound, and records it cannot vouch
  for (cancelling terms) are materialised on their own: :func:`ghost_weight_norms`, :mod:`bounds`.
  The bound costs ~10-30% of the ghost path (row norms from the Gram diagonals, a float64 sum;
  float64 Gram matrices for long sequences of wide layers), measured in the issue-14 report.
- materialise: one batched matmul ``G = g^T x`` (``B T d p``), its row norms, and at clip time
  ``factors @ G`` (two passes over the ``B d p`` kept numbers).

Cost model ("mixed ghost clipping", Bu et al. 2023): both paths do ``B T d p`` once (book-keeping
matmul or per-sample matmul), so ghost pays ``T^2 (d + p)`` extra per sample, materialise the
slower batched matmul plus the passes over ``d p``. Fitted: **ghost iff T (d + p) < KAPPA d p**,
``KAPPA = 0.35`` (i.e. the Gram work is below 0.35x the per-sample matmul work), and always ghost
while the kept gradients ``B d p`` would exceed ``MATERIALIZE_MAX_ELEMENTS``. Measured on the 2-core
dev box (torch 2.13 CPU, one thread, thread CPU time so that other processes do not count, min of 6
calls; norms_sq + clipped_sum, ghost vs materialise, ms):

    B=32 T=64 d=128 p=128   2.01 vs 1.33  -> materialise (model: materialise)
    B=32 T=64 d=128 p=384   5.22 vs 4.22  -> materialise (model: materialise)
    B=32 T=32 d=128 p=384   2.10 vs 2.27  -> ghost       (model: ghost)
    B=32 T=64 d=128 p=10000 200  vs 212   -> ghost       (model: ghost, kept grads 41M > cap)
    B=32 T=16 d=p=256       1.20 vs 1.99  -> ghost;  T=64: 5.84 vs 4.92 -> materialise
    B=8  d=p=1024 T=128     41   vs 66    -> ghost;  T=256: 87 vs 75   -> materialise
    B=4  d=768 p=3072 T=128 35   vs 56    -> ghost;  T=512: 201 vs 139 -> materialise

Over 36 shapes (d, p from 64 to 3072, T from 8 to 512) the model picked the faster path in all
but two near-ties (within 10%). The native weight gradient of the same call (what autograd would
do) was 0.84, 2.64 and 75 ms for the first, second and fourth rows. Wall-clock spot checks with
two threads on a quiet box agreed (e.g. T=64 d=128 p=384: materialise 1.9-2.0 ms vs ghost 2.6 ms).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps
from ppml_fast.privacy.per_sample import bounds, workspace

# Ghost iff T (d + p) < KAPPA d p (see the module docstring for the fit).
KAPPA = 0.35

# State key of the records whose ghost norm the error bound could not vouch for:
# (record indices (k,), their materialised weight gradients (k, p, d) in float64).
FLAGGED = "weight:flagged"

# State key of each record's error bound b (float64 (B,)) of a weight norm N'^2 + b returned by a
# ghost path: |N'^2 - N^2| <= b (per_sample.tied combines two uses of a tied weight with it).
BOUND = "weight:bound"


def ghost_weight_norms(x: Tensor, g: Tensor, with_bound: bool = False):
    """Upper bounds of the squared weight-gradient norms of ``x`` (B, T, d), ``g`` (B, T, p), and
    the flagged records ``(rows, materialised gradients)`` or None; with ``with_bound``, also each
    record's error bound ``b`` (float64 (B,), ``|N'^2 - N^2| <= b`` for the returned norm's
    ``N'^2 + b``; for a flagged record, whose norm is that of its float64 gradient rounded up,
    ``2 gamma_{n+1}(2^-53)`` times it).

    Ghost norm ``sum_{s,t} (x_s.x_t)(g_s.g_t)`` from two Gram matrices (IEEE precision; in float64
    where float32's bound would flag honest records, :func:`bounds.gram_dtype`), products summed
    in float64, plus its rounding bound ``coef * S^2`` (:mod:`bounds`, Higham Lemma 3.1);
    records with ``bound > TAU * N'^2`` are materialised in float64 (``G_i = g_i^T x_i``, only
    those) and get the norm of that gradient, which is what ``clipped_sum`` then adds for them."""
    xx, gg = ghost_grams(x, g)
    norms, flags, bound = norms_from_grams(xx, gg, x.shape[-1], g.shape[-1], x.dtype)
    flagged = None
    if bool(flags.any()):
        rows = flags.nonzero().flatten()
        grads = materialise_flagged(x, g, rows)
        norms[rows] = bounds.exact_sq_norms(grads, x.dtype)
        flagged = (rows, grads)
        if with_bound:
            bound = bound.clone()
            n = grads[0].numel()
            bound[rows] = norms[rows].double() * (2 * bounds.gamma(n + 1, bounds.U64))
    return (norms, flagged, bound) if with_bound else (norms, flagged)


def ghost_grams(
    x: Tensor, g: Tensor, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """The Gram matrices ``x x^T`` and ``g g^T`` (B, T, T) of :func:`ghost_weight_norms`, in
    :func:`bounds.gram_dtype` and IEEE precision; written into ``out`` when given (slices of a
    group's buffers, :mod:`grouped`)."""
    seq, d, p = x.shape[1], x.shape[-1], g.shape[-1]
    if bounds.gram_dtype(x.dtype, seq, (d, p)) != x.dtype:  # long sequences: float64 Gram
        x, g = x.double(), g.double()
    with bounds.full_precision():
        if out is None:
            return torch.bmm(x, x.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
        torch.bmm(x, x.transpose(1, 2), out=out[0])
        torch.bmm(g, g.transpose(1, 2), out=out[1])
    return out


def norms_from_grams(
    xx: Tensor, gg: Tensor, d: int, p: int, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(upper bounds of the squared norms rounded to ``out_dtype``, flags) of records whose Gram
    matrices ``xx``, ``gg`` (B, T, T) came from :func:`ghost_grams` of inputs of widths ``d`` and
    ``p`` in ``out_dtype`` (any number of records: a group's stacked records are rows too), and
    each record's error bound (float64)."""
    seq = xx.shape[-1]
    u = bounds.unit_roundoff(xx.dtype)
    # Each Gram row's T products summed by one vecdot (no (B, T, T) temporary), the T row sums
    # in float64: gamma_T(u) + gamma_T(2^-53) in the bound, not gamma_{T^2}(u).
    computed = torch.linalg.vecdot(xx, gg, dim=-1).double().sum(1)
    s = (bounds.diag_norms(xx) * bounds.diag_norms(gg)).sum(1)
    scale = bounds.gram_coef(d, p, seq, seq, u) * bounds.norm_slack((d, p), u, seq) ** 2
    u_book = bounds.book_roundoff(out_dtype)
    bound = s.square() * scale
    norms, flags = bounds.upper_and_flags(computed, bound, out_dtype,
                                          s=s * bounds.norm_slack((d, p), u, seq), u_book=u_book)
    return norms, flags, bound


def materialise_flagged(x: Tensor, g: Tensor, rows: Tensor) -> Tensor:
    """The weight gradients (k, p, d) of the flagged records ``rows`` of ``x``, ``g``, in float64
    (also for float32 inputs: a materialised float32 gradient of such a record still rounds its
    +-M terms against the others, ``||G' - G|| <= gamma_T S``, Higham 3.5)."""
    return torch.bmm(g[rows].double().transpose(1, 2), x[rows].double())


def book_keeping(x: Tensor, g: Tensor, f: Tensor, gf: Tensor | None, transposed: bool) -> Tensor:
    """``sum_n f_n g_n x_n^T`` from rows ``x`` (N, d), ``g`` (N, p) and factors ``f`` (N,), in
    the weight's layout ((p, d), or (d, p) when ``transposed``): one matmul, the factors folded
    into ``g`` (``gf = g * f[:, None]`` when given) or else into ``x``; IEEE precision
    (:func:`bounds.book_roundoff`)."""
    with bounds.full_precision():
        if transposed:  # (d, N) @ (N, p): the weight's layout
            return x.t() @ gf if gf is not None else (x * f[:, None]).t() @ g
        return gf.t() @ x if gf is not None else g.t() @ (x * f[:, None])


def choose_path(batch: int, seq: int, d: int, p: int) -> str:
    """"ghost" or "materialize" for a linear call with ``seq`` positions per sample."""
    if seq <= 1:
        return "ghost"
    if batch * d * p > _ps.MATERIALIZE_MAX_ELEMENTS:
        return "ghost"
    return "ghost" if seq * (d + p) < KAPPA * d * p else "materialize"


def _views(cap: _ps.Captured, grad_out: Tensor) -> tuple[Tensor, Tensor, int]:
    """(x, g, T): (B, d) and (B, p) for 2-D inputs (T = 1), else (B, T, d) and (B, T, p)."""
    x = cap.activation
    if x.dim() < 2:
        raise ValueError(
            f"linear: activation must be (B, ..., in_features); got shape {tuple(x.shape)}"
        )
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"linear: grad_out must be {tuple(x.shape[:-1]) + ('out_features',)}; "
            f"got {tuple(grad_out.shape)}"
        )
    dt = _ps.acc_dtype(x, grad_out)
    if x.dtype != dt:
        x = x.to(dt)
    if grad_out.dtype != dt:
        grad_out = grad_out.to(dt)
    if x.dim() == 2:
        return x, grad_out, 1
    batch, d, p = x.shape[0], x.shape[-1], grad_out.shape[-1]
    seq = math.prod(x.shape[1:-1])
    return x.reshape(batch, seq, d), grad_out.reshape(batch, seq, p), seq


def _flat(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample views as (B, d), (B, p) when T = 1 (a (B, 1, d) sequence included)."""
    if x.dim() == 3:
        return x[:, 0], g[:, 0]
    return x, g


class LinearRule:
    """``F.linear(input, weight (p, d), bias (p,))``; with ``transposed=True``
    ``input @ weight (d, p) + bias (p,)`` (transformers' ``Conv1D``). kwargs: none used."""

    def __init__(self, mode: str = "auto", transposed: bool = False) -> None:
        self.mode = _ps.check_mode(mode)
        self.transposed = bool(transposed)

    def _outer(self, x: Tensor, g: Tensor) -> Tensor:
        """Per-sample weight gradients in the weight's layout from (B, T, d), (B, T, p):
        ``g^T x`` (B, p, d), or ``x^T g`` (B, d, p) when transposed."""
        if self.transposed:
            out = workspace.empty((x.shape[0], x.shape[-1], g.shape[-1]), like=x)
            return torch.bmm(x.transpose(1, 2), g, out=out)
        out = workspace.empty((x.shape[0], g.shape[-1], x.shape[-1]), like=x)
        return torch.bmm(g.transpose(1, 2), x, out=out)

    def norms_sq(
        self, cap: _ps.Captured, grad_out: Tensor, *, mode: str | None = None
    ) -> tuple[dict[str, Tensor], object]:
        mode = self.mode if mode is None else _ps.check_mode(mode)
        _ps.check_batch(cap, grad_out)
        x, g, seq = _views(cap, grad_out)
        params = cap.params
        norms: dict[str, Tensor] = {}
        state: dict[str, Tensor] = {}
        if seq == 1 and mode != "materialize":
            # ||g_i x_i^T||^2 = ||g_i||^2 ||x_i||^2; the bias gradient is g_i itself.
            x2, g2 = _flat(x, g)
            gn = torch.linalg.vector_norm(g2, dim=1)
            if "weight" in params:
                norms["weight"] = (gn * torch.linalg.vector_norm(x2, dim=1)).square()
            if "bias" in params:
                norms["bias"] = gn.square()
            return norms, state
        if x.dim() == 2:
            x, g = x[:, None], g[:, None]
        if "bias" in params:
            state["bias"] = torch.sum(g, 1, out=workspace.empty((g.shape[0], g.shape[-1]), like=g))
            norms["bias"] = _ps.sq_norms(state["bias"], x.dtype)
        if "weight" in params:
            path = mode
            if mode == "auto":
                path = choose_path(x.shape[0], seq, x.shape[-1], g.shape[-1])
            if path == "ghost":
                norms["weight"], flagged, state[BOUND] = ghost_weight_norms(x, g, with_bound=True)
                if flagged is not None:
                    if self.transposed:  # (k, p, d) -> the weight's (k, d, p)
                        flagged = (flagged[0], flagged[1].transpose(1, 2))
                    state[FLAGGED] = flagged
            else:
                state["weight"] = self._outer(x, g)
                norms["weight"] = _ps.sq_norms(state["weight"], x.dtype)
        return norms, state

    def clipped_sum(
        self, cap: _ps.Captured, grad_out: Tensor, factors: Tensor, state: object
    ) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out, factors)
        params = cap.params
        kept = state if isinstance(state, dict) else {}
        out = _ps.clipped_from({r: kept[r] for r in params if r in kept}, factors, params)
        if len(out) == len(params):
            return out
        x, g, seq = _views(cap, grad_out)
        f = factors if factors.dtype == x.dtype else factors.to(x.dtype)
        flagged = kept.get(FLAGGED)
        if flagged is not None and "weight" in params and "weight" not in out:
            # Flagged records: factor exactly 0 in the book-keeping matmul, their clipped
            # materialised gradients added on their own (bounds module docstring).
            rows, grads = flagged
            w = params["weight"]
            extra = _ps.weighted_sum(grads, f[rows], w)
            f = bounds.split_factors(f, rows)
            if "bias" in params and "bias" not in out:  # never here after norms_sq (kept)
                b = g.sum(1) if g.dim() == 3 else g
                out["bias"] = _ps.weighted_sum(b, factors.to(x.dtype), params["bias"])
        if seq == 1:
            x, g = _flat(x, g)
        else:
            x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
            f = f.repeat_interleave(seq)
        # Book-keeping: the factors folded into the smaller operand, then one (p, N) @ (N, d).
        d, p = x.shape[-1], g.shape[-1]
        # (independent of the roles asked for: per-layer clipping's one-role calls must give
        # the whole call's sums bit for bit)
        gf = g * f[:, None] if p <= d else None
        if "weight" in params and "weight" not in out:
            w = params["weight"]
            out["weight"] = book_keeping(x, g, f, gf, self.transposed).to(_ps.sum_dtype(w))
            if flagged is not None:
                out["weight"] = out["weight"] + extra
        if "bias" in params and "bias" not in out:
            if gf is not None:
                total = gf.sum(0)
            else:
                with bounds.full_precision():  # a matvec: IEEE, no TF32 (bounds.book_roundoff)
                    total = f @ g
            out["bias"] = total.to(_ps.sum_dtype(params["bias"]))
        return out

    def per_sample(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out)
        x, g, seq = _views(cap, grad_out)
        if seq == 1:
            x, g = _flat(x, g)
            x, g = x[:, None], g[:, None]
        out: dict[str, Tensor] = {}
        if "weight" in cap.params:
            out["weight"] = self._outer(x, g).to(cap.params["weight"].dtype)
        if "bias" in cap.params:
            out["bias"] = g.sum(1).to(cap.params["bias"].dtype)
        return out

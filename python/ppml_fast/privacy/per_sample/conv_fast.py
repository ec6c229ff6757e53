"""Weight paths of :class:`~ppml_fast.privacy.per_sample.conv.ConvRule` on the channels-last,
tap-cropped columns of :mod:`conv_taps` (issue 16: ResNet-18-GN's convolutions), for
``groups == 1``; :data:`FAST` switches them off (the rule's original paths, which the tests and the
A/B timings compare against).

With ``U_i`` the (L, d) unfolded input of record i (:func:`conv_taps.unfold`: rows ordered
``(*kernel, C_in)``, kernel cropped to the taps that read the input, ``d = prod(kernel') C_in``)
and ``g_i`` the (p, L) output gradient, the convolution is a linear layer over L positions
(Li et al. 2021, arXiv 2110.05679, Sec. 4; Bu et al. 2023, arXiv 2210.00038, Sec. 3):

- ghost: ``||G_i||^2 = sum_{s,t} (u_s.u_t)(g_s.g_t)`` from the Gram matrices ``U_i U_i^T`` and
  ``g_i^T g_i`` with the rounding bound of :mod:`bounds` (same formula and flags as the rule's
  own ghost path, with the cropped d), and the clipped sum by book-keeping as **one matmul**
  ``(p, B L) @ (B L, d)`` with the factors folded into ``g`` (Bu et al. 2023, Sec. 3.2), in IEEE
  precision (:func:`bounds.full_precision`), flagged records at factor 0 and added from their
  float64 gradients (:mod:`bounds`);
- materialise: ``G_i = g_i U_i`` by one batched matmul, norms the sums of squares of exactly
  those numbers, and the clipped sum ``factors @ G`` (Bu et al. 2023, "mixed ghost clipping").

Both give the weight gradient in the columns' order; :func:`conv_taps.to_weight` maps a sum (or
the kept per-sample gradients, state ``"weight"``) to the weight's layout, with exact zeros in
the cropped taps (their true gradient is a sum of products with the padding: exactly 0).

Cost model: see :func:`choose_path` (fitted on the dev box; measurements in its docstring).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps
from ppml_fast.privacy.per_sample import bounds, conv_book, conv_taps, workspace

# Module switch: False sends every call to ConvRule's original paths.
FAST = True

# State keys of this module's paths: the Plan of the call (ghost and materialise), and the kept
# per-sample gradients in the columns' order (materialise; "weight" holds the same numbers in
# the weight's layout, a view when no tap was cropped).
PLAN = "weight:plan"
KEPT = "weight:columns"
FLAGGED = "weight:flagged"  # as conv.FLAGGED: (rows (k,), float64 gradients (k, *weight shape))

# Cost model (choose_path): ghost iff GRAM64 L (d + p) < (KAPPA + d p / KAPPA_MEMORY_SCALE) d p,
# GRAM64 = GRAM64_WEIGHT where the Gram matrices go float64 (bounds.gram_dtype), else 1.
KAPPA = 0.1
KAPPA_MEMORY_SCALE = 1e6
GRAM64_WEIGHT = 3.0


def plan_for(geo, x: Tensor, g: Tensor):
    """The :class:`conv_taps.Plan` of a call this module computes, else None (``FAST`` off,
    ``groups > 1``)."""
    if not FAST or geo.groups != 1:
        return None
    n = geo.n
    if x.dim() != n + 2 or g.dim() != n + 2:
        return None
    p = conv_taps.plan(tuple(x.shape[2:]), tuple(g.shape[2:]), tuple(geo.kernel),
                       tuple(geo.stride), tuple(geo.dilation), tuple(tuple(v) for v in geo.pads))
    expect = tuple((s + lo + hi - dil * (k - 1) - 1) // st + 1 for s, (lo, hi), k, st, dil in zip(
        x.shape[2:], geo.pads, geo.kernel, geo.stride, geo.dilation))
    if expect != tuple(g.shape[2:]):
        raise ValueError(f"conv{n}d: grad_out's spatial shape {tuple(g.shape[2:])} is not the "
                         f"convolution's output shape {expect}")
    return p


def choose_path(batch: int, positions: int, d: int, p: int, dtype=torch.float32) -> str:
    """"ghost" or "materialize" for these paths: ghost iff ``w L (d + p) < (KAPPA + d p /
    KAPPA_MEMORY_SCALE) d p`` -- the Gram matrices' ``2 B L^2 (d + p)`` flops (``w = 3`` where they
    go float64, :func:`bounds.gram_dtype`: ~3x the float32 time) against the materialised
    gradients' ``B p d`` numbers written and read twice, which fall out of cache as ``d p`` grows;
    both paths share the ``2 B L d p`` flops of one weight gradient -- and ghost for one position
    or while the kept gradients would exceed ``MATERIALIZE_MAX_ELEMENTS``.

    Sweep (B = 32, C -> C 3x3 padding 1 on s x s maps, s = 2..16, C = 16..256, plus ResNet-18's
    strided and 1x1 shapes; norms + clipped sum, one thread, thread CPU time): the model picked the
    faster path on all 35 shapes in one run; in another the two C = 64 shapes nearest the
    boundary (s = 2 and 4) went the other way by 14% and 6% (0.71 vs 0.62, 1.04 vs 0.97 ms). The
    same form without the float64 weight (``conv.choose_path``'s) lost 58% at C = 256, s = 8
    (ghost 65-87 vs materialise 41-42 ms: its Gram matrices go float64)."""
    if positions <= 1 or batch * d * p > _ps.MATERIALIZE_MAX_ELEMENTS:
        return "ghost"
    w = GRAM64_WEIGHT if bounds.gram_dtype(dtype, positions, (d, p)) == torch.float64 else 1.0
    kappa = KAPPA + d * p / KAPPA_MEMORY_SCALE
    return "ghost" if w * positions * (d + p) < kappa * d * p else "materialize"


def _grad3(g: Tensor, cout: int) -> Tensor:
    return g.reshape(g.shape[0], cout, math.prod(g.shape[2:]))  # (B, p, L)


def weight_norms(x: Tensor, g: Tensor, plan, shape, mode: str) -> tuple[Tensor, dict]:
    """(squared weight-gradient norms (B,), state entries) of a call with ``x`` (B, C_in, *S),
    ``g`` (B, C_out, *O) in the working dtype; ``mode`` "auto", "ghost" or "materialize"."""
    batch, cout, cin = x.shape[0], shape[0], shape[1]
    cols = conv_taps.unfold(x, plan)
    d = cols.shape[-1]
    g3 = _grad3(g, cout)
    path = choose_path(batch, plan.positions, d, cout, x.dtype) if mode == "auto" else mode
    state: dict = {PLAN: plan}
    if path == "materialize":
        kept = workspace.empty((batch, cout, d), like=cols)
        torch.matmul(g3, cols, out=kept)
        state[KEPT] = kept
        state["weight"] = conv_taps.to_weight(kept, plan, cin, view=True)
        return _ps.sq_norms(kept, x.dtype), state
    norms, flagged = _ghost(cols, g3, x.dtype)
    if flagged is not None:
        rows, grads = flagged
        state[FLAGGED] = (rows, conv_taps.to_weight(grads, plan, cin))
    return norms, state


def _ghost(cols: Tensor, g3: Tensor, out_dtype: torch.dtype):
    """Upper bounds of the squared norms and the flagged records ``(rows, float64 gradients
    (k, p, d) in the columns' order)``, as ``ConvRule._ghost`` with one group: Gram matrices in
    :func:`bounds.gram_dtype` and IEEE precision, each Gram row's L products by one vecdot, the
    L row sums in float64, error at most ``coef * S^2`` (:mod:`bounds`)."""
    positions, d, p = cols.shape[1], cols.shape[2], g3.shape[1]
    if bounds.gram_dtype(cols.dtype, positions, (d, p)) != cols.dtype:  # many positions
        cols, g3 = cols.double(), g3.double()
    u = bounds.unit_roundoff(cols.dtype)
    with bounds.full_precision():
        uu = torch.matmul(cols, cols.transpose(1, 2))
        gg = torch.matmul(g3.transpose(1, 2), g3)
    computed = torch.linalg.vecdot(uu, gg, dim=-1).double().sum(1)
    s = (bounds.diag_norms(uu) * bounds.diag_norms(gg)).sum(-1)
    slack = bounds.norm_slack((d, p), u, positions)
    scale = bounds.gram_coef(d, p, positions, positions, u) * slack ** 2
    norms, flags = bounds.upper_and_flags(computed, s.square() * scale, out_dtype, s=s * slack,
                                          u_book=bounds.book_roundoff(out_dtype))
    if not bool(flags.any()):
        return norms, None
    rows = flags.nonzero().flatten()
    # float64 also for float32 inputs (linear.materialise_flagged)
    grads = torch.matmul(g3[rows].double(), cols[rows].double())
    norms[rows] = bounds.exact_sq_norms(grads, out_dtype)
    return norms, (rows, grads)


def own_sum(plan, state: dict | None) -> bool:
    """Whether :func:`weight_sum` computes this call's clipped sum (kept gradients, or a
    book-keeping that :func:`conv_book.choose` does not leave to the native weight gradient)."""
    return (state is not None and KEPT in state) or conv_book.choose(plan) != "native"


def weight_sum(x: Tensor, g: Tensor, plan, w: Tensor, factors: Tensor, state: dict) -> Tensor:
    """``sum_i factors[i] G_i`` in ``w``'s layout and :func:`per_sample.sum_dtype`: from the kept
    gradients (materialise), else by book-keeping (flagged records added from theirs); not for
    calls :func:`own_sum` leaves to the native weight gradient."""
    cout, cin = w.shape[0], w.shape[1]
    dt = _ps.sum_dtype(w)
    kept = state.get(KEPT)
    if kept is not None:
        flat = kept.flatten(1)
        if flat.dtype != dt and flat.dtype != torch.float64:
            flat = flat.to(dt)
        out = factors.to(flat.dtype) @ flat
        return conv_taps.to_weight(out.view(cout, -1), plan, cin).to(dt)
    f = factors.to(g.dtype)
    flagged = state.get(FLAGGED)
    extra = None
    if flagged is not None:
        rows, grads = flagged
        extra = _ps.weighted_sum(grads, f[rows], w)
        f = bounds.split_factors(f, rows)
    gf = g * f.view((-1,) + (1,) * (g.dim() - 1))
    if conv_book.choose(plan) == "taps":
        out = conv_book.taps(x, gf, plan)
    else:
        out = conv_book.dense(conv_taps.unfold(x, plan), _grad3(gf, cout))
    out = conv_taps.to_weight(out, plan, cin).to(dt)
    return out + extra if extra is not None else out


def per_sample_weight(x: Tensor, g: Tensor, plan, shape) -> Tensor:
    """Per-sample weight gradients (B, *shape) in the weight's layout (a copy)."""
    cols = conv_taps.unfold(x, plan)
    return conv_taps.to_weight(torch.matmul(_grad3(g, shape[0]), cols), plan, shape[1])

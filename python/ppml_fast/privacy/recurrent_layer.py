"""One layer of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (both directions) as an autograd function
whose backward hands the DP step each direction's gate gradients in the layout of one
``"recurrent"`` call (:mod:`ppml_fast.privacy.recurrent_rule`): activation ``a = [x | h_prev]``
and output gradient ``g``, both time-major buffers of the layer, shown batch first as views.

Why this is exact. Per direction, the layer's parameters enter only through the gate
pre-activations ``W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` (the GRU's n gate: ``W_in x_t + b_in +
r_t (W_hn h_{t-1} + b_hn)``), so record i's gradient of each weight is ``sum_t delta_t v_t^T`` over
its own steps (backpropagation through time, Werbos 1990; per-example in McMahan et al. 2018,
arXiv 1710.06963, Sec. 3), ``delta`` the gradient of those pre-activations and ``v`` the weight's
input. ``g`` holds them per kind:

- LSTM: ``[d_i, d_f, d_g, d_o]`` (4H) for both weights and biases;
- RNN: ``d`` (H) for both;
- GRU: ``[d_n^x, d_r, d_z, d_n^h]`` (4H), ``d_n^h = r * d_n^x`` (the hidden part of the n gate is
  multiplied by r): the input weight's block is ``g[:, :, :3H]`` (rows [n, r, z], rolled into
  [r, z, n]), the hidden weight's ``g[:, :, H:]`` ([r, z, n] as is).

A projected LSTM (``proj_size``) adds ``h_t = W_hr m_t``, ``m_t = o_t tanh(c_t)``: a linear call
(activation ``m``, output gradient ``dL/dh_t``), kept as before.

How. On the CPU (float32 / float64), an unprojected LSTM runs both loops in the C++ core
(:mod:`ppml_fast.privacy.recurrent_native`): the forward keeps the backward's factors as it goes,
and backpropagation through time writes ``g`` step by step. Otherwise (GRU, RNN, a projected LSTM,
CUDA, 16-bit) the forward is: the native op (``torch._VF.lstm`` / ``gru`` / ``rnn_*`` on detached
parameters, no autograd; in the module's own layout) gives every ``h_t``; ``a`` is then filled (``x`` and the
shifted states, one copy each) and every gate is recomputed from it by **one** matmul against the
layer's weights side by side (``[W_ih | W_hh]``; for the GRU a (4H, d + Hh) block matrix whose
rows give ``[a_r, a_z, W_in x + b_in, W_hn h + b_hn]``), the LSTM's cell states by one fused
multiply-add per step, and the backward's element-wise factors for all steps at once. Backward:
backpropagation through time written out (2-4 small ops a step) into ``g``; the input gradient
is one matmul over all steps. Reverse directions work on time-flipped copies (a record's
per-sample gradient is a sum over its steps: their order does not matter). The factors go
through ``save_for_backward`` (freed once the layer's backward ran, not kept while the graph
lives) and the GRU's overwrite its pre-activations in place: the GRU's step peak is its forward
and backward.

Measured (issue 16, ``MODELS["lstm"]`` / ``["gru"]`` at ``SIZES["bench"]``: Embedding -> 2-layer
LSTM/GRU, H = 64, B = 16, T = 32; 2-core CPU shared with other jobs; /work/notes/ab_harness.py,
medians of 145 interleaved steps, three runs; before = ``recurrent.FAST = False``):

- time: a wash. One thread: LSTM new/old 0.97-1.00 (DP step 1.80-2.45x non-private, as before;
  forward and backward 0.1-0.2 ms faster, the clipping of the two layers ~0.2 ms slower: ghost
  norms with their rounding bounds against one pass over materialised gradients), GRU 1.02-1.03;
  two threads LSTM 0.96-1.00, GRU 0.99-1.00. Materialised (``recurrent_rule.KAPPA = 0.35``, in
  the step's reused workspace): GRU ~3% faster than ghost, LSTM the same, plus a persistent
  3-4 MiB workspace.
- peak memory of the step (``models.step_peak_mb``): LSTM 0.82-0.88x -> 0.65-0.67x, GRU
  2.08-2.22x -> 1.02-1.12x (the spread is the non-private step's own, 2.39-2.63 MiB).

Session 8 moved the LSTM's loops to C++ (:mod:`ppml_fast.privacy.recurrent_native`; bench/RESULTS.md
"Session 8": forward 3.26 -> 1.91 ms, backward 2.03 -> 1.49 ms on this model, one thread). Before,
why not 1.5x (the LSTM target) from Python: with the LSTM frozen the same model's DP step costs
1.37x (the embedding's and head's norms, the noise, the step's bookkeeping: +1.9-2.0 ms over
5.2-5.5 ms), so the LSTM's own DP work would have to stay within ~1.2 ms of what autograd's LSTM
costs. It is ~3.7 ms over: the recomputed gates (~1 ms a layer: one (T B, d + H) x (d + H, 4H)
matmul the native op already did, the cell-state loop, the factors) and the per-sample norms and
sums (~1.2 ms a layer) on top of a native forward (0.65 ms) and a Python loop over the steps for
the backward (~0.9 ms a layer, 4 small ops a step: as fast as autograd's own LSTM backward here).
Tried and dropped: the forward stepped in Python keeping the gates (no recomputed matmul) was
0.7 ms slower per model; one materialised ``bmm`` per layer (2 MiB fresh output) was no faster
than the ghost path and page-faulted in some allocator states. What would reach it: a fused
cell kernel (forward keeping the gates, backward writing the gate gradients) in the C++ core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ppml_fast.privacy import recurrent_native
from ppml_fast.privacy.per_sample.recurrent import Direction
from ppml_fast.privacy.recurrent_rule import Block


@dataclass
class Saved:
    """One direction's forward, time-major, in its own time order."""

    act: Tensor  # (T, B, d + Hh): [x_t | h_{t-1}]
    d: int  # width of x
    coef: tuple  # element-wise factors of the backward (per kind)
    m: Optional[Tensor] = None  # (T, B, H): o * tanh(c), the projection's input (proj_size)
    ih0: int = 0  # where the input weight's block starts in g (GRU: H)

    @property
    def x(self) -> Tensor:
        return self.act[..., :self.d]

    @property
    def h_prev(self) -> Tensor:
        return self.act[..., self.d:]


@dataclass
class Grads:
    """What one direction's backward found, time-major in its own time order: ``g`` (T, B, n)
    (the call's output gradient, module docstring), and for a projected LSTM ``dh`` (T, B, P)."""

    g: Tensor
    dh: Optional[Tensor] = None


def _native(kind: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], dirs: list[Direction],
            batch_first: bool):
    """The native op on one layer in ``x``'s layout: (output, h_n, c_n or None)."""
    weights = []
    for d in dirs:
        weights += [d.w_ih, d.w_hh] + ([d.b_ih, d.b_hh] if d.b_ih is not None else [])
        if d.w_hr is not None:
            weights.append(d.w_hr)
    bias, bi = dirs[0].b_ih is not None, len(dirs) == 2
    with torch.no_grad():
        if kind == "LSTM":
            return torch._VF.lstm(x, (h0, c0), weights, bias, 1, 0.0, False, bi, batch_first)
        op = {"GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh, "RNN_RELU": torch._VF.rnn_relu}[kind]
        out, hn = op(x, h0, weights, bias, 1, 0.0, False, bi, batch_first)
        return out, hn, None


def g_width(kind: str, hidden: int) -> int:
    return hidden if kind.startswith("RNN") else 4 * hidden


def blocks(kind: str, d: int, hh: int, hidden: int, bias: bool) -> dict[str, Block]:
    """The roles of one direction's "recurrent" call as blocks of its activation ``[x | h_prev]``
    (widths ``d``, ``hh``) and of its gate gradients (:mod:`ppml_fast.privacy.recurrent_layer`)."""
    if kind == "GRU":  # g = [d_n^h, d_r, d_z, d_n^x]: hidden rows [n, r, z] (rolled), input [r, z, n]
        out = {"weight_ih": Block(hidden, 4 * hidden, 0, d),
               "weight_hh": Block(0, 3 * hidden, d, d + hh, hidden)}
        if bias:
            out.update(bias_ih=Block(hidden, 4 * hidden), bias_hh=Block(0, 3 * hidden, roll=hidden))
        return out
    n = g_width(kind, hidden)
    out = {"weight_ih": Block(0, n, 0, d), "weight_hh": Block(0, n, d, d + hh)}
    if bias:
        out.update(bias_ih=Block(0, n), bias_hh=Block(0, n))
    return out


def _sig2(v: Tensor, out: Tensor) -> Tensor:
    """``tanh(v)`` as ``2 sigmoid(2 v) - 1`` (a few ulp of 1 absolute; ~3x faster than
    ``torch.tanh`` on the CPU builds measured: 27 vs 83 us for 32K float32 elements)."""
    return torch.mul(v, 2, out=out).sigmoid_().mul_(2).sub_(1)


def _weights(kind: str, d: Direction, hs: int):
    """(W (n_pre, d + Hh), b (n_pre) or None) whose product with ``a`` gives the gate
    pre-activations at once (LSTM: the g block doubled, for tanh = 2 sigmoid(2 .) - 1)."""
    if kind == "GRU":
        din, dh = d.w_ih.shape[1], d.w_hh.shape[1]
        w = d.w_ih.new_zeros(4 * hs, din + dh)
        w[:2 * hs, :din], w[:2 * hs, din:] = d.w_ih[:2 * hs], d.w_hh[:2 * hs]
        w[2 * hs:3 * hs, :din], w[3 * hs:, din:] = d.w_ih[2 * hs:], d.w_hh[2 * hs:]
        b = None
        if d.b_ih is not None:
            b = torch.cat([d.b_ih[:2 * hs] + d.b_hh[:2 * hs], d.b_ih[2 * hs:], d.b_hh[2 * hs:]])
        return w, b
    w = torch.cat([d.w_ih, d.w_hh], 1)
    b = d.b_ih + d.b_hh if d.b_ih is not None else None
    if kind == "LSTM":
        w[2 * hs:3 * hs].mul_(2)
        if b is not None:
            b[2 * hs:3 * hs].mul_(2)
    return w, b


def _fill(act: Tensor, x: Tensor, h: Tensor, h0: Tensor, d: int, reverse: bool) -> None:
    """``act = [x | h_prev]`` in the direction's time order from time-major views."""
    if reverse:
        act[..., :d] = x.flip(0)
        act[1:, :, d:] = h[1:].flip(0)
    else:
        act[..., :d] = x
        act[1:, :, d:] = h[:-1]
    act[0, :, d:] = h0


def _recompute(kind: str, s: Saved, h: Tensor, c0: Optional[Tensor], d: Direction) -> None:
    """The backward's factors (``s.coef``) of one direction from ``s.act`` and its outputs ``h``
    (time-major, own order)."""
    if kind in ("RNN_TANH", "RNN_RELU"):  # h = act(pre): act'(pre) from h itself
        s.coef = ((1 - h * h) if kind == "RNN_TANH" else (h > 0).to(h.dtype),)
        return
    hs = d.w_hh.shape[0] // (3 if kind == "GRU" else 4)
    steps, batch = s.act.shape[0], s.act.shape[1]
    w, b = _weights(kind, d, hs)
    flat = s.act.view(steps * batch, -1)
    pre = (torch.addmm(b, flat, w.t()) if b is not None else flat @ w.t()).view(steps, batch, -1)
    if kind == "GRU":
        # the factors overwrite the pre-activations in place (the step's memory peak is the
        # forward and backward of a GRU): [r, z, W_in x + b_in, W_hn h + b_hn] ->
        # [kn r, kr, kz, kn], g's layout, with dL/da = dL/dh * k
        k = pre.view(steps, batch, 4, hs)
        r, z, gxn, ghn = k.unbind(2)
        pre[..., :2 * hs].sigmoid_()
        n = _sig2(torch.addcmul(gxn, r, ghn), gxn)  # n = tanh(gx_n + r gh_n)
        zc = z.contiguous()  # dh_t/dh_{t-1} = z_t, kept for the backward
        omz = 1 - zc
        kn = torch.addcmul(omz, omz, n * n, value=-1)  # dh/da_n = (1 - z)(1 - n^2)
        del omz
        # dh/da_r = kn gh_n r (1 - r);  dh/da_z = (h_prev - n) z (1 - z)
        torch.mul(kn, ghn, out=z).mul_(torch.addcmul(r, r, r, value=-1))
        torch.sub(s.h_prev, n, out=n).mul_(torch.addcmul(zc, zc, zc, value=-1))
        r.mul_(kn)  # d_n^h = r d_n^x
        ghn.copy_(kn)
        s.coef, s.ih0 = (k, zc), hs
        return
    a = pre.sigmoid_()  # i, f, o; and g = tanh(a_g) = 2 sigmoid(2 a_g) - 1
    g = a[..., 2 * hs:3 * hs].mul_(2).sub_(1)
    i, f, o = a[..., :hs], a[..., hs:2 * hs], a[..., 3 * hs:]
    ig = i * g
    c_all = ig.new_empty((steps + 1,) + tuple(ig.shape[1:]))  # [c_0, c_1, ..., c_T]
    c_all[0] = c0
    c, c_prev = c_all[1:], c_all[:-1]
    if recurrent_native.usable(ig, f, c0):  # the loop in the C++ core
        recurrent_native.cells(ig, f, c0, c)
    else:
        prev = c0
        for ig_t, f_t, c_t in zip(ig.unbind(0), f.unbind(0), c.unbind(0)):  # c_t = f_t c_{t-1} + i_t g_t
            prev = torch.addcmul(ig_t, f_t, prev, out=c_t)
    tc = _sig2(c, torch.empty_like(c))
    # dL/dc_t times these: [its part of dL/dc_{t-1}, delta_i, delta_f, delta_g]  (T, B, 4, H);
    # sigmoid' = s - s^2 and tanh' = 1 - t^2 as fused multiply-adds, written in place
    p4 = ig.new_empty(steps, batch, 4, hs)
    p4[:, :, 0] = f
    torch.addcmul(ig, ig, i, value=-1, out=p4[:, :, 1])  # g i (1 - i)
    cf = c_prev * f
    torch.addcmul(cf, cf, f, value=-1, out=p4[:, :, 2])  # c_{t-1} f (1 - f)
    torch.addcmul(i, ig, g, value=-1, out=p4[:, :, 3])  # i (1 - g^2)
    m = o * tc
    po = torch.addcmul(m, m, o, value=-1)  # dL/dm_t times this: delta_o = tanh(c) o (1 - o)
    dc_dm = torch.addcmul(o, m, tc, value=-1)  # dL/dm_t times this: its part of dL/dc_t
    s.coef = (p4, po, dc_dm)
    s.m = m if d.w_hr is not None else None


def _backward(kind: str, s: Saved, d: Direction, gh: Tensor, ghn: Optional[Tensor],
              gcn: Optional[Tensor]):
    """Backpropagation through time of one direction (time-major, own order): (g (T, B, n), dh
    (T, B, P) or None, dL/dh0, dL/dc0 or None)."""
    steps, batch = gh.shape[0], gh.shape[1]
    w_hh = d.w_hh
    if ghn is not None:
        gh = gh.clone()
        gh[-1] += ghn
    if kind in ("RNN_TANH", "RNN_RELU"):
        (act,) = s.coef
        delta = gh.new_empty(gh.shape)
        nxt = None
        for gh_t, act_t, delta_t in zip(*(v.unbind(0)[::-1] for v in (gh, act, delta))):
            dh = gh_t if nxt is None else torch.addmm(gh_t, nxt, w_hh)
            nxt = torch.mul(dh, act_t, out=delta_t)
        return delta, None, nxt @ w_hh, None
    if kind == "GRU":
        k, z = s.coef
        hs = gh.shape[-1]
        w_hh = torch.roll(w_hh, hs, 0)  # rows [n, r, z]: g's hidden block
        dh_all = gh.new_empty(gh.shape)
        buf = gh.new_empty(steps, batch, 4, hs)  # g: [d_n^h, d_r, d_z, d_n^x]
        dvh = buf.view(steps, batch, 4 * hs)[:, :, :3 * hs].unbind(0)  # (B, 3H) rows strided
        dh = dv_next = z_next = None
        for gh_t, z_t, k_t, dh_t, d3_t, dvh_t in zip(
                *(v.unbind(0)[::-1] for v in (gh, z, k[:, :, :3], dh_all, buf[:, :, :3])), dvh[::-1]):
            if dh is None:
                dh = dh_t.copy_(gh_t)
            else:  # dL/dh_t = g_t + z_{t+1} dL/dh_{t+1} + delta'_{t+1} W_hh
                dh = torch.addmm(torch.addcmul(gh_t, z_next, dh), dv_next, w_hh, out=dh_t)
            torch.mul(dh.unsqueeze(1), k_t, out=d3_t)
            dv_next, z_next = dvh_t, z_t
        torch.mul(dh_all, k[:, :, 3], out=buf[:, :, 3])  # d_n^x
        dh0 = torch.addmm(z[0] * dh_all[0], dvh[0], w_hh)
        return buf.view(steps, batch, 4 * hs), None, dh0, None
    p4, po, dc_dm = s.coef
    hs = po.shape[-1]
    proj = d.w_hr
    if proj is None and recurrent_native.usable(gh, p4, po, dc_dm, w_hh, gcn):  # the C++ loop
        buf, dh0, dc0 = recurrent_native.bptt(gh, p4, po, dc_dm, w_hh, gcn)
        return buf.view(steps, batch, 5 * hs)[:, :, hs:], None, dh0, dc0
    # per step (B, 5, H): [dL/dc_t f_t (carried to t-1), delta_i, delta_f, delta_g, delta_o]; the
    # last four, viewed as (B, 4H) with row stride 5H, are delta_t for the recurrent matmul
    buf = gh.new_empty(steps, batch, 5, hs)
    dh_all = gh.new_empty(gh.shape) if proj is not None else gh
    dc = gcn
    nxt = None
    views = [v.unbind(0)[::-1] for v in (gh, dh_all, dc_dm, p4, po, buf[:, :, :4], buf[:, :, 4],
                                         buf.view(steps, batch, 5 * hs)[:, :, hs:], buf[:, :, 0])]
    for gh_t, dh_t, dc_dm_t, p4_t, po_t, d4_t, do_t, delta_t, carry_t in zip(*views):
        # dL/dh_t = g_t + delta_{t+1} W_hh (projected LSTM: then dL/dm_t = dL/dh_t W_hr)
        dh = gh_t if nxt is None else torch.addmm(gh_t, nxt, w_hh, out=dh_t if proj is not None else None)
        if proj is not None:
            if nxt is None:
                dh_t.copy_(dh)
            dh = dh @ proj
        dc = dh * dc_dm_t if dc is None else torch.addcmul(dc, dh, dc_dm_t)  # dL/dc_t
        torch.mul(dc.unsqueeze(1), p4_t, out=d4_t)  # carry, delta_i, delta_f, delta_g
        torch.mul(dh, po_t, out=do_t)  # delta_o
        dc, nxt = carry_t, delta_t
    delta = buf.view(steps, batch, 5 * hs)[:, :, hs:]  # (T, B, 4H), rows strided
    return delta, (dh_all if proj is not None else None), nxt @ w_hh, dc


def _native_lstm(kind: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], dirs: list) -> bool:
    """Whether the LSTM's forward runs in the C++ loop (recurrent_native): an unprojected LSTM
    whose tensors the kernels take."""
    return (recurrent_native.FORWARD and kind == "LSTM" and c0 is not None
            and all(d.w_hr is None for d in dirs)
            and recurrent_native.usable(x, h0, c0, *(t for d in dirs for t in (
                d.w_ih, d.w_hh, d.b_ih, d.b_hh))))


def _forward_native(x: Tensor, h0: Tensor, c0: Tensor, dirs: list, batch_first: bool):
    """The layer's forward through recurrent_native.forward, direction by direction (the
    reverse one on the time-flipped input): (out in x's layout, h_n, c_n, [Saved])."""
    xt = _time_major(x, batch_first)
    steps, batch, din = xt.shape
    hs = dirs[0].w_hh.shape[1]
    out = x.new_empty((batch, steps, len(dirs) * hs) if batch_first else (steps, batch, len(dirs) * hs))
    ot = _time_major(out, batch_first)
    hn, cn, saves = [], [], []
    for k, d in enumerate(dirs):
        xd = xt if k == 0 else xt.flip(0)
        h, c, coef = recurrent_native.forward(xd, d.w_ih, d.w_hh, d.b_ih, d.b_hh, h0[k], c0[k])
        ot[..., k * hs:(k + 1) * hs] = h if k == 0 else h.flip(0)
        hn.append(h[-1])  # steps >= 1: an empty sequence is refused before (recurrent._run)
        cn.append(c[-1])
        s = Saved(xt.new_empty(steps, batch, din + hs), din, coef)
        s.act[..., :din] = xd
        s.act[1:, :, din:] = h[:-1]
        s.act[0, :, din:] = h0[k]
        saves.append(s)
    return out, torch.stack(hn, 0), torch.stack(cn, 0), saves


def _time_major(t: Tensor, batch_first: bool) -> Tensor:
    return t.transpose(0, 1) if batch_first else t


class Layer(torch.autograd.Function):
    """``Layer.apply(x, h0, c0, kind, dirs, sink, saved, anchor=None, batch_first=False)``: one
    layer (1 or 2 directions); ``x`` (T, B, d), or (B, T, d) with ``batch_first``; ``h0`` (D, B,
    Hout), ``c0`` (D, B, H) or None (not LSTM); ``saved`` (a list) receives each direction's
    :class:`Saved`; ``anchor``, a scalar that requires grad, makes the backward run also when no
    input requires one (the first layer of a model: the gate gradients are needed all the same).
    Returns ``(out (x's layout, D Hout), h_n, c_n or an empty tensor)``; ``sink(k, Grads)``
    receives direction k's gate gradients during backward. Parameters are never differentiated
    (they are detached in ``dirs``)."""

    @staticmethod
    def forward(ctx, x, h0, c0, kind: str, dirs: list, sink: Callable, saved_out: list,
                anchor: Optional[Tensor] = None, batch_first: bool = False):
        if _native_lstm(kind, x, h0, c0, dirs):
            out, hn, cn, saves = _forward_native(x, h0, c0, dirs, batch_first)
            hout = hn.shape[-1]
            steps, batch, din = _time_major(x, batch_first).shape
        else:
            out, hn, cn = _native(kind, x, h0, c0, dirs, batch_first)
            hout = hn.shape[-1]
            xt, ot = _time_major(x, batch_first), _time_major(out, batch_first)
            steps, batch, din = xt.shape
            saves = []
            for k, d in enumerate(dirs):
                h = ot[..., k * hout:(k + 1) * hout]
                s = Saved(xt.new_empty(steps, batch, din + hout), din, ())
                _fill(s.act, xt, h, h0[k], din, k == 1)
                _recompute(kind, s, h if k == 0 else h.flip(0), None if c0 is None else c0[k], d)
                saves.append(s)
        saved_out.extend(saves)
        # the factors through save_for_backward: autograd frees them once this layer's backward
        # ran (ctx attributes would live as long as the graph, e.g. while the loss is held)
        ctx.save_for_backward(*(t for s in saves for t in s.coef))
        ctx.ncoef = [len(s.coef) for s in saves]
        ctx.shape = (steps, batch, din)
        ctx.ih0 = [s.ih0 for s in saves]
        for s in saves:
            s.coef = ()
        ctx.kind, ctx.dirs, ctx.sink = kind, dirs, sink
        ctx.hout, ctx.batch_first = hout, batch_first
        ctx.needs_x = ctx.needs_input_grad[0]
        ctx.set_materialize_grads(False)
        return out, hn, (cn if cn is not None else x.new_empty(0))

    @staticmethod
    def backward(ctx, g_out, g_hn, g_cn):
        kind, dirs, hout, bf = ctx.kind, ctx.dirs, ctx.hout, ctx.batch_first
        coefs, i = [], 0
        saved = ctx.saved_tensors
        for n in ctx.ncoef:
            coefs.append(tuple(saved[i:i + n]))
            i += n
        steps, batch, _ = ctx.shape
        s0 = saved[0]
        if g_out is None:
            g_out = s0.new_zeros(steps, batch, hout * len(dirs))
        else:
            g_out = _time_major(g_out, bf)
        gx = None
        dh0s, dc0s = [], []
        for k, (d, coef) in enumerate(zip(dirs, coefs)):
            s = Saved(s0, 0, coef)  # the backward reads only the factors
            gh = g_out[..., k * hout:(k + 1) * hout]
            gh = gh.flip(0) if k == 1 else gh
            ghn = g_hn[k] if g_hn is not None else None
            gcn = g_cn[k] if (g_cn is not None and kind == "LSTM") else None
            g, dh, dh0, dc0 = _backward(kind, s, d, gh, ghn, gcn)
            ctx.sink(k, Grads(g, dh))
            if ctx.needs_x:  # dL/dx_t = delta_t W_ih (the input weight's block of g)
                gi = g[..., ctx.ih0[k]:ctx.ih0[k] + d.w_ih.shape[0]]
                part = (gi.reshape(steps * batch, -1) @ d.w_ih).view(steps, batch, -1)
                part = part if k == 0 else part.flip(0)
                gx = part if gx is None else gx + part
            dh0s.append(dh0)
            dc0s.append(dc0 if dc0 is not None else s0.new_zeros(batch, coef[0].shape[-1]))
        dh0 = torch.stack(dh0s, 0) if ctx.needs_input_grad[1] else None
        dc0 = torch.stack(dc0s, 0) if kind == "LSTM" and ctx.needs_input_grad[2] else None
        if gx is not None and bf:
            gx = gx.transpose(0, 1)
        return gx, dh0, dc0, None, None, None, None, None, None

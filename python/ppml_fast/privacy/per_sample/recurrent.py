"""One layer of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (both directions) as an autograd function
whose backward hands the DP step the gate gradients, so that the layer's weight gradients become
linear-rule calls (ghost norms and book-keeping, :mod:`ppml_fast.privacy.per_sample.linear`).
The engine's path only with ``ppml_fast.privacy.recurrent.FAST = False`` (A/B runs, tests): by
default one call per layer and direction goes through :mod:`ppml_fast.privacy.recurrent_layer`
and :mod:`ppml_fast.privacy.recurrent_rule`; :class:`Direction` serves both.

Why this is exact. Per direction, with gate pre-activations ``a_t = W_ih x_t + b_ih + W_hh
h_{t-1} + b_hh`` (LSTM, RNN; the GRU's n gate differs, below), the layer's parameters enter only
through ``a_t``, so record i's gradients are sums over its time steps of outer products
(backpropagation through time, Werbos 1990; the form used for per-example LSTM gradients by
McMahan et al. 2018, arXiv 1710.06963, whose DP-LSTM Opacus's DPLSTM implements)::

    dW_ih = sum_t delta_t x_t^T,  db_ih = sum_t delta_t,
    dW_hh = sum_t delta'_t h_{t-1}^T,  db_hh = sum_t delta'_t,   delta_t = dL/da_t,

``delta' = delta`` for the LSTM and the RNN. GRU (PyTorch's formulation, ``n_t = tanh(W_in x_t +
b_in + r_t (W_hn h_{t-1} + b_hn))``): the hidden part of the n gate is multiplied by ``r_t``, so
``delta'`` is ``delta`` with its n block times ``r_t``. LSTM with ``proj_size``: ``h_t = W_hr m_t``,
``m_t = o_t tanh(c_t)``, so ``dW_hr = sum_t (dL/dh_t) m_t^T`` (a third linear call, activation
``m``, output gradient the total ``dL/dh_t``). Each of these is the weight gradient of a
``F.linear`` call on a (B, T, .) activation, which the linear rule handles per record.

How. Forward: the native op on the layer (``torch._VF.lstm`` / ``gru`` / ``rnn_*``, no autograd:
the parameters are detached, so autograd computes no summed parameter gradient) gives every
``h_t``; the gate activations are then recomputed for all steps at once (two matmuls; the LSTM's
cell state by one fused multiply-add per step). Backward: backpropagation through time written out
(2-6 small ops per step, the element-wise factors precomputed for all steps), which yields the
``delta``\\ s, the input gradient ``delta W_ih`` (one matmul) and the initial states' gradients.
Measured against the other ways to get ``delta`` (``bench/bench_recurrent.py``; numbers in
:mod:`ppml_fast.privacy.recurrent`): running the native op on ``U = X W_ih^T + b_ih`` with an
identity input weight (autograd then gives ``dL/dU = delta``) costs a (4H x 4H) input matmul
forward and backward (1.83x the native layer against 1.43x for this one); a loop of cells under
autograd costs ~3x. What remains over native is the per-step Python loop of the backward
(~0.7 ms for 32 steps) and the recomputed gates (two matmuls).

Layout: time-major ``(T, B, .)`` inside; the reverse direction works on time-flipped tensors (a
record's per-sample gradient is a sum over its steps, so the order of the steps does not matter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

KINDS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


@dataclass
class Direction:
    """The (detached) parameters of one direction of one layer; None where the layer has none."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    w_hr: Optional[Tensor] = None  # LSTM proj_size > 0


@dataclass
class Grads:
    """What one direction's backward found, batch first: the gate gradients of the input side
    ``delta_x`` (B, T, G) and of the hidden side ``delta_h`` (B, T, G), and for a projected LSTM
    the total gradient of the projected states ``dh`` (B, T, P). Steps in the direction's own
    time order (flipped for the reverse direction), as the captured activations are."""

    delta_x: Tensor
    delta_h: Tensor
    dh: Optional[Tensor] = None


@dataclass
class Saved:
    """One direction's forward, time-major, in its own time order."""

    h_prev: Tensor  # (T, B, Hout): the state each step starts from
    coef: tuple  # element-wise factors of the backward (per kind)
    m: Optional[Tensor] = None  # (T, B, H): o * tanh(c), the projection's input
    x: Optional[Tensor] = None  # (T, B, d): the input, in the direction's time order


def _native(kind: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], dirs: list[Direction]):
    """The native op on one layer, time-major: (output (T, B, D Hout), h_n, c_n or None)."""
    weights = []
    for d in dirs:
        weights += [d.w_ih, d.w_hh] + ([d.b_ih, d.b_hh] if d.b_ih is not None else [])
        if d.w_hr is not None:
            weights.append(d.w_hr)
    bias, bi = dirs[0].b_ih is not None, len(dirs) == 2
    with torch.no_grad():
        if kind == "LSTM":
            out, hn, cn = torch._VF.lstm(x, (h0, c0), weights, bias, 1, 0.0, False, bi, False)
            return out, hn, cn
        op = {"GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh, "RNN_RELU": torch._VF.rnn_relu}[kind]
        out, hn = op(x, h0, weights, bias, 1, 0.0, False, bi, False)
        return out, hn, None


def _pre(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return F.linear(x, w, b)


def _tanh_(v: Tensor) -> Tensor:
    """``tanh`` in place as ``2 sigmoid(2 v) - 1`` (absolute error a few ulp of 1; only the
    backward's factors use it): ~3x faster than ``torch.tanh`` on the CPU builds measured
    (32K float32 elements: 28 vs 85 us)."""
    return v.mul_(2).sigmoid_().mul_(2).sub_(1)


def _recompute(kind: str, x: Tensor, h: Tensor, h0: Tensor, c0: Optional[Tensor],
               d: Direction) -> Saved:
    """Gate activations and the backward's factors of one direction (time-major, own order)."""
    h_prev = torch.cat([h0.unsqueeze(0), h[:-1]], 0)
    if kind in ("RNN_TANH", "RNN_RELU"):  # h = act(a): act'(a) from h itself
        return Saved(h_prev, ((1 - h * h) if kind == "RNN_TANH" else (h > 0).to(h.dtype),))
    gx, gh = _pre(x, d.w_ih, d.b_ih), _pre(h_prev, d.w_hh, d.b_hh)
    if kind == "GRU":
        hs = h.shape[-1]
        rz = (gx[..., :2 * hs] + gh[..., :2 * hs]).sigmoid_()
        r, z = rz[..., :hs], rz[..., hs:]
        hn = gh[..., 2 * hs:]
        n = _tanh_(torch.addcmul(gx[..., 2 * hs:], r, hn))
        kn = (1 - z) * (1 - n * n)  # dL/da_n = dL/dh * kn
        kz = (h_prev - n) * z * (1 - z)
        kr = kn * hn * r * (1 - r)
        k = torch.stack([kr, kz, kn], 2)  # (T, B, 3, H): delta_x = dh * k
        k2 = torch.stack([kr, kz, kn * r], 2)  # delta_h = dh * k2
        return Saved(h_prev, (k, k2, z))
    hs = c0.shape[-1]
    a = gx.add_(gh)
    a[..., 2 * hs:3 * hs].mul_(2)
    a.sigmoid_()  # i, f, o; and g = tanh(a_g) = 2 sigmoid(2 a_g) - 1
    g = a[..., 2 * hs:3 * hs].mul_(2).sub_(1)
    i, f, o = a[..., :hs], a[..., hs:2 * hs], a[..., 3 * hs:]
    ig = i * g
    steps = ig.shape[0]
    c_all = ig.new_empty((steps + 1,) + tuple(ig.shape[1:]))  # [c_0, c_1, ..., c_T]
    c_all[0] = c0
    c, c_prev = c_all[1:], c_all[:-1]
    prev = c0
    for ig_t, f_t, c_t in zip(ig.unbind(0), f.unbind(0), c.unbind(0)):  # c_t = f_t c_{t-1} + i_t g_t
        prev = torch.addcmul(ig_t, f_t, prev, out=c_t)
    tc = torch.mul(c, 2).sigmoid_().mul_(2).sub_(1)  # tanh(c), as _tanh_
    # dL/dc_t times these: [its part of dL/dc_{t-1}, delta_i, delta_f, delta_g]  (T, B, 4, H);
    # sigmoid' = s - s^2 and tanh' = 1 - t^2 as fused multiply-adds, written in place
    p4 = ig.new_empty(tuple(ig.shape[:2]) + (4, hs))
    p4[:, :, 0] = f
    torch.addcmul(ig, ig, i, value=-1, out=p4[:, :, 1])  # g i (1 - i)
    cf = c_prev * f
    torch.addcmul(cf, cf, f, value=-1, out=p4[:, :, 2])  # c_{t-1} f (1 - f)
    torch.addcmul(i, ig, g, value=-1, out=p4[:, :, 3])  # i (1 - g^2)
    m = o * tc
    po = torch.addcmul(m, m, o, value=-1)  # dL/dm_t times this: delta_o = tanh(c) o (1 - o)
    dc_dm = torch.addcmul(o, m, tc, value=-1)  # dL/dm_t times this: its part of dL/dc_t
    m = m if d.w_hr is not None else None
    return Saved(h_prev, (p4, po, dc_dm), m)


def _backward(kind: str, s: Saved, d: Direction, gh: Tensor, ghn: Optional[Tensor],
              gcn: Optional[Tensor]):
    """Backpropagation through time of one direction (time-major, own order): (delta_x,
    delta_h, dh or None, dL/dh0, dL/dc0 or None), the deltas (T, B, G)."""
    steps, batch = gh.shape[0], gh.shape[1]
    w_hh = d.w_hh
    if ghn is not None:
        gh = gh.clone()
        gh[-1] += ghn
    if kind in ("RNN_TANH", "RNN_RELU"):
        (act,) = s.coef
        delta = torch.empty_like(gh)
        nxt = None
        for gh_t, act_t, delta_t in zip(*(v.unbind(0)[::-1] for v in (gh, act, delta))):
            dh = gh_t if nxt is None else torch.addmm(gh_t, nxt, w_hh)
            nxt = torch.mul(dh, act_t, out=delta_t)
        return delta, delta, None, nxt @ w_hh, None
    if kind == "GRU":
        k, k2, z = s.coef
        hs = gh.shape[-1]
        dh_all = torch.empty_like(gh)
        dv = gh.new_empty(steps, batch, 3, hs)
        dvf = dv.view(steps, batch, 3 * hs).unbind(0)
        dh = dv_next = z_next = None
        for gh_t, z_t, k2_t, dh_t, dv_t, dvf_t in zip(*(v.unbind(0)[::-1] for v in (gh, z, k2, dh_all, dv)),
                                                      dvf[::-1]):
            if dh is None:
                dh = dh_t.copy_(gh_t)
            else:  # dL/dh_t = g_t + z_{t+1} dL/dh_{t+1} + delta'_{t+1} W_hh
                dh = torch.addmm(torch.addcmul(gh_t, z_next, dh), dv_next, w_hh, out=dh_t)
            torch.mul(dh.unsqueeze(1), k2_t, out=dv_t)
            dv_next, z_next = dvf_t, z_t
        dh0 = torch.addmm(z[0] * dh_all[0], dvf[0], w_hh)
        delta_x = (dh_all.unsqueeze(2) * k).view(steps, batch, 3 * hs)
        return delta_x, dv.view(steps, batch, 3 * hs), None, dh0, None
    p4, po, dc_dm = s.coef
    hs = po.shape[-1]
    proj = d.w_hr
    # per step (B, 5, H): [dL/dc_t f_t (carried to t-1), delta_i, delta_f, delta_g, delta_o]; the
    # last four, viewed as (B, 4H) with row stride 5H, are delta_t for the recurrent matmul
    buf = gh.new_empty(steps, batch, 5, hs)
    dh_all = torch.empty_like(gh) if proj is not None else gh
    dc = gcn if gcn is not None else None
    nxt = None
    # every per-step view made once (unbind): a view op per step and tensor costs ~1-2 us
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
    dh_all = dh_all if proj is not None else None
    delta = buf.view(steps, batch, 5 * hs)[:, :, hs:]  # (T, B, 4H), rows strided
    return delta, delta, dh_all, nxt @ w_hh, dc


def batch_first(t: Tensor) -> Tensor:
    """A time-major (T, B, .) tensor as a contiguous (B, T, .) one (one copy: the linear rule's
    batched matmuls on the transposed view were 4x slower than on the copy)."""
    return t.transpose(0, 1).contiguous()


class Layer(torch.autograd.Function):
    """``Layer.apply(x, h0, c0, kind, dirs, sink, saved, anchor=None)``: one layer (1 or 2
    directions), time-major ``x`` (T, B, d), ``h0`` (D, B, Hout), ``c0`` (D, B, H) or None (not
    LSTM); ``saved`` (a list) receives each direction's :class:`Saved`; ``anchor``, a scalar that
    requires grad, makes the backward run also when no input requires one (the first layer of a
    model: the gate gradients are needed all the same). Returns
    ``(out (T, B, D Hout), h_n (D, B, Hout), c_n (D, B, H) or an empty tensor)``; ``sink(k,
    Grads)`` receives direction k's gate gradients during backward. Parameters are never
    differentiated (they are detached in ``dirs``)."""

    @staticmethod
    def forward(ctx, x, h0, c0, kind: str, dirs: list, sink: Callable, saved_out: list,
                anchor: Optional[Tensor] = None):
        out, hn, cn = _native(kind, x, h0, c0, dirs)
        hout = hn.shape[-1]
        saves = []
        for k, d in enumerate(dirs):
            xs = x if k == 0 else x.flip(0)
            h = out[..., k * hout:(k + 1) * hout]
            h = h if k == 0 else h.flip(0)
            s = _recompute(kind, xs, h, h0[k], None if c0 is None else c0[k], d)
            s.x = xs
            saves.append(s)
        saved_out.extend(saves)
        ctx.kind, ctx.dirs, ctx.sink, ctx.saves = kind, dirs, sink, saves
        ctx.hout = hout
        ctx.needs_x = ctx.needs_input_grad[0]
        ctx.set_materialize_grads(False)
        return out, hn, (cn if cn is not None else x.new_empty(0))

    @staticmethod
    def backward(ctx, g_out, g_hn, g_cn):
        kind, dirs, hout = ctx.kind, ctx.dirs, ctx.hout
        s0 = ctx.saves[0].h_prev
        steps, batch = s0.shape[0], s0.shape[1]
        if g_out is None:
            g_out = s0.new_zeros(steps, batch, hout * len(dirs))
        gx = None
        dh0s, dc0s = [], []
        for k, (d, s) in enumerate(zip(dirs, ctx.saves)):
            gh = g_out[..., k * hout:(k + 1) * hout]
            gh = gh.flip(0) if k == 1 else gh.contiguous()
            ghn = g_hn[k] if g_hn is not None else None
            gcn = g_cn[k] if (g_cn is not None and kind == "LSTM") else None
            dx, dhh, dh, dh0, dc0 = _backward(kind, s, d, gh, ghn, gcn)
            bx = batch_first(dx)  # the linear rule's bmm / matmuls want batch-first rows
            ctx.sink(k, Grads(bx, bx if dhh is dx else batch_first(dhh),
                              None if dh is None else batch_first(dh)))
            if ctx.needs_x:  # dL/dx_t = delta_t W_ih
                part = (bx.view(steps * batch, -1) @ d.w_ih).view(batch, steps, -1).transpose(0, 1)
                part = part if k == 0 else part.flip(0)
                gx = part if gx is None else gx + part
            dh0s.append(dh0)
            dc0s.append(dc0 if dc0 is not None else torch.zeros_like(s.coef[0][0, :, 0]))
        dh0 = torch.stack(dh0s, 0) if ctx.needs_input_grad[1] else None
        dc0 = torch.stack(dc0s, 0) if kind == "LSTM" and ctx.needs_input_grad[2] else None
        return gx, dh0, dc0, None, None, None, None, None

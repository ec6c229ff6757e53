"""The recurrent layer's maths (:mod:`ppml_fast.privacy.per_sample.recurrent`) against torch's own
nn.LSTM / nn.GRU / nn.RNN under autograd, in float64: the layer's outputs, the gradients it
returns (input, h0, c0) and the weight gradients formed from the gate gradients it hands out
(``sum_t delta_t x_t^T`` and friends, per record), for every kind and option of one layer.
The engine-level checks (options across layers, clipping, neighbouring batches) are in
tests/privacy/sensitivity/test_recurrent.py; the wiring's refusals in test_recurrent_wiring.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppml_fast.privacy.per_sample.recurrent import Direction, Layer

T, B, D, H = 5, 3, 4, 6
KINDS = {"LSTM": (nn.LSTM, {}), "GRU": (nn.GRU, {}), "RNN_TANH": (nn.RNN, {}),
         "RNN_RELU": (nn.RNN, {"nonlinearity": "relu"})}


def _directions(m: nn.Module, dirs: int) -> list[Direction]:
    out = []
    for k in range(dirs):
        sfx = "_l0" + ("_reverse" if k else "")

        def get(n):
            p = getattr(m, n + sfx, None)
            return None if p is None else p.detach()

        out.append(Direction(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                             get("weight_hr")))
    return out


def _case(kind: str, bidirectional: bool, bias: bool, proj: int, seed: int = 0):
    cls, kw = KINDS[kind]
    torch.manual_seed(seed)
    if proj:
        kw = dict(kw, proj_size=proj)
    m = cls(D, H, bidirectional=bidirectional, bias=bias, **kw).double()
    dirs = 2 if bidirectional else 1
    hout = proj or H
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = rnd(T, B, D).requires_grad_()
    h0 = rnd(dirs, B, hout).requires_grad_()
    c0 = rnd(dirs, B, H).requires_grad_() if kind == "LSTM" else None
    cot = (rnd(T, B, dirs * hout), rnd(dirs, B, hout), rnd(dirs, B, H))
    return m, dirs, x, h0, c0, cot


def _loss(out, hn, cn, cot):
    loss = (out * cot[0]).sum() + (hn * cot[1]).sum()
    return loss if cn is None or cn.numel() == 0 else loss + (cn * cot[2]).sum()


OPTIONS = [(k, bi, bias, proj) for k in KINDS for bi in (False, True) for bias in (True, False)
           for proj in ((0, 3) if k == "LSTM" else (0,))]


@pytest.mark.parametrize("kind,bidirectional,bias,proj", OPTIONS)
def test_layer_matches_torch(kind, bidirectional, bias, proj):
    m, dirs, x, h0, c0, cot = _case(kind, bidirectional, bias, proj)
    if kind == "LSTM":
        out, (hn, cn) = m(x, (h0, c0))
    else:
        (out, hn), cn = m(x, h0), None
    inputs = [x, h0] + ([c0] if c0 is not None else [])
    want = torch.autograd.grad(_loss(out, hn, cn, cot), inputs + list(m.parameters()))
    names = [n for n, _ in m.named_parameters()]
    want_params = dict(zip(names, want[len(inputs):]))

    got, saved = {}, []
    out2, hn2, cn2 = Layer.apply(x, h0, c0, kind, _directions(m, dirs),
                                 lambda k, grads: got.__setitem__(k, grads), saved)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hn2, hn, rtol=1e-12, atol=1e-12)
    if kind == "LSTM":
        torch.testing.assert_close(cn2, cn, rtol=1e-12, atol=1e-12)
    mine = torch.autograd.grad(_loss(out2, hn2, cn2 if kind == "LSTM" else None, cot), inputs)
    for a, b, what in zip(mine, want, ("x", "h0", "c0")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=what)
    for k in range(dirs):
        sfx = "_l0" + ("_reverse" if k else "")
        grads, s = got[k], saved[k]
        xs = s.x.transpose(0, 1)
        hp = s.h_prev.transpose(0, 1)
        per = {"weight_ih": torch.einsum("btg,btd->bgd", grads.delta_x, xs),
               "weight_hh": torch.einsum("btg,btd->bgd", grads.delta_h, hp)}
        if bias:
            per["bias_ih"], per["bias_hh"] = grads.delta_x.sum(1), grads.delta_h.sum(1)
        if proj:
            per["weight_hr"] = torch.einsum("btp,bth->bph", grads.dh, s.m.transpose(0, 1))
        for n, g in per.items():
            torch.testing.assert_close(g.sum(0), want_params[n + sfx], rtol=1e-10, atol=1e-12, msg=n + sfx)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_per_record_gradients_are_each_records_own(kind):
    """The per-record weight gradients formed from the gate gradients equal torch's gradient of
    each record run alone (the definition), not only their sum."""
    m, dirs, x, h0, c0, cot = _case(kind, True, True, 0, seed=3)
    got, saved = {}, []
    out, hn, cn = Layer.apply(x, h0, c0, kind, _directions(m, dirs),
                              lambda k, g: got.__setitem__(k, g), saved)
    _loss(out, hn, cn if kind == "LSTM" else None, cot).backward()
    for i in range(B):
        m.zero_grad()
        xi, hi = x.detach()[:, i:i + 1], h0.detach()[:, i:i + 1]
        if kind == "LSTM":
            o, (a, c) = m(xi, (hi, c0.detach()[:, i:i + 1]))
            loss = ((o * cot[0][:, i:i + 1]).sum() + (a * cot[1][:, i:i + 1]).sum()
                    + (c * cot[2][:, i:i + 1]).sum())
        else:
            o, a = m(xi, hi)
            loss = (o * cot[0][:, i:i + 1]).sum() + (a * cot[1][:, i:i + 1]).sum()
        loss.backward()
        for k in range(dirs):
            sfx = "_l0" + ("_reverse" if k else "")
            xs, hp = saved[k].x[:, i], saved[k].h_prev[:, i]
            w_ih = got[k].delta_x[i].t() @ xs
            w_hh = got[k].delta_h[i].t() @ hp
            torch.testing.assert_close(w_ih, getattr(m, "weight_ih" + sfx).grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(w_hh, getattr(m, "weight_hh" + sfx).grad, rtol=1e-10, atol=1e-12)


def test_no_parameter_gradient_in_autograd():
    """The layer never lets autograd form a summed parameter gradient (privacy/capture.py)."""
    m, dirs, x, h0, c0, cot = _case("LSTM", True, True, 0)
    out, hn, cn = Layer.apply(x, h0, c0, "LSTM", _directions(m, dirs), lambda k, g: None, [])
    _loss(out, hn, cn, cot).backward()
    assert all(p.grad is None for p in m.parameters())
    assert x.grad is not None and h0.grad is not None and c0.grad is not None

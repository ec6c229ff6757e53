"""The fused recurrent layer (:mod:`ppml_fast.privacy.recurrent_layer`) and its rule
(:mod:`ppml_fast.privacy.recurrent_rule`) against torch's own nn.LSTM / nn.GRU / nn.RNN under
autograd, in float64: outputs, input / h0 / c0 gradients, and each record's weight and bias
gradients formed from the call's blocks, which must equal torch's gradient of that record run
alone; then the rule's norms and clipped sums (ghost, materialised, flagged records, subsets of
roles) against the per-record gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppml_fast.privacy import recurrent as wiring
from ppml_fast.privacy import recurrent_layer
from ppml_fast.privacy.per_sample import Captured
from ppml_fast.privacy.per_sample.recurrent import Direction
from ppml_fast.privacy.recurrent_layer import Layer
from ppml_fast.privacy.recurrent_rule import RecurrentRule

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


def _case(kind, bidirectional, bias, proj, seed=0, batch_first=False):
    cls, kw = KINDS[kind]
    torch.manual_seed(seed)
    if proj:
        kw = dict(kw, proj_size=proj)
    m = cls(D, H, bidirectional=bidirectional, bias=bias, batch_first=batch_first, **kw).double()
    dirs = 2 if bidirectional else 1
    hout = proj or H
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = rnd(*((B, T, D) if batch_first else (T, B, D))).requires_grad_()
    h0 = rnd(dirs, B, hout).requires_grad_()
    c0 = rnd(dirs, B, H).requires_grad_() if kind == "LSTM" else None
    cot = (rnd(*((B, T) if batch_first else (T, B)), dirs * hout), rnd(dirs, B, hout), rnd(dirs, B, H))
    return m, dirs, x, h0, c0, cot


def _loss(out, hn, cn, cot):
    loss = (out * cot[0]).sum() + (hn * cot[1]).sum()
    return loss if cn is None or cn.numel() == 0 else loss + (cn * cot[2]).sum()


def _torch(m, kind, x, h0, c0):
    if kind == "LSTM":
        out, (hn, cn) = m(x, (h0, c0))
        return out, hn, cn
    out, hn = m(x, h0)
    return out, hn, None


def _per_record(m, kind, x, h0, c0, cot, batch_first):
    """name -> (B, *shape): each record's gradient, the record run alone."""
    rows = {n: [] for n, _ in m.named_parameters()}
    bd = 0 if batch_first else 1
    for i in range(B):
        m.zero_grad()
        xi = x.detach().narrow(bd, i, 1)
        hi = h0.detach()[:, i:i + 1]
        ci = c0.detach()[:, i:i + 1] if c0 is not None else None
        out, hn, cn = _torch(m, kind, xi, hi, ci)
        cots = (cot[0].narrow(bd, i, 1), cot[1][:, i:i + 1], cot[2][:, i:i + 1])
        _loss(out, hn, cn, cots).backward()
        for n, p in m.named_parameters():
            rows[n].append(p.grad.clone())
    return {n: torch.stack(v) for n, v in rows.items()}


OPTIONS = [(k, bi, bias, proj, bf) for k in KINDS for bi in (False, True) for bias in (True, False)
           for proj in ((0, 3) if k == "LSTM" else (0,)) for bf in (False, True)]


def _run(kind, bidirectional, bias, proj, batch_first, seed=0):
    m, dirs, x, h0, c0, cot = _case(kind, bidirectional, bias, proj, seed, batch_first)
    got, saved = {}, []
    out, hn, cn = Layer.apply(x, h0, c0, kind, _directions(m, dirs),
                              lambda k, grads: got.__setitem__(k, grads), saved, None, batch_first)
    return m, dirs, x, h0, c0, cot, (out, hn, cn), got, saved


@pytest.mark.parametrize("kind,bidirectional,bias,proj,batch_first", OPTIONS)
def test_layer_and_per_record_gradients(kind, bidirectional, bias, proj, batch_first):
    m, dirs, x, h0, c0, cot, (out, hn, cn), got, saved = _run(kind, bidirectional, bias, proj, batch_first)
    want_out, want_hn, want_cn = _torch(m, kind, x, h0, c0)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hn, want_hn, rtol=1e-12, atol=1e-12)
    if kind == "LSTM":
        torch.testing.assert_close(cn, want_cn, rtol=1e-12, atol=1e-12)
    inputs = [x, h0] + ([c0] if c0 is not None else [])
    want = torch.autograd.grad(_loss(want_out, want_hn, want_cn, cot), inputs)
    mine = torch.autograd.grad(_loss(out, hn, cn if kind == "LSTM" else None, cot), inputs)
    for a, b, what in zip(mine, want, ("x", "h0", "c0")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=what)
    per = _per_record(m, kind, x, h0, c0, cot, batch_first)
    rule = RecurrentRule("materialize")
    for k in range(dirs):
        sfx = "_l0" + ("_reverse" if k else "")
        s, gr = saved[k], got[k]
        blocks = recurrent_layer.blocks(kind, s.d, s.act.shape[-1] - s.d, H, bias)
        params = {r: getattr(m, r + sfx) for r in blocks}
        cap = Captured("recurrent", s.act.transpose(0, 1), params, {"blocks": blocks})
        mine = rule.per_sample(cap, gr.g.transpose(0, 1))
        for r, t in mine.items():
            torch.testing.assert_close(t, per[r + sfx], rtol=1e-10, atol=1e-12, msg=r + sfx)
        if proj:
            hr = torch.einsum("tbp,tbh->bph", gr.dh, s.m)
            torch.testing.assert_close(hr, per["weight_hr" + sfx], rtol=1e-10, atol=1e-12)


def _rule_case(kind, seed=3):
    m, dirs, x, h0, c0, cot, (out, hn, cn), got, saved = _run(kind, True, True, 0, True, seed)
    _loss(out, hn, cn if kind == "LSTM" else None, cot).backward()
    per = _per_record(m, kind, x, h0, c0, cot, True)
    s, gr = saved[1], got[1]  # the reverse direction
    blocks = recurrent_layer.blocks(kind, s.d, s.act.shape[-1] - s.d, H, True)
    params = {r: getattr(m, r + "_l0_reverse") for r in blocks}
    cap = Captured("recurrent", s.act.transpose(0, 1), params, {"blocks": blocks})
    return cap, gr.g.transpose(0, 1), {r: per[r + "_l0_reverse"] for r in blocks}


@pytest.mark.parametrize("mode", ["ghost", "materialize", "auto"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_rule_norms_and_sums(kind, mode):
    cap, g, per = _rule_case(kind)
    rule = RecurrentRule(mode)
    norms, state = rule.norms_sq(cap, g)
    for r, n in norms.items():
        want = per[r].flatten(1).square().sum(1)
        torch.testing.assert_close(n, want, rtol=1e-9, atol=1e-12, msg=r)
    f = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sums = rule.clipped_sum(cap, g, f, state)
    for r, t in sums.items():
        torch.testing.assert_close(t, torch.einsum("b,b...->...", f, per[r]), rtol=1e-10, atol=1e-12, msg=r)
    for r in cap.params:  # one role at a time (per-layer clipping), from the same state
        sub = Captured(cap.op, cap.activation, {r: cap.params[r]}, cap.kwargs)
        one = rule.clipped_sum(sub, g, f, state)
        assert set(one) == {r}
        torch.testing.assert_close(one[r], sums[r], rtol=1e-12, atol=1e-12)
    plain = rule.clipped_sum(cap, g, f, None)  # no state: book-keeping
    for r, t in plain.items():
        torch.testing.assert_close(t, sums[r], rtol=1e-10, atol=1e-12)


def _crafted(kind="LSTM", dtype=torch.float32, scale=2.0**20):
    """A call whose record 1 cancels: steps 0 and 1 hold activations (M, v) and (-M, v) with
    equal gate gradients, so its gradient is small while every Gram term is ~M^2 (the ghost
    norm is rounding noise in float32: the record must be flagged and materialised)."""
    gen = torch.Generator().manual_seed(11)
    d, hh, hid = 3, 2, 2
    blocks = recurrent_layer.blocks(kind, d, hh, hid, True)
    n = max(b.g1 for b in blocks.values())
    a = torch.randn(B, T, d + hh, generator=gen, dtype=torch.float64)
    g = torch.randn(B, T, n, generator=gen, dtype=torch.float64)
    a[1, 0, 0], a[1, 1, 0] = scale, -scale
    a[1, 1, 1:] = a[1, 0, 1:]
    g[1, 1] = g[1, 0]
    a[1, 2:], g[1, 2:] = 0.0, 0.0
    params = {r: torch.nn.Parameter(torch.zeros(
        (blocks[r].g1 - blocks[r].g0, blocks[r].a1 - blocks[r].a0) if r.startswith("weight")
        else (blocks[r].g1 - blocks[r].g0,), dtype=dtype)) for r in blocks}
    cap = Captured("recurrent", a.to(dtype), params, {"blocks": blocks})
    exact = Captured("recurrent", a, {r: p.double() for r, p in params.items()}, {"blocks": blocks})
    ref = RecurrentRule("materialize").per_sample(exact, g)
    return cap, g.to(dtype), ref


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_ghost_flags_cancelling_record(kind):
    """Privacy invariant 2: a record whose ghost norm the rounding bound cannot vouch for is
    flagged, materialised in float64, and summed from that gradient (factor 0 in the
    book-keeping matmul): its norm and its clipped contribution match the float64 truth."""
    cap, g, ref = _crafted(kind)
    rule = RecurrentRule("ghost")
    norms, state = rule.norms_sq(cap, g)
    assert any(1 in rows.tolist() for rows, _ in state["flagged"].values())
    for r, n in norms.items():
        want = ref[r].flatten(1).square().sum(1)
        assert bool((n.double() >= want * (1 - 1e-6)).all()), r  # never below the truth
        torch.testing.assert_close(n.double(), want, rtol=1e-4, atol=1e-6, msg=r)
    f = torch.tensor([0.5, 1.0, 0.25])
    sums = rule.clipped_sum(cap, g, f, state)
    for r, t in sums.items():
        want = torch.einsum("b,b...->...", f.double(), ref[r])
        scale = ref[r].flatten(1).norm(dim=1).max()
        assert float((t.double() - want).norm()) <= 1e-5 * float(scale) + 1e-6, r


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_empty_batch(mode):
    blocks = recurrent_layer.blocks("LSTM", 3, 2, 2, True)
    params = {r: torch.nn.Parameter(torch.zeros(8, 3 if r == "weight_ih" else 2) if r.startswith("weight")
                                    else torch.zeros(8)) for r in blocks}
    cap = Captured("recurrent", torch.zeros(0, T, 5), params, {"blocks": blocks})
    g = torch.zeros(0, T, 8)
    rule = RecurrentRule(mode)
    norms, state = rule.norms_sq(cap, g)
    assert all(n.shape == (0,) for n in norms.values())
    sums = rule.clipped_sum(cap, g, torch.zeros(0), state)
    for r, t in sums.items():
        assert t.shape == params[r].shape and not bool(t.any())


def test_choose_path():
    from ppml_fast.privacy import recurrent_rule

    w = {r: b for r, b in recurrent_layer.blocks("LSTM", 64, 64, 64, True).items() if r.startswith("weight")}
    assert recurrent_rule.choose_path(32, w, 16) == "ghost"  # the benchmark's shape
    assert recurrent_rule.choose_path(512, w, 16) == "materialize"  # long sequences
    assert recurrent_rule.choose_path(1, w, 16) == "ghost"


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_engine_step_equals_old_path(cls, mode, clipping, monkeypatch):
    """One DP step (noise 0, float64) through the fused calls equals the same step through one
    linear call per weight matrix (recurrent.FAST = False, the path before)."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from ppml_fast.privacy import PrivacyEngine

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(D, H, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(2 * H, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    grads = []
    for fast in (True, False):
        monkeypatch.setattr(wiring, "FAST", fast)
        torch.manual_seed(0)
        model = Net().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private, dp, _ = PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(y), batch_size=B),
                noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=False, clipping=clipping,
                grad_sample_mode=mode)
        dp.zero_grad()
        nn.functional.cross_entropy(private(x), y).backward()
        dp.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-10, atol=1e-13, msg=n)

"""The LSTM's sequential loops in the C++ core (privacy/recurrent_native.py, csrc/cpu/lstm_bptt.cpp)
against the torch loops they replace (recurrent_layer.py, ENABLED = False), and the fallbacks."""

import pytest
import torch
from torch import nn

from ppml_fast import _C
from ppml_fast.privacy import recurrent_layer as RL
from ppml_fast.privacy import recurrent_native as RN
from ppml_fast.privacy.recurrent_layer import Saved


class _Dir:
    def __init__(self, w_hh):
        self.w_hh, self.w_hr = w_hh, None


def _inputs(T, B, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gh = torch.randn(T, B, H, generator=g, dtype=dtype)
    p4 = torch.rand(T, B, 4, H, generator=g, dtype=dtype)
    po = torch.randn(T, B, H, generator=g, dtype=dtype) * 0.3
    dc_dm = torch.randn(T, B, H, generator=g, dtype=dtype) * 0.3
    w = torch.randn(4 * H, H, generator=g, dtype=dtype) * 0.1
    gcn = torch.randn(B, H, generator=g, dtype=dtype)
    return gh, (p4, po, dc_dm), w, gcn


def _both(monkeypatch, T, B, H, dtype, with_gcn, ghn=None):
    gh, coef, w, gcn = _inputs(T, B, H, dtype)
    out = []
    for on in (False, True):
        monkeypatch.setattr(RN, "ENABLED", on)
        out.append(RL._backward("LSTM", Saved(torch.empty(0), 0, coef), _Dir(w), gh, ghn,
                                gcn if with_gcn else None))
    return out


@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (1, 3, 5), (5, 3, 4), (32, 16, 64), (9, 2, 17)])
@pytest.mark.parametrize("with_gcn", [False, True])
def test_bptt_equals_torch_loop_float64(monkeypatch, T, B, H, with_gcn):
    (g0, dh_a, h0_a, c0_a), (g1, dh_b, h0_b, c0_b) = _both(monkeypatch, T, B, H, torch.float64, with_gcn)
    assert dh_a is None and dh_b is None
    assert g1.shape == g0.shape == (T, B, 4 * H)
    for a, b in ((g0, g1), (h0_a, h0_b), (c0_a, c0_b)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_bptt_float32_close_and_last_step_gradient(monkeypatch):
    ghn = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    (g0, _, h0_a, c0_a), (g1, _, h0_b, c0_b) = _both(monkeypatch, 12, 3, 8, torch.float32, True, ghn=ghn)
    for a, b in ((g0, g1), (h0_a, h0_b), (c0_a, c0_b)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_cells_equal_torch_loop():
    g = torch.Generator().manual_seed(1)
    T, B, H = 7, 3, 5
    gates = torch.rand(T, B, 4 * H, generator=g, dtype=torch.float64)
    ig = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    f = gates[..., H:2 * H]
    c = torch.empty(T, B, H, dtype=torch.float64)
    RN.cells(ig, f, c0, c)
    prev = c0
    for t in range(T):
        prev = ig[t] + f[t] * prev
        torch.testing.assert_close(c[t], prev, rtol=1e-14, atol=1e-15)


def test_usable_only_for_cpu_float32_float64(monkeypatch):
    x = torch.zeros(2, 2)
    assert RN.usable(x, None, x)
    assert not RN.usable(x.half(), x.half())
    assert not RN.usable(x.bfloat16())
    assert not RN.usable(x, x.double())  # mixed dtypes: the torch loop
    monkeypatch.setattr(RN, "ENABLED", False)
    assert not RN.usable(x)


def test_bindings_refuse_bad_arguments():
    with pytest.raises(ValueError, match="float32 or float64"):
        _C.lstm_bptt(2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1)
    with pytest.raises(ValueError, match=">= 0"):
        _C.lstm_cells(0, -1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="must not be null"):
        _C.lstm_bptt(0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="f_row"):
        _C.lstm_cells(0, 1, 1, 4, 1, 1, 2, 1, 1)
    with pytest.raises(ValueError, match="must have shape"):
        RN.bptt(torch.zeros(2, 2, 3), torch.zeros(2, 2, 4, 2), torch.zeros(2, 2, 3),
                torch.zeros(2, 2, 3), torch.zeros(12, 3), None)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_dp_step_same_with_and_without_native_loops(monkeypatch, bidirectional, batch_first):
    """A whole DP step (noise 0, float64, 2 layers, h_n and c_n in the loss) with the C++ loops
    equals the step with the torch loops."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from ppml_fast.privacy import PrivacyEngine

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
            self.head = nn.Linear(4 * (2 if bidirectional else 1), 2)

        def forward(self, x):
            out, (hn, cn) = self.rnn(x)
            last = out[:, -1] if batch_first else out[-1]
            # h_n and c_n per record ((layers * directions, B, H)): no term mixes records
            return self.head(last) + (hn.sum((0, 2)) * 0.1 + cn.pow(2).sum((0, 2)) * 0.05)[:, None]

    B, T = 4, 6
    shape = (B, T, 3) if batch_first else (T, B, 3)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    grads = []
    for on in (False, True):
        monkeypatch.setattr(RN, "ENABLED", on)
        torch.manual_seed(0)
        model = Net().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private, dp, _ = PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(y), batch_size=B),
                noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=False,
                batch_first=batch_first)
        dp.zero_grad()
        nn.functional.cross_entropy(private(x), y).backward()
        dp.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-13, msg=n)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_native_lstm(dtype, tol, bias):
    """recurrent_native.forward's h and c equal torch's own LSTM (the float32 exp is a few ulp
    from libm's), and its factors equal those the torch path recomputes from them."""
    g = torch.Generator().manual_seed(4)
    T, B, d, H = 9, 3, 5, 7
    x = torch.randn(T, B, d, generator=g, dtype=dtype)
    w_ih = torch.randn(4 * H, d, generator=g, dtype=dtype) * 0.5
    w_hh = torch.randn(4 * H, H, generator=g, dtype=dtype) * 0.5
    b_ih = torch.randn(4 * H, generator=g, dtype=dtype) * 0.5 if bias else None
    b_hh = torch.randn(4 * H, generator=g, dtype=dtype) * 0.5 if bias else None
    h0 = torch.randn(B, H, generator=g, dtype=dtype)
    c0 = torch.randn(B, H, generator=g, dtype=dtype)
    h, c, (p4, po, dc_dm) = RN.forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0)
    weights = [w_ih, w_hh] + ([b_ih, b_hh] if bias else [])
    out, hn, cn = torch._VF.lstm(x, (h0[None], c0[None]), weights, bias, 1, 0.0, False, False, False)
    torch.testing.assert_close(h, out, rtol=tol, atol=tol)
    torch.testing.assert_close(c[-1], cn[0], rtol=tol, atol=tol)
    # the factors, from the definitions (recurrent_layer._recompute)
    pre = x.reshape(T * B, d) @ w_ih.t()
    pre = pre.view(T, B, 4 * H)
    hp = torch.cat([h0[None], h[:-1]])
    pre = pre + hp @ w_hh.t() + ((b_ih + b_hh) if bias else 0)
    i, f, gg, o = pre.sigmoid()[..., :H], pre.sigmoid()[..., H:2 * H], pre[..., 2 * H:3 * H].tanh(), pre.sigmoid()[..., 3 * H:]
    cp = torch.cat([c0[None], c[:-1]])
    tc = c.tanh()
    ref = torch.stack([f, gg * i * (1 - i), cp * f * (1 - f), i * (1 - gg * gg)], 2)
    torch.testing.assert_close(p4, ref, rtol=10 * tol, atol=10 * tol)
    torch.testing.assert_close(po, tc * o * (1 - o), rtol=10 * tol, atol=10 * tol)
    torch.testing.assert_close(dc_dm, o * (1 - tc * tc), rtol=10 * tol, atol=10 * tol)


def test_forward_saturated_gates_stay_finite():
    """Large pre-activations (the float32 exp clamped) give gates of exactly 0 / 1 limits, no
    inf or nan."""
    T, B, d, H = 3, 2, 2, 3
    x = torch.full((T, B, d), 1e4)
    w = torch.ones(4 * H, d)
    out = RN.forward(x, w, torch.zeros(4 * H, H), None, None, torch.zeros(B, H), torch.zeros(B, H))
    for t in (out[0], out[1], *out[2]):
        assert torch.isfinite(t).all()
    assert (out[0] - torch.tanh(out[1])).abs().max() < 1e-6  # o = 1: h = tanh(c)


def test_layer_forward_same_with_and_without_native_forward(monkeypatch):
    """The private LSTM's outputs (2 layers, bidirectional, batch first) with the C++ forward
    equal those of torch's op (float64)."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from ppml_fast.privacy import PrivacyEngine

    outs = []
    for fwd in (False, True):
        monkeypatch.setattr(RN, "FORWARD", fwd)
        torch.manual_seed(0)
        lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
        x = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private, dp, _ = PrivacyEngine().make_private(
                module=lstm, optimizer=torch.optim.SGD(lstm.parameters(), lr=0.1),
                data_loader=DataLoader(TensorDataset(x), batch_size=5), noise_multiplier=0.0,
                max_grad_norm=1.0, poisson_sampling=False)
        out, (hn, cn) = private(x)
        outs.append((out.detach(), hn.detach(), cn.detach()))
        assert out.shape == (5, 6, 8) and hn.shape == cn.shape == (4, 5, 4)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_sequence_refused_as_torch_does(batch_first):
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from ppml_fast.privacy import PrivacyEngine

    m = nn.LSTM(3, 4, batch_first=batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, _, _ = PrivacyEngine().make_private(
            module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(2)), batch_size=2), noise_multiplier=0.0,
            max_grad_norm=1.0, poisson_sampling=False, batch_first=batch_first)
    x = torch.zeros((2, 0, 3) if batch_first else (0, 2, 3))
    with pytest.raises(RuntimeError, match="sequence length to be larger than 0"):
        private(x)


def test_lazily_negated_views_are_read_as_their_values():
    """A tensor with torch's negation bit stores the negated values (``data_ptr()``): the
    wrappers resolve it before the kernels read memory (review S8)."""
    gh, (p4, po, dc_dm), w, gcn = _inputs(6, 3, 5, torch.float64)
    plain = RN.bptt(gh, p4, po, dc_dm, w, gcn)
    neg = RN.bptt(torch._neg_view(-gh), p4, torch._neg_view(-po), dc_dm, torch._neg_view(-w),
                  torch._neg_view(-gcn))
    for a, b in zip(plain, neg):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    w_ih = torch.randn(20, 3, generator=g, dtype=torch.float64)
    w_hh = torch.randn(20, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    a = RN.forward(x, w_ih, w_hh, None, None, h0, h0)
    b = RN.forward(x, w_ih, torch._neg_view(-w_hh), None, None, torch._neg_view(-h0), h0)
    for u, v in zip(a[:2] + a[2], b[:2] + b[2]):
        assert torch.equal(u, v)


def test_forward_under_autocast_runs_in_the_inputs_dtype():
    """Under torch.autocast the input projection would come out in bfloat16, a buffer half the
    size the kernel reads and writes as float32 (heap corruption, review S8): it is computed
    with autocast off, so the result equals the one without autocast."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 4, generator=g)
    w_ih, w_hh = torch.randn(20, 4, generator=g), torch.randn(20, 5, generator=g)
    b = torch.randn(20, generator=g)
    h0 = torch.randn(3, 5, generator=g)
    plain = RN.forward(x, w_ih, w_hh, b, b, h0, h0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = RN.forward(x, w_ih, w_hh, b, b, h0, h0)
    for u, v in zip(plain[:2] + plain[2], auto[:2] + auto[2]):
        assert v.dtype == torch.float32 and torch.equal(u, v)


def test_private_lstm_model_under_autocast():
    """A private Embedding -> LSTM -> Linear model trained under CPU autocast (bfloat16): the
    C++ loops run in float32, the step gives finite, non-zero gradients."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from ppml_fast.privacy import PrivacyEngine

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3)
            self.rnn = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(self.emb(x))[0][:, -1])

    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(4)), batch_size=4), noise_multiplier=0.0,
            max_grad_norm=1.0, poisson_sampling=False)
    x, y = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 0, 1])
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(private(x).float(), y)
    loss.backward()
    opt.step()
    grads = [p.grad for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert float(model.rnn.weight_hh_l0.grad.abs().sum()) > 0

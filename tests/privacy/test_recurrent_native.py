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
    with pytest.raises(ValueError, match="shapes"):
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

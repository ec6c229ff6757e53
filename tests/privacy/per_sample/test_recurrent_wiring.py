"""How PrivateModule takes nn.LSTM / nn.GRU / nn.RNN (:mod:`ppml_fast.privacy.recurrent`): which
calls are recorded, what is refused (PackedSequence, subclasses with their own forward, a
batch-first tensor fed to a batch_first=False layer), and that outside a captured batch the
module runs torch's own forward unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine, PrivateModule, UnsupportedModuleError

B, T, D, H, K = 5, 4, 3, 6, 2


class Head(nn.Module):
    def __init__(self, rnn: nn.Module, out: int = H):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(out, K)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if getattr(self.rnn, "batch_first", True) else out[-1])


def _step(model, x, batch_first=True):
    y = torch.zeros(x.shape[0 if batch_first else 1], dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, dp, _ = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(y), batch_size=len(y)),
            noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, batch_first=batch_first)
    dp.zero_grad()
    nn.functional.cross_entropy(private(x), y).backward()
    dp.step()
    return private


def test_calls_recorded_per_layer_and_direction():
    """One "recurrent" call per layer and direction (input and hidden weights and biases, rows
    the records) and a linear call per projection (recurrent_rule, recurrent_layer)."""
    torch.manual_seed(0)
    model = Head(nn.LSTM(D, H, num_layers=2, bidirectional=True, batch_first=True, proj_size=2), 4)
    private = PrivateModule(model)
    private(torch.randn(B, T, D))
    calls = [c for c in private.recorder.batches[-1].calls if isinstance(c.module, nn.LSTM)]
    # 2 layers x 2 directions x (recurrent, hr)
    assert len(calls) == 8
    assert sorted(c.cap.op for c in calls) == ["linear"] * 4 + ["recurrent"] * 4
    assert all(c.cap.activation.shape[0] == B for c in calls)
    named = {id(p): n for n, p in model.named_parameters()}
    recorded = sorted(named[id(p)] for c in calls for p in c.params.values())
    assert recorded == sorted(n for n in named.values() if n.startswith("rnn."))
    assert "recurrent" in private.rules


def test_calls_recorded_per_weight_matrix_old_path(monkeypatch):
    """recurrent.FAST = False (the A/B switch): one linear call per weight matrix, as before."""
    from ppml_fast.privacy import recurrent

    monkeypatch.setattr(recurrent, "FAST", False)
    torch.manual_seed(0)
    model = Head(nn.LSTM(D, H, num_layers=2, bidirectional=True, batch_first=True, proj_size=2), 4)
    private = PrivateModule(model)
    private(torch.randn(B, T, D))
    calls = [c for c in private.recorder.batches[-1].calls if isinstance(c.module, nn.LSTM)]
    # 2 layers x 2 directions x (ih, hh, hr)
    assert len(calls) == 12
    assert all(c.cap.op == "linear" and c.cap.activation.shape[0] == B for c in calls)
    named = {id(p): n for n, p in model.named_parameters()}
    recorded = sorted(named[id(p)] for c in calls for p in c.params.values())
    assert recorded == sorted(n for n in named.values() if n.startswith("rnn."))


def test_frozen_parts_and_eval_path():
    torch.manual_seed(0)
    lstm = nn.LSTM(D, H, batch_first=True)
    lstm.weight_hh_l0.requires_grad_(False)
    model = Head(lstm)
    x = torch.randn(B, T, D)
    want = lstm(x)[0]
    private = _step(model, x)
    assert lstm.weight_hh_l0.grad is None and lstm.weight_ih_l0.grad is not None
    with torch.no_grad():  # not captured: torch's own forward
        torch.testing.assert_close(lstm(x)[0], nn.LSTM.forward(lstm, x)[0])
    private.remove_hooks()
    assert "forward" not in lstm.__dict__
    assert want.shape == lstm(x)[0].shape


def test_packed_sequence_refused():
    torch.manual_seed(0)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(D, H, batch_first=True), nn.Linear(H, K)

        def forward(self, x):
            lengths = torch.full((x.shape[0],), x.shape[1])
            return self.head(self.rnn(pack_padded_sequence(x, lengths, batch_first=True))[1][-1])

    with pytest.raises(UnsupportedModuleError, match="PackedSequence"):
        _step(Packed(), torch.randn(B, T, D))


def test_subclass_with_own_forward_refused():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    with pytest.raises(UnsupportedModuleError, match="stock"):
        PrivateModule(Head(MyLSTM(D, H, batch_first=True)))
    PrivateModule(Head(type("Plain", (nn.GRU,), {})(D, H, batch_first=True)))  # stock forward: fine


@pytest.mark.parametrize("steps", [T, B])  # T == B: the shapes agree; the records probe must see it
def test_batch_first_data_into_seq_first_layer_refused(steps):
    """nn.LSTM(batch_first=False) fed (B, T, d) data under make_private(batch_first=True): its
    recurrence runs across the records. Refused by the size check (T != B) or by the records
    probe (T == B), before any parameter changes."""
    torch.manual_seed(0)
    lstm = nn.LSTM(D, H)  # batch_first=False
    model = Head(lstm)
    model.forward = lambda x: model.head(lstm(x)[0][:, -1])  # reads it as if batch first
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedModuleError):
        _step(model, torch.randn(B, steps, D))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_seq_first_layer_with_seq_first_data_accepted():
    torch.manual_seed(0)
    model = Head(nn.GRU(D, H))  # (T, B, d) in and out
    _step(model, torch.randn(T, B, D), batch_first=False)
    assert model.rnn.weight_ih_l0.grad is not None


def test_unbatched_input_is_one_record():
    torch.manual_seed(0)
    rnn = nn.RNN(D, H)
    private = PrivateModule(rnn)
    x = torch.randn(T, D)
    out, hn = private(x)
    want, want_h = nn.RNN.forward(rnn, x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(hn, want_h)

"""nn.LSTM / nn.GRU / nn.RNN under the adversarial suite (issue 16 item 3): every option of the
recurrent layers (num_layers, bidirectional, batch_first both ways, bias, dropout between layers,
proj_size, nonlinearity, hx given from a layer before or omitted, the gradient reaching h_n and
c_n) against the float64 per-record reference (a loop over records with plain torch modules
under autograd, clipped and summed), and neighbouring batches (a record removed, or replaced),
with large and cancelling records. Same assertions as everywhere (``_harness``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.privacy.sensitivity._harness import CANCEL_KAPPA, Case, check_case, scaled, with_cancellation

B, T, D, HID, K = 6, 4, 5, 4, 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Rec(nn.Module):
    """x -> recurrent layer (hx from a Linear of the first step, or None) -> head on the last
    output and the last layer's h_n (and c_n's sum): every output of the layer gets a gradient."""

    def __init__(self, kind="lstm", layers=1, bi=False, bf=True, bias=True, proj=0, hx=False,
                 dropout=0.0, nonlinearity="tanh"):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        kw = {"proj_size": proj} if proj else {}
        if kind == "rnn":
            kw["nonlinearity"] = nonlinearity
        self.kind, self.bf, self.layers = kind, bf, layers
        self.dirs, self.hout = (2 if bi else 1), (proj or HID)
        self.rnn = cls(D, HID, num_layers=layers, bidirectional=bi, batch_first=bf, bias=bias,
                       dropout=dropout, **kw)
        states = layers * self.dirs
        self.h_init = nn.Linear(D, states * self.hout) if hx else None
        self.c_init = nn.Linear(D, states * HID) if hx and kind == "lstm" else None
        self.head = nn.Linear(self.dirs * self.hout + self.hout, K)

    def _state(self, lin, xb, size):
        b = xb.shape[0]
        return torch.tanh(lin(xb[:, 0])).view(b, self.layers * self.dirs, size).transpose(0, 1).contiguous()

    def forward(self, x):
        xb = x if self.bf else x.transpose(0, 1)
        hx = None
        if self.h_init is not None:
            h0 = self._state(self.h_init, xb, self.hout)
            hx = (h0, self._state(self.c_init, xb, HID)) if self.kind == "lstm" else h0
        out, hn = self.rnn(x, hx)
        last = out[:, -1] if self.bf else out[-1]
        if self.kind == "lstm":
            hn, cn = hn
            extra = hn[-1] + cn[-1].sum(-1, keepdim=True)
        else:
            extra = hn[-1]
        return self.head(torch.cat([last, extra], -1))


class TextLSTM(nn.Module):
    """The benchmark's shape, tiny: Embedding -> 2-layer LSTM (batch first) -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, D)
        self.rnn = nn.LSTM(D, HID, num_layers=2, batch_first=True)
        self.head = nn.Linear(HID, K)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0][:, -1])


def _build(**kw):
    def build():
        torch.manual_seed(0)
        return Rec(**kw).double()
    return build


def _seq(seed=1):
    return torch.randn(B, T, D, generator=_gen(seed), dtype=torch.float64)


def _inputs(bf: bool, x=None):
    x = _seq() if x is None else x
    return (x,) if bf else (x.transpose(0, 1).contiguous(),)


CASES = {
    "lstm": dict(kind="lstm"),
    "lstm_2layers_bi_seqfirst_hx": dict(kind="lstm", layers=2, bi=True, bf=False, hx=True),
    "lstm_proj_bi_nobias_hx": dict(kind="lstm", layers=2, bi=True, proj=3, bias=False, hx=True),
    "lstm_proj_seqfirst": dict(kind="lstm", proj=2, bf=False),
    "gru_2layers_bi_hx": dict(kind="gru", layers=2, bi=True, hx=True),
    "gru_nobias_seqfirst": dict(kind="gru", bias=False, bf=False),
    "rnn_tanh_2layers_bi": dict(kind="rnn", layers=2, bi=True),
    "rnn_relu_nobias_seqfirst_hx": dict(kind="rnn", nonlinearity="relu", bias=False, bf=False, hx=True),
}


def _case(name, mode, clipping, **extra):
    kw = CASES[name]
    bf = kw.get("bf", True)
    x = with_cancellation(scaled(_seq(), 1, 1e3), 3)
    return Case(name=f"{name}[{mode},{clipping}]", build=_build(**kw), inputs=_inputs(bf, x),
                target=torch.randint(0, K, (B,), generator=_gen(9)), record_dim=0 if bf else 1,
                batch_first=bf, clipping=clipping, adversarial=(1, 3), kappa=CANCEL_KAPPA,
                rules="ghost" if mode == "forced_ghost" else None, **extra)


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
@pytest.mark.parametrize("mode", ["ghost", "forced_ghost", "materialize"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_recurrent_options(name, mode, clipping):
    case = _case(name, "ghost" if mode == "forced_ghost" else mode, clipping)
    if mode == "forced_ghost":
        case = case.with_(rules="ghost", name=case.name.replace("[ghost", "[forced_ghost"))
    out = check_case(case, replace=(clipping == "flat"))
    assert out.refused is None


def _value_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask that is a function of each element's value alone (so of its record alone,
    whatever the batch): the same in the engine's run and the per-record reference."""
    u = torch.frac(torch.sin(x.detach() * 1e3) * 1e4).abs()
    return (u >= p).to(x.dtype) / (1 - p)


class StackedLSTM(nn.Module):
    """What nn.LSTM(num_layers=3, dropout=p) computes, with the dropout between layers written
    out: the per-record reference for the dropout case."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.layers = nn.ModuleList()
        for layer in range(lstm.num_layers):
            one = nn.LSTM(lstm.input_size if layer == 0 else lstm.hidden_size, lstm.hidden_size,
                          batch_first=True).double()
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(one, f"{n}_l0").data.copy_(getattr(lstm, f"{n}_l{layer}").data)
            self.layers.append(one)
        self.p = lstm.dropout

    def forward(self, x, hx=None):
        hs, cs = [], []
        for i, one in enumerate(self.layers):
            x, (h, c) = one(x)
            hs.append(h)
            cs.append(c)
            if i < len(self.layers) - 1:
                x = F.dropout(x, self.p, True)
        return x, (torch.cat(hs), torch.cat(cs))


def test_dropout_between_layers(monkeypatch):
    """dropout > 0 in training: the engine applies F.dropout to each layer's output (per element,
    so per record); with a value-determined mask the engine's clipped sums equal the reference
    (the same model with the layers and the dropout written out), and one record moves the sum
    by at most C."""
    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, training=True, inplace=False:
                        x * _value_mask(x, p) if training and p > 0 else x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(D, HID, num_layers=3, dropout=0.4, batch_first=True)
            self.head = nn.Linear(HID, K)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    def build():
        torch.manual_seed(0)
        return Model().double()

    plain = build()
    stacked = StackedLSTM(plain.rnn)
    x = _seq(4)
    with torch.no_grad():
        a = plain.rnn(x)[0]  # torch's own (random-mask) dropout is not the patched one ...
    assert a.shape == stacked(x)[0].shape
    # ... so the reference runs the written-out stack; the engine runs nn.LSTM
    from tests.privacy.sensitivity import _harness

    real = _harness.per_record_grads

    def reference(case, model64, inputs, target):
        ref = build()
        ref.rnn = StackedLSTM(model64.rnn)
        ref.head.load_state_dict(model64.head.state_dict())
        rows = real(case, ref.double(), inputs, target)
        out = {}
        for layer in range(3):
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                out[f"rnn.{n}_l{layer}"] = rows[f"rnn.layers.{layer}.{n}_l0"]
        out.update({k: v for k, v in rows.items() if k.startswith("head.")})
        return out

    monkeypatch.setattr(_harness, "per_record_grads", reference)
    case = Case(name="lstm_dropout", build=build, inputs=(scaled(x, 1, 30.0),),
                target=torch.randint(0, K, (B,), generator=_gen(9)), adversarial=(1,))
    check_case(case, replace=True)


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_embedding_lstm_float32(mode):
    """The benchmark's model in float32 (the engine's usual dtype) against the float64
    reference, with a repeated-token record."""
    tokens = torch.randint(0, 20, (B, 7), generator=_gen(3))
    tokens[1] = 4

    def build():
        torch.manual_seed(0)
        return TextLSTM().double()

    case = Case(name=f"text_lstm[{mode}]", build=build, inputs=(tokens,), mode=mode,
                target=torch.randint(0, K, (B,), generator=_gen(9)), dtype=torch.float32,
                adversarial=(1,))
    check_case(case, replace=True)

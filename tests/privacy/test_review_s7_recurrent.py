"""Review S7 (commit 2f6f714, the fused "recurrent" rule): attacks on nn.LSTM / GRU / RNN under
DP against the float64 per-record reference (tests/privacy/sensitivity/_harness.py).

Targets what the commit changed: one call per layer and direction whose roles are column blocks
of ``[x | h_prev]`` and of the gate gradients (the LSTM / RNN biases share one g block, the GRU's
are rolled), the ghost path's stacks of roles with equal widths (d == H), its flagged records
(float64), the per-layer path (one role's sub-capture at a time), frozen subsets, tied biases,
records whose input-weight gradient truly cancels (crafted so that delta_0 == delta_1 while
x_0 = M r + a, x_1 = -M r + a: float32 book-keeping would round at M), bfloat16, sequences of
length 1, nonfinite="drop" and rules replaced after make_private."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy.recurrent_rule import RecurrentRule
from tests.privacy.sensitivity._harness import (CANCEL_KAPPA, Case, check_case, clip_and_sum,
                                                engine_sums, lowered, per_record_grads, rtol,
                                                scaled, select, with_cancellation)

B, T, K = 5, 4, 3
CLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Net(nn.Module):
    """x -> recurrent layer -> head on the mean of its outputs over time."""

    def __init__(self, kind, d, h, bf=True, freeze=(), tie_bias=False, **kw):
        super().__init__()
        self.bf = bf
        self.rnn = CLS[kind](d, h, batch_first=bf, **kw)
        if tie_bias:
            self.rnn.bias_hh_l0 = self.rnn.bias_ih_l0
        for n in freeze:
            getattr(self.rnn, n).requires_grad_(False)
        dirs = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(dirs * (kw.get("proj_size") or h), K)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out.mean(1 if self.bf else 0))


def _build(kind, d, h, crafted=False, **kw):
    def build():
        torch.manual_seed(0)
        m = Net(kind, d, h, **kw).double()
        if crafted:  # delta_0 == delta_1: no recurrence, a's columns alone feed the gates
            with torch.no_grad():
                m.rnn.weight_hh_l0.zero_()
                m.rnn.weight_ih_l0[:, : d // 2].zero_()  # r's features (cancellation_pair)
                if kind != "rnn":  # LSTM: forget gate ~0 (c_1 = c_0); GRU: update gate ~0
                    m.rnn.bias_ih_l0[h:2 * h].fill_(-100.0)
        return m
    return build


def _x(d, t=T, b=B, seed=1, bf=True):
    x = torch.randn(b, t, d, generator=_gen(seed), dtype=torch.float64)
    return x


def _case(name, kind, d, h, *, mode="ghost", clipping="flat", dtype=torch.float64, bf=True,
          cancel=True, t=T, crafted=False, C=1.0, **kw):
    x = _x(d, t)
    adv = (1,)
    if cancel:
        x = with_cancellation(scaled(x, 1, 1e3), 3)
        adv = (1, 3)
    if not bf:
        x = x.transpose(0, 1).contiguous()
    return Case(name=name, build=_build(kind, d, h, bf=bf, crafted=crafted, **kw), inputs=(x,),
                target=torch.randint(0, K, (B,), generator=_gen(9)), mode=mode,
                clipping=clipping, dtype=dtype, record_dim=0 if bf else 1, batch_first=bf,
                adversarial=adv, kappa=CANCEL_KAPPA if cancel else 1.0, C=C)


# -- frozen subsets: the shared bias block with one bias frozen, stacks of roles (d == H) --------
FROZEN = {
    "lstm_bias_hh_frozen": dict(kind="lstm", d=4, h=4, freeze=("bias_hh_l0",)),
    "lstm_bias_ih_weight_hh_frozen_seqfirst": dict(kind="lstm", d=5, h=3, bf=False,
                                                   freeze=("bias_ih_l0", "weight_hh_l0")),
    "gru_bias_hh_weight_ih_frozen": dict(kind="gru", d=4, h=4, freeze=("bias_hh_l0", "weight_ih_l0")),
    "gru_bias_ih_frozen": dict(kind="gru", d=5, h=3, freeze=("bias_ih_l0",)),
    "rnn_relu_weight_ih_frozen": dict(kind="rnn", d=4, h=4, nonlinearity="relu",
                                      freeze=("weight_ih_l0",)),
    "lstm_2l_bi_proj_partly_frozen": dict(
        kind="lstm", d=4, h=4, num_layers=2, bidirectional=True, proj_size=2,
        freeze=("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0",
                "weight_ih_l1_reverse", "bias_hh_l1")),
    "gru_2l_bi_only_reverse_hh": dict(
        kind="gru", d=4, h=4, num_layers=2, bidirectional=True,
        freeze=tuple(f"{w}_l{l}{s}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                     for l in (0, 1) for s in ("", "_reverse") if (w, l, s) != ("weight_hh", 1, "_reverse"))),
}


@pytest.mark.parametrize("mode,clipping", [("ghost", "flat"), ("materialize", "per_layer"),
                                           ("ghost", "per_layer")])
@pytest.mark.parametrize("name", sorted(FROZEN))
def test_frozen_subsets(name, mode, clipping):
    kw = dict(FROZEN[name])
    case = _case(f"{name}[{mode},{clipping}]", mode=mode, clipping=clipping, **kw)
    assert check_case(case).refused is None


# -- tied biases inside one layer: b_hh is b_ih (one parameter, two roles of one call) ---------
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_tied_biases(kind, mode):
    case = _case(f"{kind}_tied_bias[{mode}]", kind, 4, 4, mode=mode, tie_bias=True)
    assert check_case(case).refused is None


# -- a record whose input-weight gradient truly cancels (kappa ~ 2^27) ----------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_true_cancellation(kind, dtype):
    """x_0 = M r + a, x_1 = -M r + a with delta_0 == delta_1 (W_hh = 0, W_ih blind to r, forget /
    update gate shut): record 3's dW_ih = sum_t delta_t x_t^T has its M parts cancel, its Gram
    norm loses everything and float32 book-keeping would round at M f_3 ||delta||. Flagged and
    materialised in float64, the sum must equal the reference and one record move it <= C."""
    # kappa 1: delta_0 == delta_1 bitwise (0 * M = 0 in the gates), so the M parts cancel exactly
    # in any dtype and a record flagged and materialised in float64 has no cancellation error:
    # the sum is held to the tolerance of an ordinary record (a lost flag fails it)
    case = _case(f"{kind}_cancel[{dtype}]", kind, 4, 4, crafted=True, dtype=dtype).with_(kappa=1.0)
    model64 = case.build()
    # the attack is real: the reference's dW_ih of record 3 is tiny against its terms
    g = per_record_grads(case, model64, *select(case, case.inputs, case.target, [3]))
    assert float(g["rnn.weight_ih_l0"].norm()) < 1e3  # terms are ~2^30 ||delta||
    assert check_case(case, replace=True).refused is None


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_true_cancellation_per_layer_materialize(kind):
    case = _case(f"{kind}_cancel_pl", kind, 4, 4, crafted=True, dtype=torch.float32,
                 clipping="per_layer", mode="materialize", C=0.3).with_(kappa=1.0)
    assert check_case(case).refused is None


# -- bfloat16, sequences of length 1 ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bfloat16_sensitivity(kind):
    case = _case(f"{kind}_bf16", kind, 4, 4, dtype=torch.bfloat16, cancel=False,
                 freeze=("bias_hh_l0",))
    case = case.with_(inputs=(scaled(case.inputs[0], 2, 30.0),), adversarial=(2,))
    assert check_case(case).refused is None


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_length_one_bidirectional(kind):
    case = _case(f"{kind}_T1", kind, 4, 4, t=1, cancel=False, bidirectional=True, bf=False,
                 clipping="per_layer", freeze=("bias_ih_l0_reverse",))
    case = case.with_(inputs=(scaled(case.inputs[0].transpose(0, 1), 1, 1e3).transpose(0, 1).contiguous(),))
    assert check_case(case).refused is None


# -- nonfinite="drop" under per-layer clipping, materialised ---------------------------------------
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_nonfinite_drop_per_layer(mode):
    x = _x(4)
    bad = x.clone()
    bad[2, 1, 0] = float("nan")
    case = _case("lstm_nan", "lstm", 4, 4, mode=mode, clipping="per_layer", cancel=False,
                 freeze=("bias_ih_l0",), C=0.2).with_(make={"nonfinite": "drop"}, inputs=(bad,))
    model64 = case.build()
    got = engine_sums(case, lowered(case, model64), (bad,), case.target)
    keep = [i for i in range(B) if i != 2]
    xs, ys = select(case, (x,), case.target, keep)
    want, clipped = clip_and_sum(case, per_record_grads(case, case.build(), xs, ys))
    err = sum(float((got[n] - want[n]).pow(2).sum()) for n in want) ** 0.5
    assert err <= rtol(case.dtype) * float(clipped.sum()), err


# -- rules replaced after make_private ----------------------------------------------------------------
@pytest.mark.parametrize("rules", ["materialize", "ghost"])
def test_rules_replaced_after_make_private(rules):
    case = _case(f"gru_rules_{rules}", "gru", 4, 4, freeze=("bias_hh_l0",)).with_(rules=rules)
    assert check_case(case).refused is None


def test_user_recurrent_rule_kept_and_stock_rule_restored():
    """A 'recurrent' rule the user put in private.rules is the one used (not overwritten at the
    next forward); deleting it brings the stock rule back at the next forward (never no rule)."""
    torch.manual_seed(0)
    model = Net("lstm", 4, 4).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.arange(B)), batch_size=B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, dp, _ = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=1.0, poisson_sampling=False)
    calls = []

    class Counting(RecurrentRule):
        def norms_sq(self, cap, grad_out, *, mode=None):
            calls.append(1)
            return super().norms_sq(cap, grad_out, mode=mode)

    private.rules["recurrent"] = mine = Counting("ghost")
    y = torch.randint(0, K, (B,), generator=_gen(9))
    for _ in range(2):
        dp.zero_grad()
        F.cross_entropy(private(_x(4)), y).backward()
        dp.step()
    assert private.rules["recurrent"] is mine and len(calls) == 2
    del private.rules["recurrent"]
    dp.zero_grad()
    F.cross_entropy(private(_x(4)), y).backward()
    dp.step()
    assert type(private.rules["recurrent"]) is RecurrentRule
    private.remove_hooks()

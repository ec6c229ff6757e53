"""Beyond the list of issue 14: models whose rows are records but not in order (a forward that
permutes, splits or subsets the batch), models that mix records without BatchNorm (centering
over the batch; a custom torch.func layer that does it), plus loop details an attacker can
choose: a Poisson loader (expected batch size != batch size), an empty neighbour batch, the sum
reduction, a frozen layer in the middle, and a non-finite record dropped with nonfinite="drop".
Each: the clipped sum equals the per-record reference and one record moves it by at most the
bound, or the engine refuses before any parameter changes (``refuse_ok``).

Not here: a loss that mixes records (InfoNCE over the batch on :class:`Embedder`) moves the sum
by 2.72 C, but the engine never sees the loss function, so only the checker, which does, can
flag it (test_checker)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine
from tests.privacy.sensitivity._harness import (
    CANCEL_KAPPA, Case, check_case, clip_and_sum, flat_norm, per_record_grads, scaled, with_cancellation)

B, T, D, K = 6, 2, 16, 3


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls().double()
    return build


class Permuted(nn.Module):
    """fc2 sees the batch reversed and its output is put back: its row i is record B-1-i."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        return self.head((self.fc1(x) + self.fc2(x.flip(0)).flip(0)).mean(1))


class SplitBatch(nn.Module):
    """Micro-batching inside forward: the Linear is called on each half of the batch."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        h = x.shape[0] // 2
        return self.head(torch.cat([self.fc(x[:h]), self.fc(x[h:])]).mean(1))


class Subset(nn.Module):
    """A layer sees only some records (those whose first feature is positive): rows != records."""

    def __init__(self):
        super().__init__()
        self.fc, self.extra, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        h = self.fc(x)
        keep = x[:, 0, 0] > 0
        h = h.index_put((keep,), self.extra(h[keep]))
        return self.head(h.mean(1))


class Centering(nn.Module):
    """Records mixed without BatchNorm: activations centred over the batch."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        h = self.fc(x)
        return self.head(torch.tanh(h - h.mean(0, keepdim=True)).mean(1))


class MixingLayer(nn.Module):
    """A custom layer (torch.func path) with its own parameter that mixes records."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * self.w + x.mean(0, keepdim=True)


class MixingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.head = MixingLayer(), nn.Linear(D, K)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).mean(1))


class FrozenMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, K)
        self.mid.requires_grad_(False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.mid(torch.tanh(self.fc1(x)))).mean(1))


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(x).mean(1)


def _seq():
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, 0, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    return with_cancellation(scaled(x, 1, 1e4), 2)


COMMON = dict(inputs=(_seq(),), target=torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(9)),
              adversarial=(1, 2), kappa=CANCEL_KAPPA)
CASES = {
    "records_permuted_inside_forward": dict(build=_seeded(Permuted), refuse_ok=True),
    "batch_split_inside_forward": dict(build=_seeded(SplitBatch), refuse_ok=True),
    "layer_sees_a_subset_of_records": dict(build=_seeded(Subset), refuse_ok=True),
    "records_mixed_by_centering": dict(build=_seeded(Centering), refuse_ok=True),
    "custom_layer_mixes_records": dict(build=_seeded(MixingNet), refuse_ok=True),
    "frozen_layer_in_the_middle": dict(build=_seeded(FrozenMiddle)),
    "loss_reduction_sum": dict(build=_seeded(FrozenMiddle), loss_reduction="sum",
                               loss=lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum")),
}


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_attack(name, mode):
    check_case(Case(name=f"{name}[{mode}]", mode=mode, **COMMON, **CASES[name]), replace=True)


def test_records_mixed_by_centering_must_be_refused():
    """The per-record reference of a model that mixes records is not the gradient of any
    per-record loss, so "equal to the reference" cannot make it private: removing one record
    moves every other record's gradient. Only a refusal is correct."""
    case = Case(name="centering", build=_seeded(Centering), **COMMON, refuse_ok=True)
    assert check_case(case).refused, "a model centring activations over the batch was not refused"


def test_one_record_against_the_empty_batch():
    """Poisson batches can be empty: B = {x} against B' = {} (the same engine, one step each)
    moves the sum by at most C, and the empty step's sum is exactly zero."""
    x, y = _seq()[1:2], COMMON["target"][1:2]  # the scaled-up record
    sums = []
    for xb, yb in ((x, y), (x[:0], y[:0])):
        model = _seeded(FrozenMiddle)()
        params = [p for p in model.parameters() if p.requires_grad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private, opt, _ = PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(params, lr=0.1),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=1), noise_multiplier=0.0,
                max_grad_norm=1.0, poisson_sampling=False)
        opt.zero_grad()
        nn.functional.cross_entropy(private(xb), yb, reduction="sum").backward()
        opt.step()
        sums.append({n: torch.zeros_like(p) if p.grad is None else p.grad.double()
                     for n, p in model.named_parameters() if p.requires_grad})
    assert flat_norm(sums[1]) == 0.0, f"the empty batch's clipped sum is {flat_norm(sums[1]):.3e}, not 0"
    delta = flat_norm({n: sums[0][n] - sums[1][n] for n in sums[0]})
    assert delta <= 1.0 + 1e-9, f"one record against the empty batch: {delta:.4f} C"


def test_nonfinite_record_dropped():
    """nonfinite="drop": a record with a NaN gradient contributes nothing (its neighbour without
    it has the same sum), the others are clipped as usual."""
    model64 = _seeded(FrozenMiddle)()
    x = _seq()
    x[3, 0, 5] = float("nan")
    case = Case(name="nan_drop", build=lambda: model64, inputs=(x,), target=COMMON["target"],
                make={"nonfinite": "drop"})
    from tests.privacy.sensitivity._harness import engine_sums, lowered, select

    got = engine_sums(case, lowered(case, model64), (x,), case.target)
    keep = [0, 1, 2, 4, 5]
    xk, yk = select(case, (x,), case.target, keep)
    want, _ = clip_and_sum(case, per_record_grads(case, model64, xk, yk))
    err = flat_norm({n: got[n] - want[n] for n in want})
    assert err <= 1e-6 * case.C, f"dropping the NaN record: sum off the reference of the others by {err:.3e}"


def test_poisson_loader_sum_is_grad_times_expected_batch_size():
    """Through make_private's Poisson loader the denominator is q N, not the batch's size: the
    clipped sum p.grad * q N equals the reference of the records actually sampled."""
    torch.manual_seed(0)
    model64 = _seeded(FrozenMiddle)()
    data = TensorDataset(_seq().repeat(4, 1, 1), torch.arange(24) % K)
    engine = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _seeded(FrozenMiddle)()
        private, opt, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
            data_loader=DataLoader(data, batch_size=6), noise_multiplier=0.0, max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(3))
    x, y = next(iter(loader))
    assert 0 < len(y) != loader.expected_batch_size  # the case where the two differ
    opt.zero_grad()
    nn.functional.cross_entropy(private(x), y).backward()
    opt.step()
    got = {n: p.grad.double() * opt.expected_batch_size for n, p in model.named_parameters() if p.requires_grad}
    case = Case(name="poisson", build=lambda: model64, inputs=(x,), target=y)
    want, norms = clip_and_sum(case, per_record_grads(case, model64, (x,), y))
    err = flat_norm({n: got[n] - want[n] for n in want}) / float(norms.sum())
    assert err <= 1e-6, f"Poisson step: p.grad * qN off the sampled records' reference by {err:.3e}"

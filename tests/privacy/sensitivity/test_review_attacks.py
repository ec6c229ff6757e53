"""Review attacks on the records probe and the capture (issue 14 review), each measured before
its fix (C = 1, float64 unless said; ||Delta|| = the clipped sum's move when one record goes):

- mixing among records the probe did not perturb (it perturbed records B//2 and B-1 only): a
  swap of records 0 and 1 inside a layer 1.12 C, centring the first half of the batch 1.41 C,
  a backward-only swap of gradient rows 0 and 1 1.93 C, an index_add 1.21 C. The probe now
  tests groups of records (each bit of the index and its complement: records.groups);
- a layer called after the private forward returned (never probed): 1.93 C; now refused;
- a mixing below the forward's rounding tolerance with an O(1) gradient: 5.13 C (float32
  4.30 C); the probe now compares output-gradient rows too;
- a mixing of the records of a second input (the probe perturbed the first input only): 2.81 C;
- a forward writing a record into a frozen parameter or (through .data) a buffer: released
  exactly, without noise; now refused.

Open issues (these tests fail today; see each docstring): two sampled batches concatenated
into one step; a model that mixes records only at other batch sizes than the probed one.
Each test runs one or two steps of at most 400 records (the file: < 20 s)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppml_fast.privacy.records import groups
from tests.privacy.sensitivity._harness import Case, check_case, scaled

B, T, D, K = 6, 2, 16, 3


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, K)


def _swap01(n: int) -> torch.Tensor:
    p = torch.arange(n)
    if n > 1:
        p[0], p[1] = 1, 0
    return p


class SwapPair(_Two):
    """fc2 sees records 0 and 1 swapped (its outputs swapped back): rows 0, 1 are not records."""

    def forward(self, x):
        p = _swap01(x.shape[0])
        return self.head(torch.tanh(self.fc1(x) + self.fc2(x[p])[p]).mean(1))


class SwapAllButProbed(_Two):
    """Every pair of records swapped in fc2 except records B//2 and B-1 (the old probe's)."""

    def forward(self, x):
        b = x.shape[0]
        free = [i for i in range(b) if i not in (b // 2, b - 1)]
        p = torch.arange(b)
        for i, j in zip(free[0::2], free[1::2]):
            p[i], p[j] = j, i
        return self.head(torch.tanh(self.fc1(x) + self.fc2(x[p])[p]).mean(1))


class PartialCenter(_Two):
    """Activations centred over the first half of the batch only."""

    def forward(self, x):
        h, m = self.fc1(x), x.shape[0] // 2
        h = torch.cat([h[:m] - h[:m].mean(0, keepdim=True), h[m:]])
        return self.head(torch.tanh(h).mean(1))


class _SwapGrad01(torch.autograd.Function):
    """Identity forward; backward swaps the gradient rows of records 0 and 1."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g[_swap01(g.shape[0])]


class BackwardOnlyMix(_Two):
    def forward(self, x):
        return self.head(torch.tanh(_SwapGrad01.apply(self.fc1(x))).mean(1))


class IndexAdd(_Two):
    """Row 0 of the activations is record 0's plus record 1's (index_add), row 1 record 1's."""

    def forward(self, x):
        h = self.fc1(x)
        if x.shape[0] < 2:
            return self.head(torch.tanh(h).mean(1))
        idx = torch.arange(x.shape[0])
        idx[1] = 0
        out = torch.zeros_like(h).index_add(0, idx, h) + torch.zeros_like(h).index_add(
            0, torch.tensor([1]), h[1:2])
        return self.head(torch.tanh(out).mean(1))


def _build(cls):
    def build():
        torch.manual_seed(0)
        return cls().double()
    return build


def _batch():
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = scaled(scaled(x, 0, 30.0), 1, 1e-2)  # record 0 large, record 1 small
    return (x,), torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("cls", [SwapPair, SwapAllButProbed, PartialCenter, BackwardOnlyMix, IndexAdd],
                         ids=lambda c: c.__name__)
def test_mixing_outside_the_probed_records_is_refused(cls):
    inputs, target = _batch()
    case = Case(name=cls.__name__, build=_build(cls), inputs=inputs, target=target,
                adversarial=(0, 1), refuse_ok=True)
    out = check_case(case, replace=True)  # asserts the bound when not refused
    assert out.refused is not None, f"{cls.__name__}: not refused (sensitivity {out.ratio:.3f} C)"
    assert "rows are not records" in out.refused or "changed when only" in out.refused, out.refused


@pytest.mark.parametrize("size", [2, 3, 5, 6, 8, 17, 64])
def test_groups_separate_every_pair_of_records(size):
    """For every i != j some group holds i and not j (what makes the probe complete)."""
    gs = [set(g) for g in groups(size)]
    assert len(gs) <= 2 * max(1, (size - 1).bit_length())
    for i in range(size):
        for j in range(size):
            if i != j:
                assert any(i in g and j not in g for g in gs), (size, i, j)


def _private(model, data, **kw):
    import warnings

    from torch.utils.data import DataLoader

    from ppml_fast.privacy import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            data_loader=DataLoader(data, batch_size=kw.pop("batch_size", B)), noise_multiplier=0.0,
            max_grad_norm=1.0, **kw)


class _Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        return torch.tanh(self.fc1(x))


@pytest.mark.parametrize("outside", ["plain", "centred", "rolled"])
def test_layer_called_after_the_forward_returned_is_refused(outside):
    """``private.module.head(f(private(x)))``: the head's call is captured but never probed (the
    probe runs the model's forward only), so any mix of records reached it. Measured before the
    fix (B = 6, record 0 scaled by 50, C = 1): head(h - h.mean(0)) 1.21 C, head(h.roll(1, 0))
    1.93 C. Now every call captured while no forward of the private model runs (and autograd
    is not recomputing a checkpoint) is refused at the step, before any parameter changes."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from ppml_fast.privacy import PrivacyEngine, PrivacyError

    mix = {"plain": lambda h: h, "centred": lambda h: h - h.mean(0), "rolled": lambda h: h.roll(1, 0)}[outside]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)[:, 0]
    x[0] *= 50
    y = torch.randint(0, K, (B,), generator=g)
    torch.manual_seed(0)
    model = _Features().double()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=B), noise_multiplier=0.0,
            max_grad_norm=1.0, poisson_sampling=False)
    opt.zero_grad()
    nn.functional.cross_entropy(private.module.head(mix(private(x))), y).backward()
    with pytest.raises(PrivacyError, match="called outside the forward"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))



class HiddenInRounding(nn.Module):
    """A mixing of records too small to see in the forward values (eps, below the probe's
    rounding tolerance) whose gradient is O(1): each record's gradient has a phase set by the
    other records' activations (detached, so no autograd path shows it either)."""

    EPS = {torch.float64: 1e-13, torch.float32: 1e-8}

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)
        self.register_buffer("w", torch.randn(D, K))

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        eps = self.EPS[h.dtype]
        m = h.detach().mean(0).sum() if x.shape[0] > 1 else h.detach().sum() * 0
        return self.head(h) + eps * torch.sin((h @ self.w + 10 * m) / eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mixing_hidden_below_the_forward_tolerance_is_refused(dtype):
    """Measured before the output-gradient comparison (B = 8, C = 1, ghost): 5.13 C in float64,
    4.30 C in float32 (with D = 8: 2.14 C and 3.49 C, materialize alike)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (8,), generator=g)
    case = Case(name=f"hidden[{dtype}]", build=_build(HiddenInRounding), inputs=(x,), target=y,
                adversarial=(0, 1, 2), dtype=dtype, refuse_ok=True)
    out = check_case(case)
    assert out.refused is not None, f"not refused (sensitivity {out.ratio:.3f} C)"
    assert "output gradient" in out.refused, out.refused



class TwoInputs(nn.Module):
    """``forward(w, x)``: the records of ``x`` mixed through a detached mean (no autograd path),
    while the probe perturbed only the first input tensor ``w``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, w, x):
        h = torch.tanh(self.fc1(x))
        m = h.detach().mean(0, keepdim=True) if x.shape[0] > 1 else h.detach() * 0
        return self.head(h + 3 * m) * w[:, None]


@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keywords"])
def test_mixing_in_a_second_input_is_refused(keywords):
    """Measured before every per-record input was perturbed (B = 8, record 0 scaled by 10):
    2.81 C, positional or keyword inputs alike."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, D, generator=g, dtype=torch.float64)
    x[0] *= 10
    w = torch.ones(8, dtype=torch.float64)
    y = torch.randint(0, K, (8,), generator=g)
    case = Case(name="two_inputs", build=_build(TwoInputs), inputs={"w": w, "x": x} if keywords else (w, x),
                target=y, adversarial=(0,), refuse_ok=True)
    out = check_case(case)
    assert out.refused is not None, f"not refused (sensitivity {out.ratio:.3f} C)"



class Stash(nn.Module):
    """Writes record 0's features into a frozen parameter or a buffer during the forward (after
    computing its output, so the outputs do not show it): released with the model, no noise."""

    def __init__(self, how: str):
        super().__init__()
        self.fc, self.how = nn.Linear(D, K), how
        self.frozen = nn.Parameter(torch.zeros(D), requires_grad=False)
        self.register_buffer("buf", torch.zeros(D))

    def forward(self, x):
        out = self.fc(x)
        with torch.no_grad():
            {"frozen": lambda: self.frozen.copy_(x[0]),
             "frozen_data": lambda: self.frozen.data.copy_(x[0]),
             "buffer_data": lambda: self.buf.data.copy_(x[0])}[self.how]()
        return out


@pytest.mark.parametrize("how", ["frozen", "frozen_data", "buffer_data"])
def test_state_written_by_the_forward_is_refused(how):
    """Before: all three steps were taken and the tensor held record 0's features exactly (the
    forward's version check covered buffers only, and a write through .data bumps no version
    counter). Now parameters are version-checked too and the probe compares a random
    projection of every parameter and buffer before and after its forwards."""
    from torch.utils.data import TensorDataset

    from ppml_fast.privacy import PrivacyError

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, D, generator=g), torch.randint(0, K, (6,), generator=g)
    torch.manual_seed(0)
    model = Stash(how)
    private, opt, _ = _private(model, TensorDataset(x, y), batch_size=6, poisson_sampling=False)
    opt.zero_grad()
    nn.functional.cross_entropy(private(x), y).backward()
    with pytest.raises(PrivacyError, match="wrote to its parameter|were updated during a private"):
        opt.step()


# -- open issues (fail today; not fixed in this review: see the report) --------------------------
def test_two_sampled_batches_concatenated_into_one_step_are_refused():
    """DESIGN.md invariant 1: "a record that appears in two sampled batches before one step is
    either refused or accounted as such". ``priv(torch.cat([b1, b2]))`` after drawing two
    Poisson batches is one step to the accountant (rate q) while it holds two samplings (a
    record in both is in the step twice: up to 2 C). Today the step is taken (the optimizer's
    _check_one_sampled_batch looks only at steps after a skipped step). A check that keeps
    prefetching loops working: the step's record count must be the size of one batch yielded
    since the last step."""
    from torch.utils.data import TensorDataset

    from ppml_fast.privacy import PrivacyError

    torch.manual_seed(0)
    n = 400
    data = TensorDataset(torch.randn(n, D, dtype=torch.float64), torch.randint(0, K, (n,)))
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, K)).double()
    private, opt, loader = _private(model, data, batch_size=40, generator=torch.Generator().manual_seed(1))
    it = iter(loader)
    (x1, y1), (x2, y2) = next(it), next(it)
    opt.zero_grad()
    nn.functional.cross_entropy(private(torch.cat([x1, x2])), torch.cat([y1, y2])).backward()
    with pytest.raises(PrivacyError):
        opt.step()


class _SizeDependent(nn.Module):
    """Mixes records (centring over the batch) only for batches of other sizes than 8."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        h = self.fc1(x)
        mix = x.shape[0] not in (1, 8)
        return self.head(torch.tanh(h - h.mean(0, keepdim=True)) if mix else torch.tanh(h))


@pytest.mark.xfail(strict=True, reason=(
    "documented trust assumption (README security notes, records.py): the records probe runs once "
    "per input layout, and the layout leaves the batch size out (one probe per Poisson batch size "
    "would cost ~2 log2(B) extra forwards and backwards at ~6 sqrt(qN) distinct sizes); a model "
    "whose code mixes records only at other batch sizes is caught by check_sensitivity, not by "
    "the engine. strict: fails the suite once the engine catches it, so that the marker goes"))
def test_mixing_that_depends_on_the_batch_size_is_refused():
    """The probe runs once per input layout, and the layout leaves out the batch size: a model
    whose records mix only at other batch sizes than the first batch's (Poisson batch sizes
    vary from step to step) passes it. Measured: first batch of 8 probed, then a step on 8 vs 7
    records (record 0 scaled by 20): ||Delta|| = 5.67 C. A new batch size could be probed
    again (the layout key keeps the size), at the cost of one probe per distinct size."""
    from torch.utils.data import TensorDataset

    from ppml_fast.privacy import PrivacyError

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, D, generator=g, dtype=torch.float64)
    x[0] *= 20
    y = torch.randint(0, K, (8,), generator=g)
    first = (torch.randn(8, D, generator=g, dtype=torch.float64), torch.randint(0, K, (8,), generator=g))
    torch.manual_seed(0)
    model = _SizeDependent().double()
    private, opt, _ = _private(model, TensorDataset(x, y), batch_size=8, poisson_sampling=False)
    for xb, yb in (first, (x[1:], y[1:])):
        opt.zero_grad()
        nn.functional.cross_entropy(private(xb), yb).backward()
        if xb.shape[0] == 8:
            opt.step()
    with pytest.raises(PrivacyError):
        opt.step()

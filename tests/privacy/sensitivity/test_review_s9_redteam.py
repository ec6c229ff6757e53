"""Review S9 (red team): models and training loops outside the earlier suites, measured with one
DP step at noise 0 (C = 1, float64; ||Delta|| = the clipped sum's move when one record is removed,
bound C, or replaced, bound 2 C). Each either holds the bound / is refused before any parameter
changes, or is an open bug marked ``xfail(strict=True)`` with its measured number:

Open (the records probe or the capture misses them; each test's docstring has the repro):
- batch_first=False with a (B, K) classifier output: the probe takes dim 1 as the record dim of
  every output of rank >= 2, finds no per-record output, and skips its output and gradient
  checks: ``emb(ids)[0, 0]`` broadcast to every record 1.74 C (refused under batch_first=True);
  a backward-only row swap 2.23 C; a (K, B) output under batch_first=True 2.26 C;
- per-record tensors inside a dataclass argument are never perturbed by the probe: 2.79 C;
- a non-tensor argument (``model(x, center=True)``) is not part of the probed layout: 2.50 C;
- physical batches of one record are never probed: state kept across forwards in a plain
  attribute (an EMA) mixes the records of a logical batch: 3.62 C on replacing one (bound 2 C);
- an auxiliary loss returned as a 0-dim output (Switch-style load balancing over the batch's
  router probabilities): 1.69 C;
- a torch.func-path layer given a constant buffer that has B rows by coincidence: the rerun
  splits it row by row (the output check cannot see a dependence the forward values hide): 1.55 C;
- ``torch.autograd.grad(..., create_graph=True)`` inside the step (an input-gradient penalty): the
  capture's sinks also record that pass's output gradients, which the mean loss's scale B then
  multiplies: 1.04 C.

Covered here, holding: old-style ``nn.utils.weight_norm`` / ``spectral_norm`` and
``torch.nn.utils.parametrize`` registered after make_private (also after a step) on a Linear are
refused with no gradient left in ``.grad``; nn.Bilinear + nn.PReLU and nn.ConvTranspose2d +
InstanceNorm2d(affine) match the reference; records passed as a list of tensors are refused; a
forward pre-hook or a BatchNorm added before the first forward is refused; an input the capture
cannot see (a dataclass) releases a zero gradient, never the unclipped one.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import BatchMemoryManager, PrivacyEngine, PrivacyError
from tests.privacy.sensitivity._harness import Case, check_case, engine_sums, flat_norm, scaled, select

B, T, D, K = 6, 2, 16, 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _seeded(cls, *args):
    def build():
        torch.manual_seed(0)
        return cls(*args).double()
    return build


def _x(t=T):
    x = torch.randn(B, t, D, generator=_gen(1), dtype=torch.float64)
    return scaled(scaled(x, 0, 30.0), 1, 1e-2)  # record 0 large, record 1 small


Y = torch.randint(0, K, (B,), generator=_gen(9))


def _private(model, b=B, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(torch.arange(b)), batch_size=b),
            noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, **kw)


def _sums(model, b=B):
    return {n: p.grad.double() * b for n, p in model.named_parameters() if p.requires_grad}


def _delta(a, b):
    return flat_norm({n: a[n] - b[n] for n in a})


class _SwapGrad01(torch.autograd.Function):
    """Identity forward; backward swaps the gradient rows of records 0 and 1."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        p = torch.arange(g.shape[0])
        if g.shape[0] > 1:
            p[0], p[1] = 1, 0
        return g[p]


# -- 1. outputs whose record dimension the probe does not find -----------------------------------
class SeqFirstBroadcast(nn.Module):
    """A seq-first classifier ((T, B) ids -> (B, K)) with an indexing slip: the 'first token'
    bias reads ``bias_emb(ids)[0, 0]`` (record 0's) and broadcasts it to every record."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.bias_emb = nn.Embedding(20, D), nn.Linear(D, K), nn.Embedding(20, K)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)).mean(0)) + self.bias_emb(ids)[0, 0]


class BatchFirstBroadcast(SeqFirstBroadcast):
    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)).mean(1)) + self.bias_emb(ids)[0, 0]


class SeqFirstBackwardMix(nn.Module):
    """(T, B, D) -> (B, K) with a backward-only swap of records 0 and 1 (refused batch first:
    test_review_attacks.BackwardOnlyMix)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        return self.head(_SwapGrad01.apply(torch.tanh(self.fc1(x)).mean(0)))


class TransposedBackwardMix(nn.Module):
    """Batch first, the same swap, logits returned as (K, B)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        return self.head(torch.tanh(_SwapGrad01.apply(self.fc1(x))).mean(1)).T


def _ids():
    return torch.randint(0, 20, (B, 3), generator=_gen(2))


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_broadcast_row_batch_first_is_refused(mode):
    """The control of the next test: the same slip under batch_first=True is refused."""
    case = Case(name="bf_broadcast", build=_seeded(BatchFirstBroadcast), inputs=(_ids(),), target=Y,
                adversarial=(0, 1), refuse_ok=True, mode=mode)
    out = check_case(case, replace=True)
    assert out.refused is not None and "bias_emb" in out.refused, out


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_broadcast_row_seq_first_is_refused(mode):
    case = Case(name="sf_broadcast", build=_seeded(SeqFirstBroadcast), inputs=(_ids().T.contiguous(),),
                target=Y, adversarial=(0, 1), refuse_ok=True, mode=mode, record_dim=1, batch_first=False)
    out = check_case(case, replace=True)  # today: AssertionError, 1.7418 x the bound
    assert out.refused is not None, out


@pytest.mark.parametrize("layout", ["seq_first_BK", "batch_first_KB"])
def test_backward_only_mix_with_unrecognised_output_is_refused(layout):
    if layout == "seq_first_BK":
        case = Case(name=layout, build=_seeded(SeqFirstBackwardMix), inputs=(_x().transpose(0, 1).contiguous(),),
                    target=Y, adversarial=(0, 1), refuse_ok=True, record_dim=1, batch_first=False)
    else:
        case = Case(name=layout, build=_seeded(TransposedBackwardMix), inputs=(_x(),), target=Y,
                    adversarial=(0, 1), refuse_ok=True, loss=lambda out, y: nn.functional.cross_entropy(out.T, y))
    out = check_case(case, replace=True)
    assert out.refused is not None, out


# -- 2. records the probe does not perturb -------------------------------------------------------
@dataclasses.dataclass
class Extra:
    feats: torch.Tensor


class HiddenRecords(nn.Module):
    """``forward(x, Extra(feats))``: the records of ``feats`` are mixed (batch mean)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, extra):
        h = torch.tanh(self.fc1(x.mean(1) + extra.feats))
        return self.head(h + 3 * extra.feats.mean(0, keepdim=True))


def test_records_inside_a_dataclass_argument_are_probed():
    feats = torch.randn(B, D, generator=_gen(3), dtype=torch.float64)
    feats[0] *= 20
    case = Case(name="dataclass_arg", build=_seeded(HiddenRecords), inputs=(_x(), feats), target=Y,
                adversarial=(0,), refuse_ok=True,
                forward_loss=lambda m, inp, y: nn.functional.cross_entropy(m(inp[0], Extra(inp[1])), y))
    out = check_case(case, replace=True)  # today: AssertionError, 2.7851 x the bound
    assert out.refused is not None, out


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, center=False):
        h = self.fc1(x.mean(1))
        if center:
            h = h - h.mean(0, keepdim=True)
        return self.head(torch.tanh(h))


def _flagged_sums(batches):
    model = _seeded(Flagged)()
    private, opt, _ = _private(model)
    for x, y, kw in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(private(x, **kw), y).backward()
        opt.step()
    return _sums(model)


def test_non_tensor_argument_mixing_on_the_first_batch_is_refused():
    """Control: ``center=True`` on the first batch is refused by the probe."""
    with pytest.raises(PrivacyError, match="rows are not records"):
        _flagged_sums([(_x(), Y, {"center": True})])


def test_non_tensor_argument_is_part_of_the_probed_layout():
    warm = (torch.randn(B, T, D, generator=_gen(4), dtype=torch.float64), Y, {"center": False})
    x = _x()
    try:
        full = _flagged_sums([warm, (x, Y, {"center": True})])
    except PrivacyError:
        return  # refused: what a fix does
    other = _flagged_sums([warm, (x[1:], Y[1:], {"center": True})])
    assert _delta(full, other) <= 1.0 + 1e-9, f"record 0 removed: {_delta(full, other):.4f} C"


# -- 3. state across forwards, physical batches of one ------------------------------------------
class PlainEMA(nn.Module):
    """A running mean of the activations kept in a plain tensor attribute (not a buffer: the
    engine's buffer checks do not see it), subtracted in the forward."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)
        self.stat = torch.zeros(D, dtype=torch.float64)

    def forward(self, x):
        h = self.fc(x)
        out = self.head(torch.tanh(h - self.stat).mean(1))
        self.stat = 0.5 * self.stat + 0.5 * h.detach().mean((0, 1))
        return out


def _ema_sums(x, chunk):
    model = _seeded(PlainEMA)()
    private, opt, _ = _private(model)
    with BatchMemoryManager(data_loader=DataLoader(TensorDataset(x, Y), batch_size=B),
                            max_physical_batch_size=chunk, optimizer=opt) as physical:
        for xb, yb in physical:
            opt.zero_grad()
            nn.functional.cross_entropy(private(xb), yb).backward()
            opt.step()
    return _sums(model)


def test_state_across_forwards_with_physical_batches_of_two_is_refused():
    """Control: with physical batches of two the probe sees the state move between its runs."""
    with pytest.raises(PrivacyError, match="rows are not records|changed when only|run twice"):
        _ema_sums(_x(), 2)


def test_state_across_forwards_with_physical_batches_of_one():
    x = _x()
    xr = x.clone()
    xr[0] = -3 * x[0]
    try:
        a = _ema_sums(x, 1)
        b = _ema_sums(xr, 1)
    except PrivacyError:
        return
    assert _delta(a, b) <= 2.0 + 1e-9, f"record 0 replaced: {_delta(a, b):.4f} C"


# -- 4. auxiliary outputs, shared tensors, second backward passes --------------------------------
class MoEAux(nn.Module):
    """Two experts and a router; the Switch-style load-balancing loss over the batch's router
    probabilities is returned as a second, 0-dim output (as Hugging Face MoE models do)."""

    def __init__(self):
        super().__init__()
        self.router, self.e1, self.e2 = nn.Linear(D, 2), nn.Linear(D, K), nn.Linear(D, K)

    def forward(self, x):
        h = x.mean(1)
        p = torch.softmax(self.router(h), -1)
        aux = 2 * (p.mean(0) ** 2).sum()
        return p[:, :1] * self.e1(h) + p[:, 1:] * self.e2(h), aux


def test_batch_level_auxiliary_output_is_refused():
    def loss(model, inp, y):
        logits, aux = model(*inp)
        return nn.functional.cross_entropy(logits, y) + 10 * aux

    case = Case(name="moe_aux", build=_seeded(MoEAux), inputs=(_x(),), target=Y, adversarial=(0, 1),
                refuse_ok=True, forward_loss=loss)
    out = check_case(case, replace=True)  # today: AssertionError, 1.6947 x the bound
    assert out.refused is not None, out


class Gate(nn.Module):
    """A layer no rule knows (torch.func path) given a constant table; the table's mean enters
    only the gradient of ``w`` (a detach pair: the forward value does not change)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D))

    def forward(self, h, table):
        m = self.w * table.mean()
        return h * self.w + (m - m.detach()).sum()


class SharedTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.head = Gate(), nn.Linear(D, K)
        self.register_buffer("table", torch.randn(B, 4) * 5)  # B rows: not records

    def forward(self, x):
        return self.head(torch.tanh(self.gate(x.mean(1), self.table)))


def test_constant_with_batch_size_rows_in_a_torch_func_layer():
    """fallback.per_sample_grads took every input leaf with B rows as per record: record i's
    rerun saw table[i] instead of the table, and _check_same (forward values) could not see it:
    1.55 C. Now the per-record gradients must be the rows of one batch rerun's gradient
    (fallback._check_sum, a random combination): refused."""
    case = Case(name="shared_table", build=_seeded(SharedTable), inputs=(_x(),), target=Y, adversarial=(0, 1),
                refuse_ok=True)
    check_case(case, replace=True)  # today: AssertionError, 1.5533 x the bound


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(x)).mean(1))


def _gradient_penalty(model, inp, y):
    x = inp[0].clone().requires_grad_(True)
    out = model(x)
    gx, = torch.autograd.grad(out.logsumexp(-1).sum(), x, create_graph=True)
    return nn.functional.cross_entropy(out, y) + gx.pow(2).sum() / len(y)


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_input_gradient_penalty_keeps_the_bound(mode):
    """torch.autograd.grad(..., create_graph=True) of a penalty through the private forward: its
    output gradients reached the capture's sinks and were added to the mean loss's, then scaled
    by the batch size, so a record's clipped gradient depended on B (1.04 C). Now the batch is
    refused at the step (capture.graph_building)."""
    x = scaled(torch.randn(B, T, D, generator=_gen(1), dtype=torch.float64), 0, 30.0)
    case = Case(name="gp", build=_seeded(Mlp), inputs=(x,), target=Y, forward_loss=_gradient_penalty, mode=mode)
    try:
        full = engine_sums(case, case.build(), (x,), Y)
        worst = 0.0
        for j in range(B):
            xs, ys = select(case, (x,), Y, [i for i in range(B) if i != j])
            worst = max(worst, _delta(full, engine_sums(case, case.build(), xs, ys)))
    except PrivacyError:
        return
    assert worst <= 1.0 + 1e-9, f"one record removed: {worst:.4f} C"


# -- 5. holding: refusals and layers not covered before -------------------------------------------
class _Sym(nn.Module):
    def forward(self, w):
        return w + w.T


PARAMETRIZATIONS = {
    "old_weight_norm": lambda m: nn.utils.weight_norm(m.fc1),
    "old_spectral_norm": lambda m: nn.utils.spectral_norm(m.fc1),
    "parametrizations_spectral_norm": lambda m: nn.utils.parametrizations.spectral_norm(m.fc1),
    "parametrizations_orthogonal": lambda m: nn.utils.parametrizations.orthogonal(m.fc1),
    "parametrize_symmetric": lambda m: parametrize.register_parametrization(m.fc1, "weight", _Sym()),
}


@pytest.mark.parametrize("after_a_step", [False, True])
@pytest.mark.parametrize("name", sorted(PARAMETRIZATIONS))
def test_reparametrized_linear_after_make_private_is_refused(name, after_a_step):
    """A Linear re-parametrized after make_private computes with a tensor derived from its
    trainable parameters: its gradient reaches them outside the rule's call. Refused at the step,
    nothing changed, and no unclipped gradient left in ``.grad``."""
    x = _x()
    model = _seeded(Mlp)()
    private, opt, _ = _private(model)
    if after_a_step:
        opt.zero_grad()
        nn.functional.cross_entropy(private(x), Y).backward()
        opt.step()
    PARAMETRIZATIONS[name](model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    nn.functional.cross_entropy(private(x), Y).backward()
    with pytest.raises(PrivacyError, match="outside every call"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is None or not bool(p.grad.any()), f"{n}: an unclipped gradient in .grad"


def test_old_weight_norm_before_make_private_is_refused():
    """nn.utils.weight_norm (the pre-hook one; parametrize is refused at make_private) on a Linear
    given to make_private: refused at the step, nothing changed."""
    torch.manual_seed(0)
    model = Mlp().double()
    nn.utils.weight_norm(model.fc1)
    private, opt, _ = _private(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    nn.functional.cross_entropy(private(_x()), Y).backward()
    with pytest.raises(PrivacyError, match="weight_g"):
        opt.step()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


class BilinearPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil, self.act, self.head = nn.Bilinear(D, D, 4), nn.PReLU(4), nn.Linear(4, K)

    def forward(self, x):
        return self.head(self.act(self.bil(x[:, 0], x[:, 1])))


class ConvTransposeInstanceNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.ct = nn.ConvTranspose2d(2, 3, 3, stride=2, dilation=2)
        self.norm = nn.InstanceNorm2d(3, affine=True)
        self.head = nn.Linear(3, K)

    def forward(self, x):
        return self.head(self.norm(self.ct(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("name", ["bilinear_prelu", "conv_transpose_instance_norm"])
def test_layers_without_earlier_coverage(name, mode):
    if name == "bilinear_prelu":
        build, inputs = _seeded(BilinearPReLU), (_x(),)
    else:
        img = scaled(torch.randn(B, 2, 4, 4, generator=_gen(5), dtype=torch.float64), 0, 100.0)
        build, inputs = _seeded(ConvTransposeInstanceNorm), (img,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warnings on Bilinear's backward
        check_case(Case(name=f"{name}[{mode}]", build=build, inputs=inputs, target=Y, adversarial=(0, 1),
                        mode=mode), replace=True)


class ListOfRecords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, xs):
        return self.head(torch.stack([torch.tanh(self.fc(t)).mean(0) for t in xs]))


@pytest.mark.parametrize("lengths", ["equal", "variable"])
def test_records_as_a_list_of_tensors_are_refused(lengths):
    """``model([x_0, ..., x_{B-1}])``: the first tensor's rows (tokens) are taken as the batch;
    the head's input, which has B rows, then changes with them: refused, nothing changed."""
    g = _gen(6)
    xs = [torch.randn(4, D, generator=g, dtype=torch.float64) * (50 if i == 0 else 1) for i in range(B)]
    if lengths == "variable":
        xs = [t[: 2 + i % 3] for i, t in enumerate(xs)]
    model = _seeded(ListOfRecords)()
    private, opt, _ = _private(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    nn.functional.cross_entropy(private(xs), Y).backward()
    with pytest.raises(PrivacyError, match="not per record"):
        opt.step()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("change", ["forward_pre_hook", "batchnorm_inserted"])
def test_mixing_added_after_make_private_before_the_first_forward_is_refused(change):
    """A user's forward pre-hook centring the head's input over the batch, or a BatchNorm1d
    (affine=False, no running statistics: nothing refuses it at make_private) inserted after
    make_private: the first forward's probe sees the mixing."""
    model = _seeded(Mlp)()
    private, opt, _ = _private(model)
    if change == "forward_pre_hook":
        model.head.register_forward_pre_hook(lambda m, a: (a[0] - a[0].mean(0, keepdim=True),))
    else:
        model.fc1 = nn.Sequential(model.fc1, nn.BatchNorm1d(T, affine=False, track_running_stats=False).double())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    nn.functional.cross_entropy(private(_x()), Y).backward()
    with pytest.raises(PrivacyError, match="rows are not records"):
        opt.step()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


class DataclassInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, extra, more=None):
        x = extra if isinstance(extra, torch.Tensor) else extra.feats
        return self.head(torch.tanh(self.fc(x if more is None else x + more.feats)).mean(1))


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_records_in_a_dataclass_input_are_captured_and_clipped(mode):
    """``model(Extra(x))``: the only input is a dataclass. Before S9 no batch was captured (the
    model trained on noise alone, with the unclipped sum replaced); the dataclass's tensors are
    now inputs like any other: the step holds the float64 reference and the bound."""
    case = Case(name="dataclass_input", build=_seeded(DataclassInput), inputs=(_x(),), target=Y,
                adversarial=(0,), mode=mode,
                forward_loss=lambda m, inp, y: nn.functional.cross_entropy(m(Extra(inp[0])), y))
    out = check_case(case, replace=True)
    assert out.refused is None, out


class Holder:
    """Not a dataclass: an object the probe cannot rebuild with records perturbed."""

    def __init__(self, feats):
        self.feats = feats


def test_tensors_in_an_object_the_probe_cannot_reach_are_refused():
    model = _seeded(DataclassInput)()
    before = [p.detach().clone() for p in model.parameters()]
    private, opt, _ = _private(model)
    opt.zero_grad()
    with pytest.raises(PrivacyError, match="Holder.*cannot reach"):  # at the forward
        private(Holder(_x()))
    with pytest.raises(PrivacyError, match="Holder.*cannot reach"):  # beside a tensor: the probe
        nn.functional.cross_entropy(private(_x(), Holder(_x())), Y).backward()
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

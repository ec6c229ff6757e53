"""Shared and tied parameters, modules called twice, the model called twice on one batch,
activation checkpointing (reentrant and not), virtual batches, layers the torch.func path must
get right (tuple outputs, keyword arguments, an unrolled LSTMCell, parameters used outside their
module): each step's clipped sum equals the float64 per-record reference and one record moves it
by at most the bound, or the engine refuses before any parameter changes (``refuse_ok``, where
issue 14 allows it). Plus gradient accumulation over two sampled batches before one step."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent, RDPAccountant
from ppml_fast.privacy import PrivacyEngine, PrivacyError
from tests.privacy.sensitivity._harness import CANCEL_KAPPA, Case, check_case, default_loss, scaled, with_cancellation

B, T, D, K, V = 6, 2, 16, 3, 12
MODES = ("ghost", "materialize")
CLIPPINGS = ("flat", "per_layer", "automatic")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _seeded(cls, *args):
    def build():
        torch.manual_seed(0)
        return cls(*args).double()
    return build


class TiedLM(nn.Module):
    """Embedding tied to the output layer (a language model's head)."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(V, D), nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.ln(self.emb(tokens)).mean(1))


class TwoLinearsOneWeight(nn.Module):
    """Two Linear modules sharing one weight (different biases)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, K)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))).mean(1))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))).mean(1))


class OutsideUse(nn.Module):
    """The parent multiplies by its child's weight (``x @ self.fc.weight.T``)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        return self.head((self.fc(x) + torch.tanh(x @ self.fc.weight.T)).mean(1))


class RootParameter(nn.Module):
    """A bare nn.Parameter on the root module."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)
        self.gain = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return self.head((self.fc(x) * self.gain).mean(1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.inp, self.block, self.head = nn.Linear(D, D), Block(), nn.Linear(D, K)

    def forward(self, x):
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h.mean(1))


class TupleOut(nn.Module):
    """A custom layer with its own parameter returning a tuple (torch.func path)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x):
        y = x * self.w
        return y, y.pow(2).sum(-1, keepdim=True)


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.t, self.head = TupleOut(), nn.Linear(D + 1, K)

    def forward(self, x):
        y, s = self.t(x)
        return self.head(torch.cat([torch.tanh(y), torch.tanh(s)], -1).mean(1))


class KwLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x, *, shift=0.0, gain=1.0):
        return torch.tanh(x * self.w * gain + shift)


class KwNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.k, self.head = KwLayer(), nn.Linear(D, K)

    def forward(self, x):
        return self.head(self.k(x, shift=0.5, gain=3.0).mean(1))


class Unrolled(nn.Module):
    """An nn.LSTMCell unrolled over the positions (its first state None)."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(D, 8), nn.Linear(8, K)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0])


def _two_views(model, inputs, target):
    """The whole model called twice on the same batch before one backward."""
    (x,) = inputs
    return default_loss(model(x), target) + default_loss(model(x.flip(1) * 0.5), target)


def _seq(seed=1):
    x = torch.randn(B, T, D, generator=_gen(seed), dtype=torch.float64)
    return with_cancellation(scaled(x, 1, 1e4), 2)


def _cases():
    tokens = torch.randint(0, V, (B, 5), generator=_gen(4))
    tokens[1] = 3  # repeated token
    seq = _seq()
    common = dict(inputs=(seq,), adversarial=(1, 2), kappa=CANCEL_KAPPA)
    return {
        "tied_embedding_head": dict(build=_seeded(TiedLM), inputs=(tokens,), adversarial=(1,)),
        "two_linears_one_weight": dict(build=_seeded(TwoLinearsOneWeight), **common),
        "module_called_twice": dict(build=_seeded(CalledTwice), **common),
        "virtual_batches_bmm": dict(build=_seeded(CalledTwice), chunk=4, **common),
        "checkpoint_nonreentrant": dict(build=_seeded(Checkpointed, False), **common),
        # issue 14 items 5 and 7: correct, or refused before any parameter changes
        "checkpoint_reentrant": dict(build=_seeded(Checkpointed, True), refuse_ok=True, **common),
        "checkpoint_reentrant_two_views": dict(build=_seeded(Checkpointed, True), forward_loss=_two_views,
                                               refuse_ok=True, **common),
        "two_views_one_backward": dict(build=_seeded(CalledTwice), forward_loss=_two_views, refuse_ok=True,
                                       **common),
        "parameter_used_outside_module": dict(build=_seeded(OutsideUse), refuse_ok=True, **common),
        "root_parameter": dict(build=_seeded(RootParameter), refuse_ok=True, **common),
        "torch_func_tuple_output": dict(build=_seeded(TupleNet), refuse_ok=True, **common),
        "torch_func_keyword_arguments": dict(build=_seeded(KwNet), refuse_ok=True, **common),
        "lstmcell_unrolled": dict(build=_seeded(Unrolled), refuse_ok=True, **common),
    }


CASES = _cases()


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_sharing_and_loops(name, mode, clipping):
    kw = dict(CASES[name])
    kw.setdefault("target", torch.randint(0, K, (B,), generator=_gen(9)))
    check_case(Case(name=f"{name}[{mode},{clipping}]", mode=mode, clipping=clipping, **kw),
               replace=(clipping == "flat"))


def test_two_sampled_batches_before_one_step_refused_or_accounted():
    """Gradient accumulation (issue 14 item 4): two Poisson batches before one step() include a
    record with probability 1 - (1 - q)^2, and a record in both contributes 2 C. Either refused
    (before any parameter changes) or accounted at least as one step of that rate (a necessary
    condition of a correct accounting)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)).double()
    data = TensorDataset(torch.randn(40, D, dtype=torch.float64), torch.randint(0, K, (40,)))
    engine = PrivacyEngine()
    private, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=10), noise_multiplier=1.0, max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    q = loader.sample_rate
    it = iter(loader)
    try:
        opt.zero_grad()
        for _ in range(2):
            x, y = next(it)
            default_loss(private(x), y).backward()
        opt.step()
    except PrivacyError:
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "refused after a change"
        return
    one_step = RDPAccountant().compose(PoissonSampledEvent(1 - (1 - q) ** 2, GaussianEvent(1.0)))
    want = one_step.get_epsilon(1e-5)
    got = engine.get_epsilon(1e-5)
    assert got >= want * (1 - 1e-6), (
        f"two sampled batches before one step accounted as epsilon {got:.4f} < {want:.4f}, the "
        f"epsilon of one step at rate 1-(1-q)^2 = {1 - (1 - q) ** 2:.4f} (q = {q})")

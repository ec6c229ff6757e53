"""Records, not rows (issue 14 items 1, 4, 5, 6, 8): every captured call's rows are tied to the
records of its forward, or the step is refused before anything changes; several forwards before
one step; a second engine on a private module; broadcast position ids."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.checkpoint import checkpoint

from ppml_fast import PrivacyEngine
from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.privacy import BatchMemoryManager
from ppml_fast.privacy.layers import UnsupportedModuleError

C = 1.0
F64 = torch.float64


def reference_sum(model, x, y, loss_fn, clip=C):
    """float64: sum over records of min(1, C/||g_i||) g_i, g_i the gradient of record i's loss."""
    model = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    xs = x.double() if x.is_floating_point() else x
    g = vmap(grad(one), in_dims=(None, 0, 0))(params, xs, y)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    f = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", f, v) for n, v in g.items()}


def engine(model, x, y, loss_fn, *, steps=1, **kw):
    """(engine, private model, optimizer) after one step on (x, y) with noise 0 and SGD lr 0."""
    eng = PrivacyEngine()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, _ = eng.make_private(module=model, optimizer=opt, data_loader=loader,
                                           noise_multiplier=0.0, max_grad_norm=C,
                                           poisson_sampling=False, loss_reduction="sum", **kw)
    return eng, private, opt


def step_sum(model, x, y, loss_fn, **kw):
    _, private, opt = engine(model, x, y, loss_fn, **kw)
    opt.zero_grad()
    loss_fn(private(x), y).backward()
    opt.step()
    return {n: p.grad.double() * len(x) for n, p in private.module.named_parameters() if p.requires_grad}


def assert_sums(got, want, tol=1e-5):
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=tol, atol=tol, msg=n)


def sum_loss(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum")


def unchanged(model, before):
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# -- item 1: rows that are not records ------------------------------------------------------
class TokenFlatten(nn.Module):
    """PointNet-style shared MLP: (B, T, d) -> (B*T, d) -> Linear -> back, then mean over T."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        b, t, d = x.shape
        h = self.shared(x.reshape(b * t, d)).relu().reshape(b, t, -1)
        return self.head(h.mean(1))


class BatchMix(nn.Module):
    """x - x.mean(0) mixes the records of a batch: per-sample gradients do not exist."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0, keepdim=True))


class SharedRowBroadcast(nn.Module):
    """pos(ids)[0] broadcast to every record: row 0 of the embedding call feeds all records."""

    def __init__(self, b):
        super().__init__()
        self.pos = nn.Embedding(6, 4)
        self.fc = nn.Linear(4, 3)
        self.b = b

    def forward(self, x):
        ids = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        return self.fc((x + self.pos(ids)[0]).mean(1))


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("make", [
    lambda: (TokenFlatten(), torch.randn(5, 3, 4)),
    lambda: (BatchMix(), torch.randn(5, 4)),
    lambda: (SharedRowBroadcast(5), torch.randn(5, 6, 4)),
], ids=["flatten", "batch-mix", "shared-row"])
def test_rows_that_are_not_records_are_refused_before_anything_changes(make, mode):
    torch.manual_seed(0)
    model, x = make()
    y = torch.randint(0, 3, (x.shape[0],))
    _, private, opt = engine(model, x, y, sum_loss, grad_sample_mode=mode)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    sum_loss(private(x), y).backward()
    with pytest.raises(UnsupportedModuleError, match=r"\((Linear|Embedding)\)|mixes the records"):
        opt.step()
    assert unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert opt.steps == 0


def _encoder(batch_first):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
    return nn.Sequential(layer)


@pytest.mark.parametrize("b,t", [(4, 6), (5, 5)], ids=["B!=T", "B==T"])
def test_sequence_first_encoder_under_batch_first_true_is_refused(b, t):
    model = _encoder(batch_first=False)  # torch's default: (T, B, d)
    x = torch.randn(t, b, 8)
    _, private, opt = engine(model, x, torch.zeros(t), lambda o, y: o.pow(2).sum())
    opt.zero_grad()
    private(x).pow(2).sum().backward()
    with pytest.raises(UnsupportedModuleError, match="self_attn|linear1|rows"):
        opt.step()


def test_sequence_first_encoder_with_batch_first_false_matches_reference():
    model = _encoder(batch_first=False)
    b, t = 5, 5
    x = torch.randn(t, b, 8).double()
    model = model.double()

    def loss(out, _):  # out (T, B', d): sum of squares, a sum over records
        return out.pow(3).sum()

    ref_model = copy.deepcopy(model)
    params = {n: p.detach() for n, p in ref_model.named_parameters()}

    def one(p, xi):
        return functional_call(ref_model, p, (xi.unsqueeze(1),)).pow(3).sum()

    g = vmap(grad(one), in_dims=(None, 1))(params, x)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    f = (C / (norms + 1e-6)).clamp(max=1.0)
    want = {n: torch.einsum("b,b...->...", f, v) for n, v in g.items()}
    assert bool((norms > C).any())
    for mode in ("ghost", "materialize"):
        m = copy.deepcopy(model)
        _, private, opt = engine(m, x.transpose(0, 1), torch.zeros(b), loss, grad_sample_mode=mode,
                                 batch_first=False)
        opt.zero_grad()
        loss(private(x), None).backward()
        opt.step()
        got = {n: p.grad * b for n, p in m.named_parameters()}
        assert_sums(got, want, tol=1e-8)


def test_probe_leaves_rng_buffers_and_grads_as_they_were():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.drop = nn.Dropout(0.5)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.fc(self.drop(x))

    torch.manual_seed(0)
    model = Noisy()
    plain = copy.deepcopy(model)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    _, private, opt = engine(model, x, y, sum_loss)
    torch.manual_seed(5)
    out = private(x)
    after = torch.rand(3)
    torch.manual_seed(5)
    want = plain(x)
    torch.testing.assert_close(out, want)  # same dropout mask as without the probe
    torch.testing.assert_close(after, torch.rand(3))  # the RNG stream continues as without it
    assert float(model.calls) == 1.0  # the probe's forwards were undone
    sum_loss(out, y).backward()
    with pytest.raises(UnsupportedModuleError, match="buffer"):  # updated by the forward itself
        opt.step()


# -- item 8: Hugging Face's default position_ids (1, T) ----------------------------------------
class PositionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        position_ids = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T), broadcast over records
        return self.fc((self.tok(ids) + self.pos(position_ids)).tanh().sum(1))


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_broadcast_position_ids_give_per_record_gradients(mode):
    torch.manual_seed(0)
    model = PositionModel()
    ids = torch.randint(0, 10, (6, 5))
    y = torch.randint(0, 3, (6,))
    want = reference_sum(model, ids, y, sum_loss)
    got = step_sum(model, ids, y, sum_loss, grad_sample_mode=mode)
    assert_sums(got, want)


# -- items 4 and 5: several forwards before one step ------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_two_sampled_batches_before_one_step_are_refused():
    model = _mlp()
    x, y = torch.randn(16, 4) * 5, torch.randint(0, 3, (16,))
    eng = PrivacyEngine()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    private, opt, dp_loader = eng.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)
    before = [p.detach().clone() for p in model.parameters()]
    it = iter(dp_loader)
    opt.zero_grad()
    for _ in range(2):  # gradient accumulation over two sampled batches
        bx, by = next(it)
        sum_loss(private(torch.cat([bx, x[:1]])), torch.cat([by, y[:1]])).backward()
    with pytest.raises(PrivacyError, match="BatchMemoryManager"):
        opt.step()
    assert unchanged(model, before) and opt.steps == 0 and len(eng.accountant.history) == 0


def test_skip_steps_across_two_sampled_batches_are_refused():
    model = _mlp()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    eng = PrivacyEngine()
    private, opt, dp_loader = eng.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4), noise_multiplier=1.0, max_grad_norm=C)
    it = iter(dp_loader)
    for i in range(2):
        bx, by = next(it)
        opt.zero_grad()
        sum_loss(private(torch.cat([bx, x[:1]])), torch.cat([by, y[:1]])).backward()
        if i == 0:
            opt.signal_skip_step(True)
            opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyError, match="sampled batches"):
        opt.step()
    assert unchanged(model, before) and opt.steps == 0


def test_batch_memory_manager_still_steps_once_per_sampled_batch():
    model = _mlp()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    eng = PrivacyEngine()
    private, opt, dp_loader = eng.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=32), noise_multiplier=1.0, max_grad_norm=C)
    with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=5, optimizer=opt) as bl:
        for bx, by in bl:
            opt.zero_grad()
            sum_loss(private(bx), by).backward()
            opt.step()
    assert opt.steps == len(dp_loader)


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(4, 8), nn.Linear(8, 3), reentrant

    def forward(self, x):
        if self.reentrant is None:  # the reference: the same function, not checkpointed
            return self.b(self.a(x).tanh())
        h = checkpoint(lambda t: self.a(t).tanh(), x, use_reentrant=self.reentrant)
        return self.b(h)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_checkpointing_one_forward_matches_reference(reentrant, mode):
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    x = (torch.randn(6, 4) * 3).requires_grad_(reentrant)  # reentrant needs an input with grad
    y = torch.randint(0, 3, (6,))
    plain = copy.deepcopy(model)
    plain.reentrant = None
    want = reference_sum(plain, x.detach(), y, sum_loss)
    got = step_sum(model, x, y, sum_loss, grad_sample_mode=mode)
    assert_sums(got, want)


def test_reentrant_checkpointing_two_forwards_before_one_backward_is_refused():
    torch.manual_seed(0)
    model = Checkpointed(True)
    x = (torch.randn(6, 4) * 3).requires_grad_(True)
    y = torch.randint(0, 3, (6,))
    _, private, opt = engine(model, x, y, sum_loss)
    opt.zero_grad()
    (sum_loss(private(x[:3]), y[:3]) + sum_loss(private(x[3:]), y[3:])).backward()
    with pytest.raises(PrivacyError, match="forward passes"):
        opt.step()


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_two_views_of_the_same_records_are_clipped_together(mode):
    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(6, 4) * 4, torch.randint(0, 3, (6,))
    noise = torch.randn(6, 4)

    class TwoViews(nn.Module):  # the reference: one record's loss over both views
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return torch.stack([self.m(t), self.m(t + noise[: t.shape[0]])])

    def loss2(out, yy):
        return sum_loss(out[0], yy) + sum_loss(out[1], yy)

    ref = TwoViews(copy.deepcopy(model)).double()
    params = {n: p.detach() for n, p in ref.named_parameters()}
    noise64 = noise.double()

    def one(p, xi, yi, ni):
        a = functional_call(ref.m, {k[2:]: v for k, v in p.items()}, (xi.unsqueeze(0),))
        b = functional_call(ref.m, {k[2:]: v for k, v in p.items()}, ((xi + ni).unsqueeze(0),))
        return sum_loss(a, yi.unsqueeze(0)) + sum_loss(b, yi.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, x.double(), y, noise64)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    f = (C / (norms + 1e-6)).clamp(max=1.0)
    want = {n[2:]: torch.einsum("b,b...->...", f, v) for n, v in g.items()}
    _, private, opt = engine(model, x, y, sum_loss, grad_sample_mode=mode)
    opt.zero_grad()
    with private.same_records():
        loss = sum_loss(private(x), y) + sum_loss(private(x + noise), y)
    loss.backward()
    opt.step()
    got = {n: p.grad.double() * 6 for n, p in model.named_parameters()}
    assert_sums(got, want)
    # without the block: refused, nothing changed
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    (sum_loss(private(x), y) + sum_loss(private(x + noise), y)).backward()
    with pytest.raises(PrivacyError, match="same_records"):
        opt.step()
    assert unchanged(model, before)


# -- item 6: a second make_private -------------------------------------------------------------
def test_second_engine_on_a_private_module_is_refused_and_the_same_engine_continues():
    model = _mlp()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    eng = PrivacyEngine()
    private, opt, dl = eng.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        data_loader=loader, noise_multiplier=1.0, max_grad_norm=C,
                                        noise_seed=3)
    for bx, by in dl:
        opt.zero_grad()
        sum_loss(private(bx), by).backward()
        opt.step()
    eps = eng.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="another PrivacyEngine"):
        PrivacyEngine().make_private(module=private, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)
    _, opt2, dl2 = eng.make_private(module=private, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                    data_loader=loader, noise_multiplier=1.0, max_grad_norm=C, noise_seed=3)
    assert opt2.offset == opt.offset > 0  # the noise stream continues, never replayed
    for bx, by in dl2:
        opt2.zero_grad()
        sum_loss(private(bx), by).backward()
        opt2.step()
    assert eng.get_epsilon(1e-5) > eps  # the same accountant, continued


def test_records_of_an_input_nested_in_a_dict():
    """The batch size comes from the first tensor also inside a dict argument (else nothing was
    captured and the step trained on noise alone)."""
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, batch):
            return self.fc(batch["x"])

    torch.manual_seed(0)
    model = DictModel()
    x, y = torch.randn(6, 4) * 3, torch.randint(0, 3, (6,))
    plain = nn.Sequential()
    plain.add_module("fc", copy.deepcopy(model.fc))
    want = reference_sum(plain, x, y, sum_loss)
    _, private, opt = engine(model, x, y, sum_loss)
    opt.zero_grad()
    sum_loss(private({"x": x}), y).backward()
    opt.step()
    got = {n: p.grad.double() * 6 for n, p in model.named_parameters()}
    assert_sums(got, want)


def test_an_input_changed_in_place_after_the_layer_used_it_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x) * 2.0  # nothing autograd saves: it would not notice the change
            out = self.b(h)
            h.mul_(1000.0)  # after b recorded h: its norms would use the scaled values
            return out

    torch.manual_seed(0)
    model = InPlace()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    _, private, opt = engine(model, x, y, sum_loss)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    sum_loss(private(x), y).backward()
    with pytest.raises(UnsupportedModuleError, match="modified in place"):
        opt.step()
    assert unchanged(model, before)


def test_a_buffer_updated_from_the_batch_is_refused():
    class RunningMean(nn.Module):  # a hand-made BatchNorm-like statistic of the data
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("mean", torch.zeros(4))

        def forward(self, x):
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
            return self.fc(x)

    torch.manual_seed(0)
    model = RunningMean()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    _, private, opt = engine(model, x, y, sum_loss)
    opt.zero_grad()
    sum_loss(private(x), y).backward()
    with pytest.raises(UnsupportedModuleError, match="buffer"):
        opt.step()


def test_a_second_engine_is_refused_also_when_the_first_was_not_kept():
    model = _mlp()
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=4)
    private, opt, _ = PrivacyEngine().make_private(  # the engine object is dropped at once
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=C)
    import gc
    gc.collect()
    with pytest.raises(ValueError, match="another PrivacyEngine"):
        PrivacyEngine().make_private(module=private, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=C)


def test_a_loop_that_fetches_one_batch_ahead_still_steps():
    """Prefetching (accelerate's loaders fetch one batch ahead): two batches drawn, the step
    holds one of them: allowed; the same step on both concatenated is refused."""
    model = _mlp()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    eng = PrivacyEngine()
    private, opt, dp_loader = eng.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.0, max_grad_norm=C)
    it = iter(dp_loader)
    current = next(it)
    for _ in range(3):
        ahead = next(it)
        opt.zero_grad()
        sum_loss(private(current[0]), current[1]).backward()
        opt.step()
        current = ahead
    assert opt.steps == 3
    nxt = next(it)
    opt.zero_grad()
    sum_loss(private(torch.cat([current[0], nxt[0], x[:1]])), torch.cat([current[1], nxt[1], y[:1]])).backward()
    with pytest.raises(PrivacyError, match="sampled batches"):
        opt.step()

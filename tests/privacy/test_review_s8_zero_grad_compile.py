"""Review S8: attacks on two changes.

1. 8a5544a: ``zero_grad()`` (``PrivateModule.discard``) keeps the batches forwarded but not yet
   backpropagated (``loss = crit(model(x), y); zero_grad(); loss.backward(); step()``); the step
   takes every batch.
2. d86426a: ``PrivateModule.forward`` is ``torch.compiler.disable``d, so ``torch.compile(private)``
   runs the private forward (capture, records probe, parameter watch) eagerly.

Each test checks a DP guarantee (one record moves a step by at most C; a step holds one batch of
records; refusals change nothing) or a property the changes claim. The three bugs the review
found (a compiled module's TypeError deep in backward, a bare KeyError for per-layer clipping of a
parameter frozen after the forward, kept forwards that could never be backpropagated) are fixed
and their tests pass.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy.data import BatchMemoryManager
from ppml_fast.privacy.layers import UnsupportedModuleError

F = nn.functional
C = 0.1


def _mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _private(model, *, noise=0.0, batch_size=4, poisson=False, data=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = DataLoader(data if data is not None else TensorDataset(torch.zeros(batch_size)),
                            batch_size=batch_size)
        return PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=loader, noise_multiplier=noise, max_grad_norm=C,
            poisson_sampling=poisson, noise_seed=7, **kw)


X = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 0, 1])


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b, **tol):
    tol = tol or {"rtol": 0, "atol": 0}
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, **tol)


def _step_grad(order, x, y, *, compiled=False, loss_fn=F.cross_entropy):
    """p.grad after one noiseless step on (x, y) (= sum of clipped per-sample grads / E),
    times E: the clipped sum."""
    torch.manual_seed(0)
    model = _mlp()
    private, opt, _ = _private(model)
    f = torch.compile(private) if compiled else private
    if order == "zero_grad first":
        opt.zero_grad()
        loss = loss_fn(f(x), y)
    else:
        loss = loss_fn(f(x), y)
        opt.zero_grad()
    loss.backward()
    opt.step()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * opt.expected_batch_size


# -- 1. zero_grad keeps a forward not yet backpropagated -------------------------------------------

@pytest.mark.parametrize("order", ["zero_grad first", "zero_grad after the forward"])
def test_one_record_moves_the_clipped_sum_by_at_most_C(order):
    """Add/remove neighbours, with an outsized record: the step's clipped sum moves by <= C,
    in the kept-forward order too (the kept batch is clipped like any other)."""
    x = X.clone()
    x[0] = 1e3  # a record whose gradient is far above C
    for drop in range(4):
        keep = [i for i in range(4) if i != drop]
        full = _step_grad(order, x, Y)
        part = _step_grad(order, x[keep], Y[keep])
        assert float((full - part).norm()) <= C * (1 + 1e-5)


def test_poisson_kept_forward_of_previous_sampled_batch_with_current_one_is_refused():
    """A forward of sampled batch 1 kept across zero_grad and a forward of sampled batch 2, both
    backpropagated into one step: two sampled batches in one step, refused, nothing changes."""
    torch.manual_seed(0)
    model = _mlp()
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    private, opt, loader = _private(model, noise=1.0, batch_size=16, poisson=True, data=data)
    it = iter(loader)
    x1, y1 = next(it)
    loss1 = F.cross_entropy(private(x1), y1)
    opt.zero_grad()  # kept: not backpropagated yet
    x2, y2 = next(it)
    loss2 = F.cross_entropy(private(x2), y2)
    (loss1 + loss2).backward()
    before = _params(model)
    with pytest.raises(PrivacyError):
        opt.step()
    assert opt.steps == 0
    _assert_same(before, _params(model))
    assert all(p.grad is None for p in model.parameters())


def test_poisson_kept_forward_never_backpropagated_is_not_counted():
    """The kept forward of batch 1 (never backpropagated) does not enter the step on batch 2:
    the step equals a step on batch 2 alone and holds its records only."""
    data = TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))

    def run(with_kept):
        torch.manual_seed(0)
        model = _mlp()
        private, opt, loader = _private(model, noise=0.0, batch_size=16, poisson=True, data=data)
        it = iter(loader)
        x1, y1 = next(it)
        x2, y2 = next(it)
        if with_kept:
            F.cross_entropy(private(x1), y1)  # forwarded, never backpropagated
        loss = F.cross_entropy(private(x2), y2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert private.pending_batches() == 0
        return _params(model)

    _assert_same(run(False), run(True))


def test_kept_forward_outside_same_records_is_not_merged_with_a_forward_inside():
    """A forward kept across zero_grad, then a forward inside same_records(): still two batches
    (the block starts its own), refused."""
    torch.manual_seed(0)
    model = _mlp()
    private, opt, _ = _private(model)
    loss_a = F.cross_entropy(private(X), Y)
    opt.zero_grad()
    with private.same_records():
        loss_b = F.cross_entropy(private(X.flip(0)), Y)
    (loss_a + loss_b).backward()
    before = _params(model)
    with pytest.raises(PrivacyError):
        opt.step()
    _assert_same(before, _params(model))


def test_retry_after_a_refused_step_uses_only_the_fresh_batch():
    """Refused step (two batches), zero_grad, a fresh forward/backward/step: equals one clean
    step (neither refused batch is left behind)."""
    def clean():
        torch.manual_seed(0)
        model = _mlp()
        private, opt, _ = _private(model, noise=1.0)
        opt.zero_grad()
        F.cross_entropy(private(X), Y).backward()
        opt.step()
        return _params(model)

    torch.manual_seed(0)
    model = _mlp()
    private, opt, _ = _private(model, noise=1.0)
    loss_a = F.cross_entropy(private(X * 3), Y)
    opt.zero_grad()
    loss_b = F.cross_entropy(private(X * 5), Y)
    (loss_a + loss_b).backward()
    with pytest.raises(PrivacyError):
        opt.step()
    opt.zero_grad()
    assert private.pending_batches() == 0
    loss = F.cross_entropy(private(X), Y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    _assert_same(clean(), _params(model))


def test_model_changed_between_kept_forward_and_backward_then_fresh_step():
    """load_state_dict between the kept forward and its backward: the backward fails (autograd's
    version check); after zero_grad a fresh step equals a clean step from the loaded state."""
    torch.manual_seed(0)
    model = _mlp()
    private, opt, _ = _private(model, noise=1.0)
    state = {k: v.clone() + 0.5 for k, v in model.state_dict().items()}
    loss = F.cross_entropy(private(X), Y)
    opt.zero_grad()
    model.load_state_dict(state)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
    opt.zero_grad()
    loss = F.cross_entropy(private(X), Y)
    opt.zero_grad()
    loss.backward()
    opt.step()

    torch.manual_seed(0)
    ref = _mlp()
    ref.load_state_dict(state)
    rp, ro, _ = _private(ref, noise=1.0)
    ro.zero_grad()
    F.cross_entropy(rp(X), Y).backward()
    ro.step()
    _assert_same(_params(ref), _params(model))


@pytest.mark.parametrize("clipping", ["flat"])
def test_parameter_frozen_between_kept_forward_and_backward_is_not_updated(clipping):
    torch.manual_seed(0)
    model = _mlp()
    private, opt, _ = _private(model, noise=1.0, clipping=clipping)
    w = model[0].weight.detach().clone()
    loss = F.cross_entropy(private(X), Y)
    opt.zero_grad()
    model[0].weight.requires_grad_(False)
    loss.backward()
    opt.step()
    assert torch.equal(model[0].weight, w)
    assert private.pending_batches() == 0


# review S8 found a bare KeyError after the batch was forgotten; fixed (a PrivacyError naming
# the parameter, before anything changes)
def test_per_layer_parameter_frozen_between_kept_forward_and_backward_gives_a_clear_outcome():
    torch.manual_seed(0)
    model = _mlp()
    private, opt, _ = _private(model, noise=1.0, clipping="per_layer")
    w = model[0].weight.detach().clone()
    loss = F.cross_entropy(private(X), Y)
    opt.zero_grad()
    model[0].weight.requires_grad_(False)
    loss.backward()
    try:
        opt.step()
    except KeyError as e:
        pytest.fail(f"opaque KeyError {e}")
    except (PrivacyError, ValueError):
        return  # a clear refusal is fine
    assert torch.equal(model[0].weight, w)


def test_batch_memory_manager_kept_forward_order_equals_standard_order():
    """Virtual steps (signal_skip_step via BatchMemoryManager) with zero_grad between forward and
    backward: same parameters as zero_grad first (noise on)."""
    data = TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))

    def run(order):
        torch.manual_seed(0)
        model = _mlp()
        private, opt, loader = _private(model, noise=1.0, batch_size=8, data=data)
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt) as bl:
            for x, y in bl:
                if order == "first":
                    opt.zero_grad()
                    loss = F.cross_entropy(private(x), y)
                else:
                    loss = F.cross_entropy(private(x), y)
                    opt.zero_grad()
                loss.backward()
                opt.step()
        assert opt.steps == 2
        return _params(model)

    _assert_same(run("first"), run("kept"))


def test_nonfinite_drop_with_kept_forward_equals_standard_order():
    x = X.clone()
    x[2] = float("nan")

    def run(order):
        torch.manual_seed(0)
        model = _mlp()
        private, opt, _ = _private(model, noise=1.0, nonfinite="drop")
        if order == "first":
            opt.zero_grad()
            loss = F.cross_entropy(private(x), Y)
        else:
            loss = F.cross_entropy(private(x), Y)
            opt.zero_grad()
        loss.backward()
        opt.step()
        return _params(model)

    a, b = run("first"), run("kept")
    assert all(bool(torch.isfinite(p).all()) for p in a)
    _assert_same(a, b)


def test_kept_eval_forward_is_not_in_the_step_and_is_freed_by_it():
    """An evaluation forward with grad enabled (another size), never backpropagated, kept across
    zero_grad: not in the step (which equals the step without it), freed by the step."""
    def run(with_eval):
        torch.manual_seed(0)
        model = _mlp()
        private, opt, _ = _private(model, noise=1.0)
        if with_eval:
            private(torch.randn(7, 3))
        opt.zero_grad()
        if with_eval:
            assert private.pending_batches() == 1
        F.cross_entropy(private(X), Y).backward()
        opt.step()
        assert private.pending_batches() == 0
        return _params(model)

    _assert_same(run(False), run(True))


# review S8: zero_grad kept every forward not backpropagated (memory grew with each dropped
# forward); now one generation: a forward kept by one zero_grad and still not backpropagated is
# forgotten by the next
def test_zero_grad_frees_a_forward_whose_output_was_dropped():
    torch.manual_seed(0)
    model = _mlp()
    private, opt, _ = _private(model)
    for _ in range(3):
        private(torch.randn(5, 3))  # output dropped: no backward can ever come
        opt.zero_grad()
        assert private.pending_batches() <= 1  # only the last forward is held
    opt.zero_grad()
    assert private.pending_batches() == 0


# -- 2. torch.compile -------------------------------------------------------------------------------

class _Unowned(nn.Module):
    """Uses fc's weight outside fc's calls: refused at the step."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) + x @ self.fc.weight.T


class _Mix(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0, keepdim=True)  # mixes the records


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _Mix()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


def test_compiled_private_model_with_kept_forward_order():
    """Both changes together: torch.compile(private) with zero_grad between forward and backward
    gives the eager zero_grad-first clipped sum, and one record moves it by at most C."""
    torch._dynamo.reset()
    x = X.clone()
    x[0] = 1e3
    eager = _step_grad("zero_grad first", x, Y)
    compiled = _step_grad("zero_grad after the forward", x, Y, compiled=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    part = _step_grad("zero_grad after the forward", x[1:], Y[1:], compiled=True)
    assert float((compiled - part).norm()) <= C * (1 + 1e-5)


def test_compiled_private_model_refuses_unowned_parameter_use():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Unowned()
    private, opt, _ = _private(model)
    f = torch.compile(private)
    opt.zero_grad()
    F.cross_entropy(f(X), Y).backward()
    before = _params(model)
    with pytest.raises(PrivacyError, match="outside"):
        opt.step()
    _assert_same(before, _params(model))


def test_compiled_inner_submodule_that_mixes_records_is_refused():
    """private.module.a = torch.compile(a), where a mixes the records: refused at the forward
    (a compiled submodule's backward runs none of the capture's hooks), nothing changed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Outer()
    private, opt, _ = _private(model)
    private.module.a = torch.compile(private.module.a)
    opt.zero_grad()
    before = _params(model)
    with pytest.raises(UnsupportedModuleError, match="torch.compile"):
        F.cross_entropy(private(X), Y).backward()
    _assert_same(before, _params(model))


def test_fullgraph_compile_of_private_model_raises_before_any_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _mlp()
    private, opt, _ = _private(model)
    f = torch.compile(private, fullgraph=True)
    opt.zero_grad()
    before = _params(model)
    with pytest.raises(Exception, match="disable"):
        f(X)
    assert private.pending_batches() == 0
    _assert_same(before, _params(model))


def test_compiled_loss_function_equals_eager():
    torch._dynamo.reset()
    crit = torch.compile(lambda out, y: F.cross_entropy(out, y))
    eager = _step_grad("zero_grad after the forward", X, Y)
    compiled = _step_grad("zero_grad after the forward", X, Y, loss_fn=crit)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


# review S8 found a TypeError deep in backward; fixed: make_private refuses, naming torch.compile
def test_compile_before_make_private_trains_or_names_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _mlp()
    compiled_model = _mlp()
    compiled_model.load_state_dict(eager.state_dict())
    ep, eo, _ = _private(eager)
    eo.zero_grad()
    F.cross_entropy(ep(X), Y).backward()
    eo.step()
    with pytest.raises(UnsupportedModuleError, match="torch.compile"):
        _private(torch.compile(compiled_model))
    # compiling the private model instead trains as the eager one
    cp, co, _ = _private(compiled_model)
    f = torch.compile(cp)
    co.zero_grad()
    F.cross_entropy(f(X), Y).backward()
    co.step()
    _assert_same(_params(eager), _params(compiled_model), rtol=1e-6, atol=1e-7)

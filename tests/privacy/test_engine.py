"""PrivacyEngine and DPOptimizer: noise std, budget stop, checkpoints, Poisson empty batches,
virtual batches, the Opacus loop shape, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ppml_fast
from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent
from ppml_fast.privacy import (
    BatchMemoryManager,
    DPDataLoader,
    DPOptimizer,
    PrivacyBudgetExceeded,
    PrivacyEngine,
    PrivateModule,
)


def _data(n=64, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g))


def _setup(seed=0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(), batch_size=16)
    engine = PrivacyEngine()
    args = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, noise_seed=1, generator=torch.Generator().manual_seed(seed))
    args.update(kw)
    return (engine, *engine.make_private(**args))


def _train(model, opt, loader, steps):
    it = iter(loader)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_opacus_loop_shape_and_epsilon():
    engine, model, opt, loader = _setup()
    assert isinstance(model, PrivateModule) and isinstance(opt, DPOptimizer)
    assert isinstance(loader, DPDataLoader) and loader.sample_rate == pytest.approx(0.25)
    before = [p.detach().clone() for p in model.parameters()]
    for epoch in range(2):
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the default accountant is PLD (issue 17 item 3; it was RDP)
    want = PLDAccountant().compose(PoissonSampledEvent(0.25, GaussianEvent(1.0)), 8).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(want, rel=1e-12)
    assert opt.steps == 8


def test_noise_std_is_sigma_c_over_expected_batch_size():
    torch.manual_seed(0)
    model = nn.Linear(200, 100)
    private = PrivateModule(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), module=private,
                      noise_multiplier=2.0, max_grad_norm=3.0, expected_batch_size=8.0, seed=5)
    x = torch.randn(4, 200)
    (private(x) * 0.0).sum().backward()  # zero per-sample gradients: the gradient is the noise
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]).double().numpy()
    std = 2.0 * 3.0 / 8.0
    assert stats.kstest(noise / std, "norm").pvalue > 1e-4


def test_budget_stop_raises_before_any_change():
    engine, model, opt, loader = _setup(max_epsilon=2.0, delta=1e-5, noise_multiplier=1.5)
    x, y = next(iter(DataLoader(_data(), batch_size=16)))
    steps_done = 0
    with pytest.raises(PrivacyBudgetExceeded) as err:
        for _ in range(1000):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            params = [p.detach().clone() for p in model.parameters()]
            eps_before, offset_before = engine.get_epsilon(1e-5), opt.offset
            opt.step()
            steps_done += 1
    assert err.value.epsilon > 2.0 >= engine.get_epsilon(1e-5)
    # default PLD accountant (issue 17 item 3; RDP stopped after 2: 1.60, 1.97, then 2.25)
    assert steps_done == 3 and opt.steps == 3  # epsilons 1.35, 1.68, 1.93, then 2.14 > 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert engine.get_epsilon(1e-5) == eps_before and opt.offset == offset_before
    assert ppml_fast.PrivacyBudgetExceeded is PrivacyBudgetExceeded


def test_checkpoint_round_trip_resumes_identically(tmp_path):
    # with a journal, a state saved after the last step resumes exactly where the run was
    engine, model, opt, loader = _setup(seed=3, journal=tmp_path / "journal")
    fixed = DataLoader(_data(seed=4), batch_size=16)
    _train(model, opt, fixed, 3)
    saved = (copy.deepcopy(model.module.state_dict()), copy.deepcopy(engine.state_dict()))
    opt.journal.close()

    engine2, model2, opt2, _ = _setup(seed=99, noise_seed=12345, journal=tmp_path / "journal")
    model2.module.load_state_dict(saved[0])
    engine2.load_state_dict(saved[1])
    assert (opt2.seed, opt2.offset, opt2.steps) == (opt.seed, opt.offset, opt.steps)
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    # an older state (steps released since) never replays their noise (issue 15 item 4)
    _train(model2, opt2, fixed, 2)
    engine2.load_state_dict(saved[1])
    assert opt2.offset > opt.offset and engine2.get_epsilon(1e-5) > engine.get_epsilon(1e-5)
    engine3, _, opt3, _ = _setup(seed=5)
    with pytest.warns(UserWarning, match="without a journal"):  # and without a journal: re-keyed
        engine3.load_state_dict(saved[1])
    assert opt3.seed != saved[1]["optimizer"]["seed"] and opt3.steps == 3


def test_poisson_loader_yields_empty_batches_and_step_works():
    ds = _data(n=20)
    loader = DPDataLoader(ds, sample_rate=0.01, num_batches=50, generator=torch.Generator().manual_seed(0))
    sizes = [len(x) for x, _ in loader]
    assert 0 in sizes and len(sizes) == 50
    model = nn.Linear(5, 3)
    private = PrivateModule(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=private,
                      noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=0.2, seed=0)
    x, y = ds.tensors[0][:0], ds.tensors[1][:0]
    nn.functional.cross_entropy(private(x), y, reduction="sum").backward()
    opt.step()  # noise only
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_poisson_batch_sizes_are_binomial():
    loader = DPDataLoader(_data(n=200), sample_rate=0.1, num_batches=400,
                          generator=torch.Generator().manual_seed(1))
    sizes = [len(y) for _, y in loader]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 20) < 4 * math.sqrt(200 * 0.1 * 0.9 / 400)


def test_virtual_batches_equal_one_big_batch():
    results = []
    for physical in (None, 5):
        engine, model, opt, _ = _setup(seed=7, poisson_sampling=False)
        loader = DataLoader(_data(seed=8), batch_size=16)
        if physical is None:
            _train(model, opt, loader, 4)
        else:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt) as mem:
                for x, y in mem:
                    opt.zero_grad()
                    # mean over the chunk: loss_reduction="mean" rescales by the chunk's size
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
            assert opt.steps == 4
        results.append([p.detach().clone() for p in model.parameters()])
    # both runs clip the same per-sample gradients and draw the same noise (one draw per logical step)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_not_poisson_warns():
    with pytest.warns(UserWarning, match="Poisson"):
        _setup(poisson_sampling=False)


def test_make_private_with_epsilon_meets_the_target():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    engine = PrivacyEngine()
    loader = DataLoader(_data(), batch_size=16)
    m, opt, dl = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=3.0, target_delta=1e-5, epochs=5, max_grad_norm=1.0)
    steps = 5 * len(loader)
    eps = PLDAccountant().compose(PoissonSampledEvent(0.25, GaussianEvent(opt.noise_multiplier)), steps).get_epsilon(1e-5)
    assert 2.95 <= eps <= 3.0  # calibrated with the default accountant, PLD (issue 17 item 3)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(clipping="hard"), ValueError, "clipping"),
        (dict(max_epsilon=1.0), ValueError, "delta"),
        (dict(grad_sample_mode="x"), ValueError, "grad_sample_mode"),
        (dict(nonfinite="ignore"), ValueError, "nonfinite"),
        (dict(data_loader=[1, 2]), TypeError, "data_loader"),
    ],
)
def test_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        _setup(**kw)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyEngine(accountant="moments")


def test_noise_schedule_is_accounted_step_by_step_and_resumes():
    from ppml_fast.accounting import ComposedEvent
    from ppml_fast.privacy import ExponentialNoise, LambdaNoise, StepNoise

    engine, model, opt, loader = _setup(seed=5)
    sched = ExponentialNoise(opt, gamma=0.9)
    fixed = DataLoader(_data(seed=6), batch_size=16)
    sigmas = []
    for _ in range(3):
        for _ in range(2):
            sigmas.append(opt.noise_multiplier)
            _train(model, opt, fixed, 1)
        sched.step()
    assert sigmas == pytest.approx([1.0, 1.0, 0.9, 0.9, 0.81, 0.81])
    want = PLDAccountant().compose(ComposedEvent(tuple(  # the default accountant (issue 17 item 3)
        PoissonSampledEvent(0.25, GaussianEvent(s)) for s in sigmas))).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(want, rel=1e-12)
    # resume: the optimizer's state carries sigma, the scheduler's its epoch
    engine2, _, opt2, _ = _setup(seed=5)
    sched2 = ExponentialNoise(opt2, gamma=0.9)
    engine2.load_state_dict(engine.state_dict())
    sched2.load_state_dict(sched.state_dict())
    sched.step(), sched2.step()
    assert opt2.noise_multiplier == opt.noise_multiplier == pytest.approx(0.9**4)
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)

    step = StepNoise(opt, step_size=2, gamma=0.5)
    step.step()
    assert opt.noise_multiplier == pytest.approx(step.initial_noise_multiplier)
    step.step()
    assert opt.noise_multiplier == pytest.approx(step.initial_noise_multiplier * 0.5)
    lam = LambdaNoise(opt, noise_lambda=lambda t: 1.0 + t)
    lam.step()
    assert opt.noise_multiplier == pytest.approx(lam.initial_noise_multiplier * 2)
    with pytest.raises(ValueError, match="gamma"):
        ExponentialNoise(opt, gamma=0.0)
    with pytest.raises(TypeError, match="optimizer"):
        ExponentialNoise(object(), gamma=0.5)


class SampleConvNet(nn.Module):
    """Opacus's examples/mnist.py model."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = nn.functional.relu(self.conv1(x))
        x = nn.functional.max_pool2d(x, 2, 1)
        x = nn.functional.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2, 1)
        x = x.view(-1, 32 * 4 * 4)
        return self.fc2(nn.functional.relu(self.fc1(x)))


def test_opacus_mnist_example_loop_runs_unchanged():
    # examples/mnist.py of Opacus 1.6, with `from opacus import PrivacyEngine` replaced
    from ppml_fast import PrivacyEngine as Engine

    g = torch.Generator().manual_seed(0)
    train_loader = DataLoader(TensorDataset(torch.randn(96, 1, 28, 28, generator=g),
                                            torch.randint(0, 10, (96,), generator=g)), batch_size=32)
    model = SampleConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0)
    privacy_engine = Engine(secure_mode=False)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader,
        noise_multiplier=1.1, max_grad_norm=1.0)
    criterion = nn.CrossEntropyLoss()
    model.train()
    losses = []
    for _batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    epsilon = privacy_engine.accountant.get_epsilon(delta=1e-5)
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert epsilon == pytest.approx(PLDAccountant().compose(  # the default (issue 17 item 3)
        PoissonSampledEvent(1 / 3, GaussianEvent(1.1)), 3).get_epsilon(1e-5))
    assert list(model.state_dict())[0] == "_module.conv1.weight"  # Opacus's GradSampleModule prefix


def test_zero_grad_forgets_backpropagated_batches_and_the_step_takes_the_rest():
    """zero_grad forgets the batches whose gradients arrived; one not backpropagated yet is kept
    (its backward may follow zero_grad: tests/privacy/test_zero_grad_order.py) until the step,
    which takes every batch."""
    engine, model, opt, loader = _setup()
    x, y = next(iter(DataLoader(_data(), batch_size=8)))
    model(x)  # e.g. an evaluation with grad enabled, never backpropagated
    nn.functional.cross_entropy(model(x), y).backward()
    assert model.pending_batches() == 2
    opt.zero_grad()
    assert model.pending_batches() == 1
    opt.step()
    assert model.pending_batches() == 0


def test_budget_stop_with_the_pld_accountant_stops_where_pld_says():
    from ppml_fast.accounting import PLDAccountant

    # steps that fit eps = 1.5 under PLD at q = 0.25, sigma = 1.5 (RDP alone would stop earlier)
    fits = 0
    acc = PLDAccountant()
    while acc.compose(PoissonSampledEvent(0.25, GaussianEvent(1.5))).get_epsilon(1e-5) <= 1.5:
        fits += 1
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    engine = PrivacyEngine(accountant="pld")
    m, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                    data_loader=DataLoader(_data(), batch_size=16), noise_multiplier=1.5,
                                    max_grad_norm=1.0, max_epsilon=1.5, delta=1e-5, noise_seed=0)
    x, y = next(iter(DataLoader(_data(), batch_size=16)))
    done = 0
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(100):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            done += 1
    assert done == fits >= 1
    assert engine.get_epsilon(1e-5) <= 1.5


def test_optimizer_noise_equals_the_public_op():
    # the optimizer calls the kernel directly; the numbers are those of ops.noisy_scale_
    from ppml_fast import ops

    torch.manual_seed(0)
    model = nn.Linear(7, 5)
    private = PrivateModule(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), module=private,
                      noise_multiplier=1.3, max_grad_norm=0.7, expected_batch_size=4.0, seed=99)
    (private(torch.randn(3, 7)) * 0.0).sum().backward()
    opt.step()
    want = [torch.zeros_like(p) for p in model.parameters()]
    end = ops.noisy_scale_(want, 1.3 * 0.7, 4.0, seed=99, offset=0)
    for p, w in zip(model.parameters(), want):
        assert torch.equal(p.grad, w)
    assert opt.offset == end


def test_frozen_parameters_get_no_noise_and_do_not_move():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)  # fine-tuning: the optimizer still lists it
    frozen = model[0].weight.detach().clone()
    engine = PrivacyEngine()
    m, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                         data_loader=DataLoader(_data(), batch_size=16),
                                         noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0)
    _train(m, opt, loader, 3)
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None
    assert not torch.equal(model[0].bias.detach(), model[0].bias.detach() * 0)  # trained


def test_zero_noise_trains_and_reports_infinite_epsilon():
    # sigma 0 is allowed (a clipping-only run, e.g. a baseline) but spends an infinite epsilon
    engine, model, opt, loader = _setup(noise_multiplier=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    assert engine.get_epsilon(1e-5) == 0.0
    _train(model, opt, DataLoader(_data(), batch_size=16), 2)
    assert opt.steps == 2 and opt.unnoised_steps == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert engine.get_epsilon(1e-5) == math.inf
    state = opt.state_dict()
    assert state["unnoised_steps"] == 2
    with pytest.raises(PrivacyBudgetExceeded):  # a budget makes a sigma-0 step refuse at once
        e2, m2, o2, _ = _setup(noise_multiplier=0.0, max_epsilon=1.0, delta=1e-5)
        _train(m2, o2, DataLoader(_data(), batch_size=16), 1)


def test_per_layer_noise_covers_every_clipped_parameter():
    # per-layer clipping with one number C for K parameters: one sample's clipped gradient can
    # have norm C sqrt(K), so the noise std must be sigma C sqrt(K) (it was sigma C)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.Linear(40, 30))  # K = 4 parameters
    private = PrivateModule(model, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), module=private,
                      noise_multiplier=2.0, max_grad_norm=3.0, expected_batch_size=1.0, seed=5,
                      clipping="per_layer")
    assert opt.noise_std == pytest.approx(2.0 * 3.0 * 2.0)
    private(torch.randn(1, 50) * 100).pow(2).sum().backward()  # one sample, every layer clipped
    sums, _ = private.clipped_sums(max_grad_norm=3.0, clipping="per_layer")
    norm = math.sqrt(sum(float(s.pow(2).sum()) for s in sums.values()))
    assert norm == pytest.approx(6.0, rel=1e-5) and norm <= opt.noise_std / 2.0 * (1 + 1e-6)
    (private(torch.randn(4, 50)) * 0.0).sum().backward()
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]).double().numpy()
    assert stats.kstest(noise / 12.0, "norm").pvalue > 1e-4


def test_per_layer_norms_stay_bound_to_their_parameters():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    model[0].bias.requires_grad_(False)  # frozen when the optimizer is built
    private = PrivateModule(model, loss_reduction="sum")
    norms = [0.1, 0.2, 0.3]  # weight 0, weight 2, bias 2
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), module=private,
                      noise_multiplier=1.0, max_grad_norm=norms, expected_batch_size=1.0,
                      clipping="per_layer")
    model[1].weight.requires_grad_(False)  # frozen later: the others keep their own norms
    assert opt.noise_std == pytest.approx(math.sqrt(0.1 ** 2 + 0.3 ** 2))
    private(torch.randn(1, 5) * 100).pow(2).sum().backward()
    opt.clip_and_accumulate()
    got = {k: float(v.norm()) for k, v in zip(["w0", "b1"], [opt._summed[model[0].weight],
                                                              opt._summed[model[1].bias]])}
    assert got == pytest.approx({"w0": 0.1, "b1": 0.3}, rel=1e-5)
    opt.zero_grad()
    model[0].bias.requires_grad_(True)  # unfrozen: it has no per-layer norm
    private(torch.randn(2, 5)).sum().backward()
    with pytest.raises(ValueError, match="per-layer max_grad_norm"):
        opt.step()
    assert private.pending_batches() == 1 and opt.steps == 0  # nothing changed

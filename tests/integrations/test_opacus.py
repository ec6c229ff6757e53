"""migration_report against what PrivateModule actually does, and an Opacus loop next to ours."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.integrations.opacus import migration_report
from ppml_fast.privacy import PrivacyEngine, PrivateModule, UnsupportedModuleError, fix_module


class Scale(nn.Module):
    """A layer with its own parameter and no rule: the torch.func path."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.weight


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.att(x, x, x)
        return self.fc(out.mean(1))


def _cnn(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _frozen_mlp() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    m[0].requires_grad_(False)
    return m


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
            {"0": "rule", "2": "rule"}),
    "frozen": (_frozen_mlp, {"2": "rule"}),
    "batchnorm": (lambda: _cnn(nn.BatchNorm2d(4)), {"0": "rule", "1": "refused", "4": "rule"}),
    "groupnorm": (lambda: _cnn(nn.GroupNorm(2, 4)), {"0": "rule", "1": "rule", "4": "rule"}),
    "instancenorm_stats": (lambda: _cnn(nn.InstanceNorm2d(4, track_running_stats=True)),
                           {"0": "rule", "1": "refused", "4": "rule"}),
    "custom": (lambda: nn.Sequential(nn.Linear(4, 5), Scale(5)), {"0": "rule", "1": "torch.func"}),
    "attention": (SelfAttention, {"att": "attention", "fc": "rule"}),
    "lstm": (lambda: nn.LSTM(4, 5), {"": "recurrent"}),
    "embedding_bag": (lambda: nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 2)),
                      {"0": "torch.func", "1": "rule"}),
}


@pytest.mark.parametrize("key", sorted(MODELS))
def test_report_agrees_with_private_module(key):
    build, statuses = MODELS[key]
    report = migration_report(build())
    assert {p.name: p.status for p in report.layers} == statuses
    assert report.ok == ("refused" not in statuses.values())
    if report.ok:
        PrivateModule(build())
    else:
        with pytest.raises(UnsupportedModuleError) as err:
            PrivateModule(build())
        for problem in report.problems:
            assert problem in str(err.value)
    assert ("ok: make_private" in str(report)) == report.ok


def test_batchnorm_note_and_fix_module():
    model = _cnn(nn.BatchNorm2d(4))
    report = migration_report(model)
    assert not report.ok and "BatchNorm mixes the samples" in report.problems[0]
    assert any("fix_module(model) replaces BatchNorm by GroupNorm in place" in n for n in report.notes)
    assert migration_report(fix_module(model)).ok


def test_torch_func_layer_trains_and_is_noted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Scale(5))
    report = migration_report(model)
    assert report.ok and report.by_status("torch.func")[0].name == "1"
    assert any("torch.func fallback" in n and ": 1" in n for n in report.notes)
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0)
    before = model[1].weight.detach().clone()
    for x, y in loader:
        opt.zero_grad()
        F.mse_loss(private(x), y).backward()
        opt.step()
    assert not torch.equal(before, model[1].weight)


def test_optimizer_checks():
    model = nn.Linear(3, 2)
    assert migration_report(model, torch.optim.SGD(model.parameters(), lr=0.1)).ok
    other = nn.Linear(3, 2)
    report = migration_report(model, torch.optim.SGD(other.parameters(), lr=0.1))
    assert not report.ok and "optimizer holds 2 trainable parameter(s)" in report.problems[0]
    report = migration_report(model, "sgd")
    assert "optimizer must be a torch.optim.Optimizer; got str" in report.problems[0]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got int"):
        migration_report(3)


# -- with Opacus installed --------------------------------------------------------------------


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(engine, model, *, sigma, poisson, epochs, **kwargs):
    """The Opacus tutorial loop; the same lines for both engines."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(_data(), batch_size=32, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                  noise_multiplier=sigma, max_grad_norm=0.1,
                                  poisson_sampling=poisson, **kwargs)
        private, opt, loader = out
        steps = 0
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(private(x), y).backward()
                opt.step()
                steps += 1
    return private, opt, steps


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
def test_opacus_and_ppml_fast_take_the_same_clipped_steps():
    opacus = pytest.importorskip("opacus")
    ours_model, theirs_model = _mlp(), _mlp()
    _, theirs_opt, theirs_steps = _train(opacus.PrivacyEngine(accountant="rdp"), theirs_model,
                                         sigma=0.0, poisson=False, epochs=1)
    # sigma = 1e-12, not 0: ppml_fast's accountant event rejects sigma = 0 at the step
    _, ours_opt, ours_steps = _train(PrivacyEngine(accountant="rdp"), ours_model, sigma=1e-12,
                                     poisson=False, epochs=1, noise_seed=0)
    assert ours_steps == theirs_steps == 8
    assert type(theirs_opt.original_optimizer) is type(ours_opt.original_optimizer)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(ours_model.parameters()), next(_mlp().parameters()))


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
def test_opacus_loop_and_ours_report_the_same_kind_of_epsilon():
    opacus = pytest.importorskip("opacus")
    theirs_engine, ours_engine = opacus.PrivacyEngine(accountant="rdp"), PrivacyEngine(accountant="rdp")
    theirs, _, t_steps = _train(theirs_engine, _mlp(), sigma=1.1, poisson=True, epochs=2)
    ours, _, o_steps = _train(ours_engine, _mlp(), sigma=1.1, poisson=True, epochs=2, noise_seed=0)
    assert o_steps == t_steps == 16
    x = _data(4)[:][0]
    assert ours(x).shape == theirs(x).shape == (4, 3)
    eps_theirs, eps_ours = theirs_engine.get_epsilon(1e-5), ours_engine.get_epsilon(1e-5)
    # measured: 3.91406 (ours) vs 3.91354 (Opacus 1.6): ours bounds fractional orders from above
    assert 0.5 * eps_theirs <= eps_ours <= 1.01 * eps_theirs


def test_report_looks_into_opacus_wrappers():
    opacus = pytest.importorskip("opacus")
    model = _mlp()
    gsm = opacus.GradSampleModule(model)
    opt = opacus.optimizers.DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1),
                                        noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
    report = migration_report(gsm, opt)
    assert report.ok and [p.name for p in report.layers] == ["0", "2"]
    assert any("pass the plain model" in n for n in report.notes)
    assert any("optimizer.original_optimizer" in n for n in report.notes)


def test_opacus_dp_layers():
    pytest.importorskip("opacus")
    from opacus.layers import DPLSTM, DPMultiheadAttention

    # DPMultiheadAttention runs through its Linear layers: clipped sums equal a per-sample loop
    torch.manual_seed(2)
    att = DPMultiheadAttention(8, 2)
    report = migration_report(att)
    assert report.ok and {p.status for p in report.layers} == {"rule"}
    x = torch.randn(5, 4, 8)  # (T, B, E)
    c = 0.05
    private = PrivateModule(att, batch_first=False)
    out, _ = private(x, x, x)
    (out ** 2).sum(dim=(0, 2)).mean().backward()
    sums, seen = private.clipped_sums(max_grad_norm=c)
    assert seen == 4
    private.remove_hooks()
    expected = {p: torch.zeros_like(p) for p in att.parameters()}
    for i in range(4):
        xi = x[:, i:i + 1]
        grads = torch.autograd.grad((att(xi, xi, xi)[0] ** 2).sum(), list(att.parameters()))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        for p, g in zip(att.parameters(), grads):
            expected[p] += g * min(1.0, c / (float(norm) + 1e-6))
    for p in att.parameters():
        torch.testing.assert_close(sums[p], expected[p], rtol=1e-4, atol=1e-7)

    # DPLSTM registers its cells' parameters again under torch's names: they belong to the
    # inner Linear layers whose calls use them, and its clipped sums equal the reference
    torch.manual_seed(0)
    lstm = DPLSTM(4, 6, batch_first=True).double()
    assert migration_report(lstm).ok
    ref = copy.deepcopy(lstm)
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    private = PrivateModule(lstm, loss_reduction="sum")
    (private(x)[0] ** 2).sum().backward()
    sums, _ = private.clipped_sums(max_grad_norm=1.0)
    want = {p: torch.zeros_like(p) for p in ref.parameters()}
    for i in range(5):
        grads = torch.autograd.grad((ref(x[i:i + 1])[0] ** 2).sum(), list(ref.parameters()))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        for p, g in zip(ref.parameters(), grads):
            want[p] += g * min(1.0, 1.0 / (float(norm) + 1e-6))
    for p, q in zip(lstm.parameters(), ref.parameters()):
        torch.testing.assert_close(sums[p], want[q], rtol=1e-9, atol=1e-12)

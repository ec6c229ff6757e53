"""A Poisson-sampled step must be a fresh sample and hold each sampled record once: two steps on
one batch, or a batch whose rows are repeated as records, are refused before anything changes
(privacy/one_batch.py). Legit loops still run: one step per batch, virtual steps, rows dropped."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.privacy import BatchMemoryManager, PrivacyEngine


def _setup(batch_size=16):
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(96, 4), torch.randint(0, 2, (96,)))
    model = nn.Linear(4, 2)
    engine = PrivacyEngine()
    model, opt, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=batch_size), noise_multiplier=1.0,
        max_grad_norm=1.0, noise_seed=1)
    return engine, model, opt, dl


def _backward(model, x, y):
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], opt.steps, len(opt.accountant.history)


def test_two_steps_on_one_sampled_batch_are_refused():
    _, model, opt, dl = _setup()
    x, y = next(iter(dl))
    while len(x) == 0:
        x, y = next(iter(dl))
    _backward(model, x, y)
    opt.step()
    opt.zero_grad()
    _backward(model, x, y)
    before = _snapshot(model, opt)
    with pytest.raises(PrivacyError, match="no sampled batch was drawn"):
        opt.step()
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]


def test_rows_repeated_as_records_are_refused():
    _, model, opt, dl = _setup()
    for x, y in dl:
        if len(x):
            break
    _backward(model, torch.cat([x, x + 0.01]), torch.cat([y, y]))
    steps = opt.steps
    with pytest.raises(PrivacyError, match="more than the"):
        opt.step()
    assert opt.steps == steps


def test_records_from_another_loader_warn_then_are_refused_once_the_loader_was_used():
    _, model, opt, dl = _setup()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    _backward(model, x, y)
    with pytest.warns(UserWarning, match="nothing was drawn from the Poisson loader"):
        opt.step()  # never drew from the loader: the epsilon's assumption is named
    for xb, yb in dl:  # the loader is used from here on
        opt.zero_grad()
        _backward(model, xb, yb)
        opt.step()
        break
    opt.zero_grad()
    _backward(model, x, y)  # back to records of another loader
    with pytest.raises(PrivacyError, match="no sampled batch was drawn"):
        opt.step()


def test_one_step_per_batch_dropped_rows_and_virtual_steps_run():
    engine, model, opt, dl = _setup()
    for i, (x, y) in enumerate(dl):
        opt.zero_grad()
        keep = x[: max(0, len(x) - 2)], y[: max(0, len(x) - 2)]  # rows dropped: fine
        _backward(model, *keep)
        opt.step()
    with BatchMemoryManager(data_loader=dl, max_physical_batch_size=4, optimizer=opt) as vdl:
        for x, y in vdl:
            opt.zero_grad()
            _backward(model, x, y)
            opt.step()
    assert opt.steps == 2 * len(dl)
    assert engine.get_epsilon(1e-5) > 0

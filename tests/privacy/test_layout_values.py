"""Non-tensor arguments are part of the records probe's input layout (review S9): a value the
probe has not seen is probed; one that changes every batch is probed every batch, correct and
slow, and warned about once ppml_fast.privacy.module.REPROBE_WARNING layouts have been probed."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine, module as module_mod


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, scale=1.0):
        return self.fc(x) * scale


def _private(model):
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    m, opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False)
    return m, opt, torch.randn(4, 4), torch.tensor([0, 1, 1, 0])


def _count_probes(monkeypatch) -> list:
    """A list that gets one entry per records probe run."""
    probes = []
    real = module_mod.records.verify
    monkeypatch.setattr(module_mod.records, "verify", lambda *a, **k: probes.append(1) or real(*a, **k))
    return probes


def test_a_value_that_changes_every_batch_is_probed_each_time_and_warned_about(monkeypatch):
    monkeypatch.setattr(module_mod, "REPROBE_WARNING", 3)
    model = Scaled()
    m, opt, x, y = _private(model)
    probes = _count_probes(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            opt.zero_grad()
            F.cross_entropy(m(x, scale=1.0 + step), y).backward()
            opt.step()
        opt.zero_grad()
        F.cross_entropy(m(x, scale=1.0), y).backward()  # seen before: not probed again
        opt.step()
    assert len(probes) == 5
    assert sum("different input layouts" in str(w.message) for w in caught) == 1


def test_the_verdicts_kept_are_bounded(monkeypatch):
    monkeypatch.setattr(module_mod, "VERIFIED_MAX", 2)
    model = Scaled()
    m, opt, x, y = _private(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(4):
            opt.zero_grad()
            F.cross_entropy(m(x, scale=1.0 + step), y).backward()
            opt.step()
    assert len(m._verified) == 2


class Vocab(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, table):
        return self.fc(x) * (1.0 + 0.0 * len(table))


def test_a_long_list_argument_is_keyed_by_identity_not_walked(monkeypatch):
    model = Vocab()
    m, opt, x, y = _private(model)
    table = list(range(100_000))
    probes = _count_probes(monkeypatch)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(x, table), y).backward()
        opt.step()
    assert len(probes) == 1  # the same list object: one layout
    opt.zero_grad()
    F.cross_entropy(m(x, list(table)), y).backward()  # another list: probed again (by identity)
    opt.step()
    assert len(probes) == 2

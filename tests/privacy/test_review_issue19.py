"""Adversarial review of the correlated-noise paths (issue 19, helper A19): each test is a way a
user's loop or settings could make the reported epsilon smaller than the privacy loss the code
ran, or reuse / leak noise. A test that reproduced a flaw on the reviewed code says so.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.accounting import GaussianEvent, RDPAccountant
from ppml_fast.accounting import matrix_factorization as mf
from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.privacy import PrivacyEngine

SIGMA, CLIP, B = 0.7, 1.5, 8


def _private(mech="tree", bands=None, *, shuffle=False, steps=None, epochs=None, n=64,
             poisson=False, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 6, generator=g)
    loader = DataLoader(TensorDataset(X, (X[:, 0] > 0).long()), batch_size=B, shuffle=shuffle)
    eng = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, o, l = eng.make_private(module=model, optimizer=opt, data_loader=loader,
                                   noise_multiplier=SIGMA, max_grad_norm=CLIP, noise_mechanism=mech,
                                   bands=bands, steps=steps, epochs=epochs, poisson_sampling=poisson,
                                   **kw)
    return eng, m, o, l


def _step(m, o, x, y):
    o.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    o.step()


def _true_rho_varying_clip(C: np.ndarray, clips: list, std: float, pattern) -> float:
    """1 / sigma_eff^2 of the release C x + z (z ~ N(0, std^2)) when the record's gradient of
    step j is clipped to clips[j] (X = C^T C >= 0: all g_j aligned is the worst case)."""
    cols = sum(C[:, j] * clips[j] for j in pattern)
    return float(cols @ cols) / std ** 2


def test_clip_lowered_and_sigma_raised_at_the_same_std_is_refused():
    """Found by A19 (reproduced before 66ac418): the plan checked only the noise std
    sigma x C. Halving max_grad_norm and doubling noise_multiplier keeps the std, but the
    strategy's per-step events then use the doubled sigma for rows that still hold the earlier
    steps' gradients clipped at the old, larger C: tree, single participation at step 0, steps
    0 and 1 released: reported rho = 1/sigma^2 + 1/(2 sigma)^2 = 1.25/sigma^2, true 2/sigma^2."""
    C = mf.tree(2).matrix()
    std = SIGMA * CLIP
    true = _true_rho_varying_clip(C, [CLIP, CLIP / 2], std, [0])
    reported = 1 / SIGMA ** 2 + 1 / (2 * SIGMA) ** 2
    assert true == pytest.approx(2 / SIGMA ** 2) and reported < true  # the flaw, in numbers

    eng, m, o, l = _private("tree", steps=4)
    it = iter(l)
    _step(m, o, *next(it))
    x, y = next(it)
    o.max_grad_norm, o.noise_multiplier = CLIP / 2, 2 * SIGMA  # same std, different sigma and C
    assert o.noise_std == pytest.approx(std)
    history, offset = list(eng.accountant.history), o.offset
    with pytest.raises(PrivacyError, match="noise multiplier"):
        _step(m, o, x, y)
    assert (o.steps, o.offset, list(eng.accountant.history)) == (1, offset, history)
    o.max_grad_norm, o.noise_multiplier = CLIP, SIGMA
    o.step()  # the planned sigma and C: accepted (same batch, its step was refused)
    assert o.steps == 2


def test_sigma_change_after_a_resume_is_refused():
    """The noise multiplier of the plan survives a state round trip (else a resumed run could
    change sigma and C at the same std)."""
    eng, m, o, l = _private("tree", steps=4)
    it = iter(l)
    _step(m, o, *next(it))
    state = o.state_dict()
    eng2, m2, o2, l2 = _private("tree", steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o2.load_state_dict(state)
    o2.max_grad_norm, o2.noise_multiplier = CLIP / 2, 2 * SIGMA
    it2 = iter(l2)
    with pytest.raises(PrivacyError, match="noise multiplier"):
        _step(m2, o2, *next(it2))


@pytest.mark.parametrize("mech,bands,poisson", [("tree", None, False), ("banded_mf", 2, False),
                                                ("banded_mf", 2, True)])
def test_two_views_of_one_batch_in_one_forward_are_refused(mech, bands, poisson):
    """Found by A19: a step on torch.cat([x, augment(x)]) (every record twice, each row clipped
    to C: the record's clipped sum moves by 2C) was accepted on the fixed-batches and cyclic
    Poisson loaders; the sensitivity counts C per participation. Now refused before anything
    changes; virtual steps over the one batch still work."""
    eng, m, o, l = _private(mech, bands, steps=6, poisson=poisson)
    it = iter(l)
    x, y = next(it)
    while poisson and len(x) < 2:  # (the cyclic loader's batches are random; need 2 records)
        _step(m, o, x, y)
        x, y = next(it)
    o.zero_grad()
    nn.functional.cross_entropy(m(torch.cat([x, x])), torch.cat([y, y])).backward()
    steps, offset, history = o.steps, o.offset, list(eng.accountant.history)
    with pytest.raises(PrivacyError, match="more than once"):
        o.step()
    assert (o.steps, o.offset, list(eng.accountant.history)) == (steps, offset, history)
    assert o.correlated.step == steps
    o.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    o.step()  # the batch itself: accepted
    x, y = next(it)  # virtual steps: the next batch in physical parts of at most 3 records
    parts = list(zip(x.split(3), y.split(3)))
    for i, (xb, yb) in enumerate(parts):
        o.signal_skip_step(i < len(parts) - 1)
        o.zero_grad()
        nn.functional.cross_entropy(m(xb), yb).backward()
        o.step()
    assert o.steps == steps + 2


class _ReshufflingDataset(torch.utils.data.Dataset):
    """A map-style dataset that changes which record index i returns when told (a dataset with
    its own ``set_epoch`` shuffling, or bucketing by length re-drawn each epoch), under a
    DataLoader with shuffle=False (SequentialSampler)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.X, self.order = torch.randn(n, 6, generator=g), list(range(n))

    def set_order(self, order) -> None:
        self.order = list(order)

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i):
        r = self.order[i]
        return self.X[r], r  # the label is the record id (the test reads who was in each step)


# A19: fixed-order accounting only for index-stable datasets (correlated_plan.index_stable)
def test_a_dataset_reordering_itself_under_shuffle_false_is_accounted():
    n, epochs = 32, 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    ds = _ReshufflingDataset(n)
    loader = DataLoader(ds, batch_size=B, shuffle=False)
    eng = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, o, l = eng.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                   noise_mechanism="banded_mf", bands=4, epochs=epochs,
                                   poisson_sampling=False)
    steps_of: dict[int, list[int]] = {}
    for e in range(epochs):
        ds.set_order(range(n) if e % 2 == 0 else range(n - 1, -1, -1))  # the user's per-epoch order
        for x, r in l:
            for rec in r.tolist():
                steps_of.setdefault(rec, []).append(o.steps)
            o.zero_grad()
            (m(x).sum() * 0).backward()
            o.step()
    strategy, T = o.correlated.strategy, o.steps
    X = strategy.matrix().T @ strategy.matrix()  # >= 0 for the optimised banded C
    realized = max(X[np.ix_(s, s)].sum() for s in steps_of.values())
    reported = strategy.sensitivity_sq_prefix(T - 1, o.correlated.participation)
    assert reported >= realized * (1 - 1e-9), (reported, realized)


def test_fixed_order_schema_only_for_index_stable_datasets():
    from torch.utils.data import ConcatDataset, Subset, TensorDataset

    from ppml_fast.privacy import correlated_plan

    t = TensorDataset(torch.randn(32, 6))
    for ds, kind in [(t, "every_epoch"), (Subset(t, list(range(16))), "every_epoch"),
                     (ConcatDataset([t, t]), "every_epoch"), (_ReshufflingDataset(32), "shuffled"),
                     (Subset(_ReshufflingDataset(32), list(range(16))), "shuffled")]:
        part = correlated_plan.participation_of(DataLoader(ds, batch_size=4, shuffle=False), 12)
        assert part.kind == kind, (type(ds).__name__, part)

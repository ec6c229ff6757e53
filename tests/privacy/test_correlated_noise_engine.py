"""make_private(noise_mechanism="tree" | "banded_mf") end to end (issue 19 item 1): the gradient
noise is sigma C w_t / B from the offsets the optimizer reserved, its covariance across steps is
sigma^2 C^2 / B^2 (C^{-1} C^{-T}), epsilon is the strategy's (sensitivity sqrt(S_{T-1}), or
ceil(T/b) amplified rounds under cyclic Poisson), a step past the plan changes nothing, the
state round trip continues the exact noise (seeded, journal) or starts a new segment, offsets
are journaled and never reused.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent, RDPAccountant
from ppml_fast.accounting import matrix_factorization as mf
from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy.correlated_noise import CorrelatedNoise

SIGMA, CLIP, B = 0.7, 1.5, 8


def _data(n=64, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return TensorDataset(X, (X[:, 0] + 0.5 * X[:, 1] > 0).long())


def _private(mech="banded_mf", bands=4, *, shuffle=False, poisson=False, steps=None, epochs=None,
             seed=None, journal=None, accountant="rdp", width=6, hidden=8, n=64, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(_data(n=n, d=width), batch_size=B, shuffle=shuffle)
    eng = PrivacyEngine(accountant=accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, o, l = eng.make_private(module=model, optimizer=opt, data_loader=loader,
                                   noise_multiplier=SIGMA, max_grad_norm=CLIP, noise_mechanism=mech,
                                   bands=bands, steps=steps, epochs=epochs, poisson_sampling=poisson,
                                   noise_seed=seed, journal=journal, **kw)
    return eng, m, o, l


def _next(loader):
    """The next batch's inputs, epoch after epoch (a new pass when one ends)."""
    while True:
        it = loader.__dict__.get("_test_iter") or iter(loader)
        loader.__dict__["_test_iter"] = it
        try:
            return next(it)[0]
        except StopIteration:
            loader.__dict__["_test_iter"] = None


def _noise_step(m, o, loader):
    """One step on the loader's next batch whose clipped gradients are zero: p.grad is the
    noise alone."""
    o.zero_grad()
    (m(_next(loader)) * 0.0).sum().backward()
    o.step()
    return torch.cat([p.grad.reshape(-1) for p in o.params]).clone()


def test_noise_is_sigma_c_w_over_b_from_the_reserved_offsets():
    eng, m, o, l = _private(steps=10, seed=7)
    ref = CorrelatedNoise(o.correlated.strategy, o.correlated.participation)
    like = [torch.zeros_like(p) for p in o.params]
    for t in range(10):
        start = o.offset
        got = _noise_step(m, o, l)
        w = ref.draw(like, seed=7, offset=start, secure=False)
        ref.commit(1.0)
        want = torch.cat([(wi * (SIGMA * CLIP) / B).reshape(-1) for wi in w])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert o.offset == start + ref.blocks(like) or t == 9


def test_noise_covariance_through_the_optimizer():
    steps = 6
    eng, m, o, l = _private(steps=steps, bands=3, width=400, hidden=250)
    G = torch.stack([_noise_step(m, o, l) for _ in range(steps)]).double().numpy()
    M = o.correlated.strategy.noise_matrix()
    S = (SIGMA * CLIP / B) ** 2 * (M @ M.T)
    P = G.shape[1]
    hat = G @ G.T / P
    se = np.sqrt((np.outer(np.diag(S), np.diag(S)) + S * S) / P)
    iu = np.triu_indices(steps)
    assert (np.abs(hat - S) / se)[iu].max() < 5.0
    identity = (SIGMA * CLIP / B) ** 2 * np.eye(steps)  # DP-SGD's covariance is rejected
    assert (np.abs(hat - identity) / se)[iu].max() > 5.0


@pytest.mark.parametrize("mech,bands,shuffle", [("banded_mf", 4, False), ("tree", None, False),
                                                ("tree", None, True), ("banded_mf", 4, True)])
def test_trains_and_reports_the_strategys_epsilon(mech, bands, shuffle):
    eng, m, o, loader = _private(mech, bands, shuffle=shuffle, epochs=3)
    ds = loader.dataset
    first = nn.functional.cross_entropy(m(ds.tensors[0]), ds.tensors[1]).item()
    for _ in range(3):
        for x, y in loader:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    last = nn.functional.cross_entropy(m(ds.tensors[0]), ds.tensors[1]).item()
    assert o.steps == 24 and last < first
    part = o.correlated.participation
    if shuffle:
        assert part == mf.Participation("shuffled", steps_per_epoch=8)
    else:
        assert part == mf.Participation("every_epoch", steps_per_epoch=8)
    assert eng.accounting_analysis == o.correlated.analysis and "zero-out" in eng.accounting_analysis
    S = o.correlated.strategy.sensitivity_sq_prefix(23, part)
    want = RDPAccountant().compose(GaussianEvent(SIGMA / math.sqrt(S))).get_epsilon(1e-5)
    assert eng.get_epsilon(1e-5) == pytest.approx(want, rel=1e-9)


def test_cyclic_poisson_banded_mf_epsilon_and_alignment():
    eng, m, o, loader = _private("banded_mf", 2, poisson=True, epochs=2)
    assert type(loader).__name__ == "CyclicPoissonDataLoader" and loader.sample_rate == 2 / 8
    part = o.correlated.participation
    assert part == mf.Participation("cyclic_poisson", min_separation=2, sample_rate=0.25)
    for x, y in loader:
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    zeta = o.correlated.strategy.max_column_norm()
    want = RDPAccountant().compose(PoissonSampledEvent(0.25, GaussianEvent(SIGMA / zeta)), 4)
    assert eng.get_epsilon(1e-5) == pytest.approx(want.get_epsilon(1e-5), rel=1e-9)
    # a skipped batch would put a part's records 1 step apart: refused before anything changes
    it = iter(loader)
    next(it)
    x, y = next(it)
    o.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    steps, offset = o.steps, o.offset
    with pytest.raises(PrivacyError, match="cyclic Poisson"):
        o.step()
    assert (o.steps, o.offset, o.correlated.step) == (steps, offset, steps)


def test_step_past_the_plan_or_at_another_std_changes_nothing():
    eng, m, o, l = _private(steps=3, bands=2)
    _noise_step(m, o, l)

    def refused(match):
        grads = [p.grad for p in o.params]
        history, offset, steps = list(eng.accountant.history), o.offset, o.steps
        with pytest.raises(PrivacyError, match=match):
            o.step()
        assert o.steps == steps and o.offset == offset and list(eng.accountant.history) == history
        assert all(p.grad is g for p, g in zip(o.params, grads)) and not o._summed

    o.zero_grad(set_to_none=False)
    (m(_next(l)) * 0.0).sum().backward()
    o.noise_multiplier = 2 * SIGMA  # a noise schedule: the matrix mechanism is for one std
    refused("constant std")
    o.noise_multiplier = SIGMA
    o.step()  # the same batch, at the planned std
    _noise_step(m, o, l)
    o.zero_grad(set_to_none=False)
    (m(_next(l)) * 0.0).sum().backward()
    refused("plan has 3 steps")


def test_a_failed_step_keeps_the_recursion():
    eng, m, o, l = _private(steps=5, seed=3)
    _noise_step(m, o, l)
    compose = o.accountant.compose

    def boom(*a, **k):
        raise RuntimeError("accountant down")

    o.accountant.compose = boom
    with pytest.raises(RuntimeError, match="accountant down"):
        _noise_step(m, o, l)
    o.accountant.compose = compose
    assert o.correlated.step == o.steps == 1 and len(o.correlated._ws) == 1
    assert all(p.grad is None for p in o.params)
    l.__dict__["_test_iter"] = None  # the failed step's batch is gone: the retry starts a new pass
    with pytest.raises(PrivacyError, match="position 1 of its pass"):
        _noise_step(m, o, l)
    o._order.stepped()  # (a test shortcut) realign: the next batch of the pass is position 1
    _noise_step(m, o, l)
    assert o.correlated.step == 2


def _records(path):
    from ppml_fast.privacy.journal import PrivacyJournal

    j = PrivacyJournal(path)
    try:
        return list(j.records)
    finally:
        j.close()


@pytest.mark.parametrize("mech,bands", [("banded_mf", 3), ("tree", None)])
def test_resume_continues_the_exact_noise_and_never_reuses_an_offset(tmp_path, mech, bands):
    # 24 records in batches of 8: 3 steps per epoch, the checkpoint at an epoch's end (a resumed
    # loop starts a new pass; mid-epoch it would start a new segment instead)
    eng, m, o, l = _private(mech, bands, steps=8, seed=5, journal=tmp_path / "a.jsonl", n=24)
    whole = [_noise_step(m, o, l) for _ in range(8)]
    eps = eng.get_epsilon(1e-5)
    o.journal.close()
    eng, m, o, l = _private(mech, bands, steps=8, seed=5, journal=tmp_path / "b.jsonl", n=24)
    for _ in range(3):
        _noise_step(m, o, l)
    state = o.state_dict()
    assert state["correlated_noise"]["step"] == 3
    o.journal.close()
    eng, m, o, l = _private(mech, bands, steps=8, seed=5, journal=tmp_path / "b.jsonl", n=24)
    o.load_state_dict(state)
    assert o.correlated.segment_start == 0  # the same recursion
    for t in range(3, 8):
        assert torch.equal(_noise_step(m, o, l), whole[t])
    assert eng.get_epsilon(1e-5) == pytest.approx(eps, rel=1e-12)
    o.journal.close()
    ranges = sorted(r.offset for r in _records(tmp_path / "b.jsonl"))
    assert len(ranges) == 8 and all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


def test_resume_after_released_steps_or_without_the_key_starts_a_new_segment(tmp_path):
    eng, m, o, l = _private(steps=8, seed=5, journal=tmp_path / "j.jsonl")
    for _ in range(3):
        _noise_step(m, o, l)
    state = o.state_dict()
    _noise_step(m, o, l)  # released after the state: the old recursion must not continue
    o.journal.close()
    eng, m, o, l = _private(steps=8, seed=5, journal=tmp_path / "j.jsonl")
    o.load_state_dict(state)
    assert o.correlated.segment_start == 3 and o.correlated._seg.steps == 5
    for _ in range(5):
        _noise_step(m, o, l)
    o.journal.close()
    ranges = sorted(r.offset for r in _records(tmp_path / "j.jsonl"))
    assert len(ranges) == 9 and all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    # an unseeded run: the key is not in the state, the noise is not either
    eng, m, o, l = _private(steps=8)
    _noise_step(m, o, l)
    state = o.state_dict()
    assert state["seed"] is None and not any(isinstance(v, torch.Tensor)
                                             for v in state["correlated_noise"].values())
    with pytest.warns(UserWarning, match="without a journal"):
        o.load_state_dict(state)
    assert o.correlated.segment_start == 1
    with pytest.raises(ValueError, match="another noise mechanism"):
        _private("gaussian", None)[2].load_state_dict(state)
    with pytest.raises(ValueError, match="another noise plan"):
        _private(steps=9)[2].load_state_dict(state)


def test_arguments_and_loaders_refused():
    with pytest.raises(ValueError, match="exactly one of epochs= or steps="):
        _private()
    with pytest.raises(ValueError, match="needs bands="):
        _private(bands=None, steps=4)
    with pytest.raises(ValueError, match="with 'gaussian' pass none"):
        _private("gaussian", 4)
    with pytest.raises(ValueError, match="no privacy amplification"):
        _private("tree", None, poisson=True, steps=4)
    with pytest.raises(ValueError, match="steps_per_epoch >= bands - 1"):
        _private(shuffle=True, bands=12, epochs=2)  # 8 batches per epoch
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number > 0"):
        eng = PrivacyEngine()
        model = nn.Linear(6, 2)
        eng.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         data_loader=DataLoader(_data(), batch_size=B), noise_multiplier=0.0,
                         max_grad_norm=1.0, noise_mechanism="tree", steps=4, poisson_sampling=False)
    model = nn.Linear(6, 2)
    weighted = DataLoader(_data(), batch_size=B, sampler=WeightedRandomSampler([1.0] * 64, 64))
    with pytest.raises(ValueError, match="WeightedRandomSampler"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=weighted, noise_multiplier=1.0, max_grad_norm=1.0,
                                         noise_mechanism="tree", steps=4, poisson_sampling=False)


@pytest.mark.parametrize("mech,bands,poisson", [("banded_mf", 4, False), ("banded_mf", 2, True),
                                                ("tree", None, False)])
def test_make_private_with_epsilon_calibrates_to_the_plan(mech, bands, poisson):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    eng = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, o, loader = eng.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=B), target_epsilon=3.0, target_delta=1e-5,
            epochs=2, max_grad_norm=1.0, noise_mechanism=mech, bands=bands, poisson_sampling=poisson)
    assert o.correlated.steps == 16
    for _ in range(2):
        for x, y in loader:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert 3.0 - 0.03 <= eng.get_epsilon(1e-5) <= 3.0


def test_secure_mode_with_virtual_batches_on_the_cyclic_loader():
    from ppml_fast.privacy import BatchMemoryManager

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    eng = PrivacyEngine(accountant="rdp", secure_mode=True)
    m, o, loader = eng.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=B), noise_multiplier=SIGMA, max_grad_norm=CLIP,
        noise_mechanism="banded_mf", bands=2, epochs=1)
    assert loader.batch_sampler.secure and sorted(torch.cat(loader.batch_sampler._members).tolist()) == list(range(64))
    offsets = []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=o) as physical:
        for x, y in physical:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            before = o.offset
            o.step()
            if o.offset != before:
                offsets.append((before, o.offset))
    assert o.steps == len(offsets) == 8
    assert all(b - a == o.correlated.blocks(o._grads()) for a, b in offsets)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))  # contiguous, never reused
    zeta = o.correlated.strategy.max_column_norm()
    want = RDPAccountant().compose(PoissonSampledEvent(0.25, GaussianEvent(SIGMA / zeta)), 4)
    assert eng.get_epsilon(1e-5) == pytest.approx(want.get_epsilon(1e-5), rel=1e-9)
    state = o.state_dict()
    assert state["seed"] is None
    with pytest.warns(UserWarning, match="without a journal"):
        o.load_state_dict(state)
    assert o.correlated.segment_start == 8


def test_fixed_batches_loader_gives_the_users_batches():
    from ppml_fast.privacy.fixed_batches import FixedBatchesDataLoader

    data = _data(n=30)
    user = DataLoader(data, batch_size=B)
    ours = FixedBatchesDataLoader.from_data_loader(user)
    assert len(ours) == len(user) == 4
    for (a, _), (b, _) in zip(user, ours):
        assert torch.equal(a, b)
    assert (ours.handed, ours.position) == (4, 3)
    shuffled = FixedBatchesDataLoader.from_data_loader(DataLoader(data, batch_size=B, shuffle=True))
    rows = {tuple(r.tolist()): i for i, r in enumerate(data.tensors[0])}
    for _ in range(2):  # each pass a permutation: every record once
        seen = [rows[tuple(r.tolist())] for x, _ in shuffled for r in x]
        assert sorted(seen) == list(range(30))


def test_budget_stop_uses_the_strategys_events():
    from ppml_fast.accounting.errors import PrivacyBudgetExceeded

    eng, m, o, l = _private(steps=24)  # 3 epochs of 8 steps: epsilon grows in the 2nd epoch
    part, strategy = o.correlated.participation, o.correlated.strategy
    eps = [RDPAccountant().compose(GaussianEvent(SIGMA / math.sqrt(strategy.sensitivity_sq_prefix(t, part))))
           .get_epsilon(1e-5) for t in range(24)]
    t = next(t for t in range(8, 24) if eps[t] > eps[t - 1] * 1.001)
    eng, m, o, l = _private(steps=24, max_epsilon=(eps[t - 1] + eps[t]) / 2, delta=1e-5)
    for _ in range(t):
        _noise_step(m, o, l)
    offset = o.offset
    with pytest.raises(PrivacyBudgetExceeded):
        _noise_step(m, o, l)
    assert o.steps == o.correlated.step == t and o.offset == offset


def test_resume_with_another_journal_is_not_exact(tmp_path):
    eng, m, o, l = _private(steps=6, seed=5, journal=tmp_path / "a.jsonl", n=24)
    for _ in range(3):
        _noise_step(m, o, l)
    state = o.state_dict()
    o.journal.close()
    # a fresh journal cannot tell whether steps were released after the state: a new segment
    eng, m, o, l = _private(steps=6, seed=5, journal=tmp_path / "other.jsonl", n=24)
    o.load_state_dict(state)
    assert o.correlated.segment_start == 3

"""PrivacyEngine with poisson_sampling=False accounts the loader's own batches (privacy/sampling.py):
one Gaussian per epoch touched, counted by steps, records and passes over the loader; Poisson
sampling stays as it was."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset, WeightedRandomSampler

from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent, pld_math
from ppml_fast.accounting.errors import PrivacyBudgetExceeded
from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy import sampling

N, B, SIGMA = 100, 16, 1.0  # 7 batches per epoch, the last of 4 records
K = 7


def _data(n=N):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _private(loader=None, sigma=SIGMA, accountant="pld", **kw):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    engine = PrivacyEngine(accountant=accountant)
    loader = loader if loader is not None else DataLoader(_data(), batch_size=B, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=loader, noise_multiplier=sigma, max_grad_norm=1.0,
                                         poisson_sampling=kw.pop("poisson_sampling", False), noise_seed=1, **kw)
    return engine, m, opt, dl


def _step(m, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()


def _gauss_eps(sigma, epochs, delta=1e-5):
    return pld_math.gaussian_epsilon(sigma / math.sqrt(epochs), delta)


def _run(m, opt, dl, steps):
    done = 0
    while done < steps:
        for x, y in dl:
            _step(m, opt, x, y)
            done += 1
            if done == steps:
                return


@pytest.mark.parametrize("steps,epochs", [(1, 1), (7, 1), (8, 2), (14, 2), (20, 3)])
def test_engine_reports_one_gaussian_per_epoch_touched(steps, epochs):
    engine, m, opt, dl = _private()
    _run(m, opt, dl, steps)
    assert opt.steps == steps
    assert engine.get_epsilon(1e-5) == pytest.approx(_gauss_eps(SIGMA, epochs), rel=1e-9)
    assert "ShuffledBatchesEvent" in engine.accounting_analysis and "zero-out" in engine.accounting_analysis


def test_shuffled_epsilon_is_above_the_poisson_one():
    engine, m, opt, dl = _private()
    _run(m, opt, dl, 3 * K)
    poisson = PLDAccountant().compose(PoissonSampledEvent(1 / K, GaussianEvent(SIGMA)), 3 * K).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) > 1.5 * poisson


def test_the_poisson_default_is_unchanged():
    engine, m, opt, dl = _private(poisson_sampling=True, generator=torch.Generator().manual_seed(0))
    assert getattr(opt, "sampling", None) is None
    assert opt._event() == PoissonSampledEvent(1 / K, GaussianEvent(SIGMA))
    _run(m, opt, dl, 5)
    assert engine.accountant.events == [("gaussian", 1 / K, SIGMA, 5)]
    assert engine.accounting_analysis.startswith("Poisson sampling")


def test_a_loop_broken_off_mid_epoch_starts_a_new_epoch():
    """Each iter(loader) is a new permutation: three passes of 3 steps are three epochs, not the
    two that 9 steps of K = 7 would suggest."""
    engine, m, opt, dl = _private()
    for _ in range(3):
        for i, (x, y) in enumerate(dl):
            _step(m, opt, x, y)
            if i == 2:
                break
    assert engine.get_epsilon(1e-5) == pytest.approx(_gauss_eps(SIGMA, 3), rel=1e-9)


def test_the_counter_yields_the_same_batches():
    loader = DataLoader(_data(), batch_size=B, shuffle=False)
    before = [y.tolist() for _, y in loader]
    _private(loader)
    assert [y.tolist() for _, y in loader] == before and len(loader) == K


def test_a_step_spanning_two_epochs_is_charged_for_a_record_twice():
    """Two batches per step (skip steps): step 4 holds the last batch of epoch 1 and the first of
    epoch 2, so a record can be in it twice: sensitivity 2C, charged sigma / 2."""
    engine, m, opt, dl = _private(loader=DataLoader(_data(), batch_size=B, shuffle=False))
    for j, (x, y) in enumerate(itertools.islice(itertools.chain(dl, dl), 8)):  # passes drawn lazily
        opt.zero_grad() if j % 2 == 0 else None
        nn.functional.cross_entropy(m(x), y).backward()
        opt.signal_skip_step(j % 2 == 0)
        opt.step()
    assert opt.steps == 4
    want = PLDAccountant().compose(GaussianEvent(SIGMA)).compose(GaussianEvent(SIGMA / 2)).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(want, rel=1e-9)


def test_noise_lowered_mid_epoch_charges_the_epoch_again():
    engine, m, opt, dl = _private()
    it = iter(dl)
    _step(m, opt, *next(it))
    opt.noise_multiplier = 0.7
    _step(m, opt, *next(it))
    _step(m, opt, *next(it))  # same noise: nothing more
    want = PLDAccountant().compose(GaussianEvent(SIGMA)).compose(GaussianEvent(0.7)).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(want, rel=1e-9)


def test_a_reloaded_accountant_restarts_the_epoch():
    engine, m, opt, dl = _private()
    _step(m, opt, *next(iter(dl)))
    state = engine.state_dict()  # one epoch charged
    it = iter(dl)
    _step(m, opt, *next(it))  # a new pass: two
    assert engine.get_epsilon(1e-5) == pytest.approx(_gauss_eps(SIGMA, 2), rel=1e-9)
    engine.load_state_dict(state)  # back to one; the pass under way must be charged again
    _step(m, opt, *next(it))
    assert engine.get_epsilon(1e-5) == pytest.approx(_gauss_eps(SIGMA, 2), rel=1e-9)
    _step(m, opt, *next(it))  # the same pass: nothing more
    assert engine.get_epsilon(1e-5) == pytest.approx(_gauss_eps(SIGMA, 2), rel=1e-9)


def test_budget_stop_on_the_step_that_starts_an_epoch():
    eps_two = _gauss_eps(SIGMA, 2)
    engine, m, opt, dl = _private(max_epsilon=eps_two * 0.99, delta=1e-5)
    _run(m, opt, dl, K)  # the first epoch fits
    x, y = next(iter(dl))
    with pytest.raises(PrivacyBudgetExceeded):
        _step(m, opt, x, y)
    assert opt.steps == K


def test_make_private_with_epsilon_calibrates_the_shuffled_account():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    engine = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, opt, dl = engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=B, shuffle=True), target_epsilon=3.0,
            target_delta=1e-5, epochs=2, max_grad_norm=1.0, poisson_sampling=False)
    _run(m, opt, dl, 2 * K)
    assert 2.95 <= engine.get_epsilon(1e-5) <= 3.0


@pytest.mark.parametrize("sampler", [
    lambda d: RandomSampler(d, replacement=True),
    lambda d: WeightedRandomSampler([1.0] * len(d), len(d)),
    lambda d: RandomSampler(d, num_samples=2 * len(d)),
])
def test_samplers_that_repeat_records_are_refused(sampler):
    d = _data()
    with pytest.raises(ValueError, match="several times|with replacement"):
        _private(DataLoader(d, batch_size=B, sampler=sampler(d)))


class _Evens(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(0, self.n, 2))

    def __len__(self):
        return (self.n + 1) // 2


def test_an_unknown_sampler_charges_every_step_and_says_so():
    d = _data()
    loader = DataLoader(d, batch_size=B, sampler=_Evens(len(d)))
    model = nn.Linear(5, 3)
    with pytest.warns(UserWarning, match="unknown"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=1.0,
                                     poisson_sampling=False)
    engine, m, opt, dl = _private(loader)
    _run(m, opt, dl, 3)
    assert engine.get_epsilon(1e-5) == pytest.approx(_gauss_eps(SIGMA, 3), rel=1e-9)
    assert "unknown sampling" in engine.accounting_analysis


def test_the_warning_says_what_is_accounted():
    model = nn.Linear(5, 3)
    with pytest.warns(UserWarning, match="without Poisson amplification"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(_data(), batch_size=B), noise_multiplier=SIGMA,
                                     max_grad_norm=1.0, poisson_sampling=False)


def test_substitution_plan_halves_the_charged_noise():
    plan = sampling.analyse(DataLoader(_data(), batch_size=B, shuffle=True, drop_last=True), adjacency="substitution")
    assert plan.noise_scale == 0.5 and plan.steps_per_epoch == 6 and plan.records_per_epoch == 96
    assert plan.participations(13) == 3
    with pytest.raises(ValueError, match="adjacency"):
        sampling.analyse(DataLoader(_data(), batch_size=B), adjacency="add/remove")


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_journal_records_the_sampling_events(tmp_path, accountant):
    path = tmp_path / "journal"
    engine, m, opt, dl = _private(accountant=accountant, journal=str(path))
    _run(m, opt, dl, K + 1)
    want = PLDAccountant().compose(GaussianEvent(SIGMA), 2).get_epsilon(1e-5)
    got = engine.get_epsilon(1e-5)
    assert got == pytest.approx(want, rel=1e-9) if accountant == "pld" else got >= want
    assert path.exists()


@pytest.mark.parametrize("n,drop_last,scale", [(100, False, 0.5), (99, False, 1.0), (100, True, 1.0)])
def test_a_padding_distributed_sampler_is_charged_twice_the_sensitivity(n, drop_last, scale):
    """DistributedSampler pads a dataset not divisible by the ranks with repeated records: a
    record can then be in an epoch twice, so the per-epoch Gaussian has sensitivity 2C."""
    from torch.utils.data.distributed import DistributedSampler

    d = _data(n)
    s = DistributedSampler(d, num_replicas=3, rank=0, shuffle=True, drop_last=drop_last)
    plan = sampling.analyse(DataLoader(d, batch_size=B, sampler=s))
    assert plan.noise_scale == scale and plan.kind == "shuffle"
    assert plan.steps_per_epoch == len(DataLoader(d, batch_size=B, sampler=s))


def test_a_custom_batch_sampler_is_per_step():
    d = _data()
    plan = sampling.analyse(DataLoader(d, batch_sampler=[[0, 1], [2, 3], [4, 5]]))
    assert plan.kind == "per_step" and plan.participations(5) == 5


def test_a_substitution_plan_attached_before_the_first_step():
    engine, m, opt, dl = _private()
    sampling.attach(opt, sampling.analyse(dl, adjacency="substitution"), dl)
    assert sum(h.__qualname__.endswith("stepped") for h in opt.step_hooks) == 1
    _run(m, opt, dl, K + 1)
    assert engine.get_epsilon(1e-5) == pytest.approx(_gauss_eps(SIGMA / 2, 2), rel=1e-9)


def test_a_second_make_private_on_the_same_loader_sees_its_sampler():
    loader = DataLoader(_data(), batch_size=B, shuffle=True)
    _private(loader)
    engine, m, opt, dl = _private(loader)
    assert opt.sampling.plan.kind == "shuffle" and opt.sampling.counter is not None


def test_distributed_ranks_without_a_distributed_sampler_multiply_the_sensitivity(monkeypatch):
    """Every rank iterating the whole dataset puts a record in a global step once per rank."""
    from torch.utils.data.distributed import DistributedSampler

    monkeypatch.setattr(sampling, "_world_size", lambda: 3)
    d = _data(99)
    plan = sampling.analyse(DataLoader(d, batch_size=B, shuffle=True), distributed=True)
    assert plan.noise_scale == pytest.approx(1 / 3) and "3 ranks" in plan.analysis
    s = DistributedSampler(d, num_replicas=3, rank=1)
    assert sampling.analyse(DataLoader(d, batch_size=B, sampler=s), distributed=True).noise_scale == 1.0
    assert sampling.analyse(DataLoader(d, batch_size=B, shuffle=True)).noise_scale == 1.0

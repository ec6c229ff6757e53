"""Issue 15, item 2: secure mode sampled batches from torch's Mersenne Twister (after
torch.manual_seed(0) all five batches of PrivacyEngine(secure_mode=True) were predicted), and
silently ignored seeds. Now every record-sampling decision in secure mode comes from the OS
CSPRNG (ppml_fast.secure_random) and a seed or generator there is an error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import DPOptimizer, PrivacyEngine, PrivateModule
from ppml_fast.privacy.data import DPDataLoader, PoissonBatchSampler
from ppml_fast.secure_random import bernoulli_mask, rate_threshold, uniform53


def _loader(n: int = 200, batch: int = 40) -> DataLoader:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return DataLoader(TensorDataset(x, torch.zeros(n)), batch_size=batch)


def _secure_batches(seed: int) -> list[list[int]]:
    net = nn.Linear(1, 1)
    _, _, loader = PrivacyEngine(secure_mode=True).make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data_loader=_loader(),
        noise_multiplier=1.0, max_grad_norm=1.0)
    torch.manual_seed(seed)  # what an attacker who knows torch's seed replays
    return [xb.squeeze(1).long().tolist() for xb, _ in loader]


def test_secure_batches_are_not_predicted_from_torchs_seed():
    a, b = _secure_batches(0), _secure_batches(0)
    assert len(a) == 5
    assert a != b  # the old sampler used torch's global generator: identical batches


def test_secure_sampler_never_touches_torchs_generators(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("secure sampling called torch.rand")

    sampler = PoissonBatchSampler(1000, 0.1, 3, secure=True)
    monkeypatch.setattr(torch, "rand", refuse)
    state = torch.get_rng_state()
    batches = list(sampler)
    assert torch.equal(state, torch.get_rng_state())
    assert len(batches) == 3 and all(0 < len(b) < 300 for b in batches)


def test_seeds_and_generators_with_secure_mode_are_errors():
    net = nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = PrivacyEngine(secure_mode=True)
    with pytest.raises(ValueError, match="noise_seed=1 was passed with secure mode"):
        engine.make_private(module=net, optimizer=opt, data_loader=_loader(), noise_multiplier=1.0,
                            max_grad_norm=1.0, noise_seed=1)
    with pytest.raises(ValueError, match="generator was passed with secure_mode=True"):
        engine.make_private(module=net, optimizer=opt, data_loader=_loader(), noise_multiplier=1.0,
                            max_grad_norm=1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="secure mode"):
        pm = PrivateModule(nn.Linear(1, 1))
        DPOptimizer(torch.optim.SGD(pm.parameters(), lr=0.1), module=pm, noise_multiplier=1.0,
                    max_grad_norm=1.0, expected_batch_size=4.0, seed=3, secure_mode=True)
    with pytest.raises(ValueError, match="generator was passed with secure=True"):
        PoissonBatchSampler(10, 0.5, 2, torch.Generator(), secure=True)
    # the non-secure engine still takes both (reproducible runs)
    net2 = nn.Linear(1, 1)
    PrivacyEngine().make_private(module=net2, optimizer=torch.optim.SGD(net2.parameters(), lr=0.1),
                                 data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0,
                                 noise_seed=1, generator=torch.Generator().manual_seed(0))


def test_secure_loader_inclusion_is_binomial():
    loader = DPDataLoader(TensorDataset(torch.zeros(2000, 1)), sample_rate=0.05, num_batches=40,
                          secure=True)
    sizes = [len(xb[0]) for xb in loader]
    n, q = 2000 * 40, 0.05
    total = sum(sizes)
    assert abs(total - n * q) < 5 * math.sqrt(n * q * (1 - q))


def test_bernoulli_mask_is_exact_at_the_edges_and_never_above_q():
    assert rate_threshold(0.5) == 2**52
    assert rate_threshold(1.0) == 2**53 and rate_threshold(0.0) == 0
    q = 0.1  # not a dyadic rational: floor(q 2^53) / 2^53 <= q
    assert rate_threshold(q) / 2**53 <= q and q - rate_threshold(q) / 2**53 < 2**-53
    assert bool(bernoulli_mask(1000, 1.0).all()) and not bool(bernoulli_mask(1000, 0.0).any())
    m = bernoulli_mask(400_000, 0.3)
    assert abs(float(m.double().mean()) - 0.3) < 5 * math.sqrt(0.21 / 400_000)
    u = uniform53(200_000)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 200_000)
    assert bool((u * 2**53 == torch.floor(u * 2**53)).all())  # on the 2^-53 grid
    with pytest.raises(ValueError, match="sampling rate"):
        bernoulli_mask(3, 1.5)
    with pytest.raises(ValueError, match="n must be an int"):
        bernoulli_mask(-1, 0.5)

"""Distributed Poisson sampling for ``make_private(distributed=True)`` on 2 and 3 gloo ranks (CPU).

Every rank calls ``torch.manual_seed(0)`` (ranks seeded alike, the common setup). Checked:
(a) over many logical steps each record's inclusion count is Binomial(steps, q) — two-sided
    thresholds from the exact binomial distribution at a family-wise false-alarm rate of 1e-6 —
    and no record is in two ranks' batches in one step (also in secure mode, masks from the OS
    CSPRNG); with a user generator given alike on
    every rank, the ranks' masks are independent (co-inclusions Binomial(., q^2));
(b) the sensitivity of one all-reduced step, noise removed, SGD(lr=1): for neighbouring datasets
    (record r removed = its gradient made exactly zero, the same sampling randomness),
    ||delta(D) - delta(D')|| * E / C <= 1 + 1e-5 where E is the denominator the optimizer divides
    by (noise std on the update is sigma C / E, so this is the sensitivity in units of the noise);
(c) that denominator, and the rate the accountant gets, are q N and q (q = 1 / len(data_loader),
    N the whole dataset), read from the optimizer and measured from the noise actually added.
One spawn of 5 processes (a 2-rank and a 3-rank group) runs all checks; the tests read its results.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy.data import DistributedDPDataLoader, DistributedPoissonBatchSampler

N = 61          # records in the whole dataset (uneven shards for 2 and 3 ranks)
EPOCHS = 300    # logical steps in (a): EPOCHS * len(loader)
ALPHA = 1e-6    # family-wise false-alarm probability of each statistical check
SENS_N, SENS_TRIALS, C = 12, 24, 1.0


# -- exact binomial thresholds --------------------------------------------------------------------
def _binom_interval(n: int, p: float, alpha: float) -> tuple[int, int]:
    """(lo, hi) with P(X < lo) <= alpha/2 and P(X > hi) <= alpha/2 for X ~ Binomial(n, p)."""
    logpmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
              + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(n + 1)]
    pmf = [math.exp(v) for v in logpmf]
    lo, acc = 0, 0.0
    while acc + pmf[lo] <= alpha / 2:
        acc += pmf[lo]
        lo += 1
    hi, acc = n, 0.0
    while acc + pmf[hi] <= alpha / 2:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


# -- the worker -----------------------------------------------------------------------------------
def _private(loader, secure_mode: bool = False, **kw):
    model = nn.Linear(3, 2, bias=False)
    return PrivacyEngine(secure_mode=secure_mode).make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                        data_loader=loader, noise_multiplier=1.0, max_grad_norm=C,
                                        distributed=True, **kw)


def _draws(loader, epochs: int) -> list[list[int]]:
    """The records of each step: one epoch through the loader itself, the rest from its batch
    sampler (the same stream, without the cost of fetching and collating records)."""
    draws = [batch[0].tolist() for batch in loader]
    assert len(draws) == len(loader)
    return draws + [list(b) for _ in range(epochs - 1) for b in loader.batch_sampler]


def _inclusion(world: int, rank: int) -> dict:
    ds = TensorDataset(torch.arange(N))
    plain = DataLoader(ds, batch_size=16)  # 4 batches: q = 1/4
    sharded = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, world, rank, shuffle=False))
    out = {}
    for name, user_loader, kw in (("default", plain, {}),
                                  ("generator", plain, {"generator": torch.Generator().manual_seed(7)}),
                                  ("distributed_sampler", sharded, {}),
                                  ("secure", plain, {"secure_mode": True})):
        _, _, loader = _private(user_loader, **kw)
        assert loader.batch_sampler.secure == (name == "secure")
        out[name] = {"q": 1 / len(user_loader), "draws": _draws(loader, EPOCHS)}
    return out


def _sensitivity(world: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(3)
    x = 10 * torch.randn(SENS_N, 3, generator=g, dtype=torch.float64)  # every gradient norm >> C
    y = torch.randn(SENS_N, 2, generator=g, dtype=torch.float64)
    user_loader = DataLoader(TensorDataset(x, y), batch_size=SENS_N // 2)  # q = 1/2
    ratios = []
    for t in range(SENS_TRIALS):
        r = t % SENS_N
        x_removed = x.clone()
        x_removed[r] = 0.0  # no bias: record r's gradient is exactly zero, i.e. removed from the sum
        deltas = []
        for xs in (x, x_removed):
            torch.manual_seed(0)
            model = nn.Linear(3, 2, bias=False).double()
            w0 = model.weight.detach().clone()
            private, opt, loader = PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                data_loader=DataLoader(TensorDataset(xs, y), batch_size=SENS_N // 2),
                noise_multiplier=0.0, max_grad_norm=C, distributed=True, loss_reduction="sum",
                generator=torch.Generator().manual_seed(100 + t))
            xb, yb = next(iter(loader))
            opt.zero_grad()
            ((private(xb) - yb) ** 2).sum().backward()
            opt.step()
            deltas.append(model.weight.detach() - w0)
        ratios.append(float((deltas[0] - deltas[1]).norm()) * opt.expected_batch_size / C)
    # (c): the denominator and the rate as the optimizer holds them, and as the noise shows them
    ds = TensorDataset(torch.zeros(N, 100, dtype=torch.float64))
    model = nn.Linear(100, 100, bias=False).double()
    private, opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(ds, batch_size=16), noise_multiplier=1.0, max_grad_norm=C, distributed=True)
    w0 = model.weight.detach().clone()
    opt.zero_grad()
    private(torch.zeros(1, 100, dtype=torch.float64)).sum().backward()  # a zero gradient: the update is noise
    opt.step()
    noise_std = float((model.weight.detach() - w0).std())
    return {"ratios": ratios, "q_N": len(user_loader.dataset) / len(user_loader),
            "expected": opt.expected_batch_size, "sample_rate": opt.sample_rate,
            "noise_std_times_E": noise_std * opt.expected_batch_size, "noise_numel": model.weight.numel(),
            "c_q_N": N / 4}


def _refusals(world: int, rank: int) -> list[str]:
    ds = TensorDataset(torch.arange(N))
    msgs = []
    for sampler in (DistributedSampler(ds, num_replicas=world + 1, rank=rank),
                    DistributedSampler(ds, num_replicas=world, rank=(rank + 1) % world)):
        try:
            _private(DataLoader(ds, batch_size=4, sampler=sampler))
            msgs.append("")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def _empty_batch_step(world: int, rank: int) -> list[torch.Tensor]:
    """One step where only rank 0 drew records (a Poisson batch may be empty on any rank): the
    empty ranks still join the all-reduce, and every rank ends with the same parameters."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    private, opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.arange(8)), batch_size=2), noise_multiplier=0.0,
        max_grad_norm=C, distributed=True, loss_reduction="sum")
    x, y = _EMPTY_STEP_DATA
    if rank != 0:
        x, y = x[:0], y[:0]
    opt.zero_grad()
    nn.functional.cross_entropy(private(x), y, reduction="sum").backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


_EMPTY_STEP_DATA = (torch.randn(4, 3, generator=torch.Generator().manual_seed(9)), torch.tensor([0, 1, 1, 0]))


def _worker(proc: int, init_prefix: str, out_prefix: str) -> None:
    """Processes 0-1 form a 2-rank group, processes 2-4 a 3-rank group (one spawn for both)."""
    world, rank = (2, proc) if proc < 2 else (3, proc - 2)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_prefix}{world}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # ranks seeded alike
        mine = {"inclusion": _inclusion(world, rank), "sensitivity": _sensitivity(world, rank),
                "refusals": _refusals(world, rank), "empty_step": _empty_batch_step(world, rank)}
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            torch.save(everyone, f"{out_prefix}{world}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def _spawned(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "out")), nprocs=5, join=True)
    return str(tmp / "out")


@pytest.fixture(params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, _spawned):
    return request.param, torch.load(f"{_spawned}{request.param}")


# -- (a) inclusion frequencies, disjointness, independence ----------------------------------------
@pytest.mark.parametrize("config", ["default", "generator", "distributed_sampler", "secure"])
def test_each_record_in_at_most_one_rank_with_probability_q(ranks, config):
    world, results = ranks
    q = results[0]["inclusion"][config]["q"]
    per_rank = [r["inclusion"][config]["draws"] for r in results]
    steps = len(per_rank[0])
    assert all(len(d) == steps for d in per_rank), "ranks must yield the same number of batches"
    counts, overlaps = [0] * N, 0
    for s in range(steps):
        seen: set[int] = set()
        for d in per_rank:
            for j in d[s]:
                overlaps += j in seen
                seen.add(j)
                counts[j] += 1
    assert overlaps == 0, f"{overlaps} (step, record) pairs were in two ranks' batches"
    lo, hi = _binom_interval(steps, q, ALPHA / (N + 1))
    bad = [(j, c) for j, c in enumerate(counts) if not lo <= c <= hi]
    assert not bad, f"inclusion counts outside [{lo}, {hi}] of Binomial({steps}, {q}): {bad[:5]}"
    lo, hi = _binom_interval(steps * N, q, ALPHA / (N + 1))
    assert lo <= sum(counts) <= hi, f"overall rate {sum(counts) / (steps * N):.4f} against q = {q}"


def test_a_generator_given_alike_gives_independent_rank_streams(ranks):
    world, results = ranks
    q = results[0]["inclusion"]["generator"]["q"]
    a, b = (r["inclusion"]["generator"]["draws"] for r in results[:2])
    m = len(range(1, N, world))  # the smaller of rank 0's and rank 1's shards
    # position i of rank 0's shard is record world*i, of rank 1's world*i + 1: count the steps and
    # positions both ranks drew (identical streams would give q, not q^2, of them)
    both = sum(len({j // world for j in x if j // world < m} & {j // world for j in y if j // world < m})
               for x, y in zip(a, b))
    lo, hi = _binom_interval(len(a) * m, q * q, ALPHA)
    assert lo <= both <= hi, f"{both} co-inclusions; Binomial({len(a) * m}, q^2) gives [{lo}, {hi}]"


# -- (b) the sensitivity of one all-reduced step ---------------------------------------------------
def test_one_step_moves_by_at_most_c_in_noise_units(ranks):
    world, results = ranks
    ratios = results[0]["sensitivity"]["ratios"]
    for r in results[1:]:
        assert r["sensitivity"]["ratios"] == ratios  # the ranks hold the same parameters
    assert max(ratios) <= 1 + 1e-5, f"||delta(D) - delta(D')|| E / C up to {max(ratios):.4f}"
    # the check is not vacuous: the removed record was sampled in some trials (P(never) = 2^-24)
    assert max(ratios) >= 1 - 1e-5


# -- (c) the denominator and the accounted rate ---------------------------------------------------
def test_denominator_and_rate_are_q_n_and_q(ranks):
    world, results = ranks
    for r in results:
        s = r["sensitivity"]
        assert s["expected"] == pytest.approx(s["c_q_N"], rel=1e-12)
        assert s["sample_rate"] == pytest.approx(1 / 4, rel=1e-12)
        # the update's noise std is sigma C / E: the sample std of n normals is within
        # 6 / sqrt(2 n) relative of the truth except with probability ~1e-9
        rel = 6 / math.sqrt(2 * s["noise_numel"])
        assert s["noise_std_times_E"] / s["expected"] == pytest.approx(C / s["c_q_N"], rel=rel)


def test_a_distributed_sampler_that_disagrees_with_torch_distributed_is_refused(ranks):
    world, results = ranks
    for r in results:
        assert all("DistributedSampler" in m and "must match" in m for m in r["refusals"]), r["refusals"]


def test_a_rank_with_an_empty_batch_still_steps_with_the_others(ranks):
    world, results = ranks
    from ppml_fast.privacy import DPOptimizer, PrivateModule

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    private = PrivateModule(model, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), module=private, noise_multiplier=0.0,
                      max_grad_norm=C, expected_batch_size=8 / 4)  # q N of the workers' loader
    x, y = _EMPTY_STEP_DATA
    opt.zero_grad()
    nn.functional.cross_entropy(private(x), y, reduction="sum").backward()
    opt.step()
    for r in results:
        for a, b in zip(r["empty_step"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


# -- single process ------------------------------------------------------------------------------
def test_the_sampler_alone_gives_disjoint_covering_shards_and_keeps_the_user_generator():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    samplers = [DistributedPoissonBatchSampler(10, 0.5, 50, num_replicas=3, rank=r, generator=g) for r in range(3)]
    assert torch.equal(g.get_state(), state)  # read, not advanced
    assert sorted(sum((s.shard.tolist() for s in samplers), [])) == list(range(10))
    masks = [list(s) for s in samplers]
    assert masks != [list(s) for s in [DistributedPoissonBatchSampler(10, 0.5, 50, num_replicas=3, rank=r)
                                       for r in range(3)]]  # OS entropy by default
    again = [list(DistributedPoissonBatchSampler(10, 0.5, 50, num_replicas=3, rank=r, generator=g))
             for r in range(3)]
    assert masks == again  # a user generator makes it reproducible
    for step in zip(*masks):
        flat = sum(step, [])
        assert len(flat) == len(set(flat))


def test_secure_masks_come_from_the_os_csprng_not_torch(monkeypatch):
    with pytest.raises(ValueError, match="generator was passed with secure=True"):
        DistributedPoissonBatchSampler(10, 0.5, 2, num_replicas=2, rank=0, secure=True,
                                       generator=torch.Generator().manual_seed(0))

    def no_torch_rng(*args, **kwargs):
        raise AssertionError("secure sampling drew from torch's generator")

    monkeypatch.setattr(torch, "randint", no_torch_rng)
    monkeypatch.setattr(torch, "rand", no_torch_rng)
    torch.manual_seed(0)
    a = [list(DistributedPoissonBatchSampler(40, 0.5, 20, num_replicas=2, rank=r, secure=True)) for r in range(2)]
    torch.manual_seed(0)
    b = [list(DistributedPoissonBatchSampler(40, 0.5, 20, num_replicas=2, rank=r, secure=True)) for r in range(2)]
    assert a != b  # P(equal) = 2^-800
    for step in zip(*a):
        assert not set(step[0]) & set(step[1]) and all(j % 2 == r for r in range(2) for j in step[r])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank must be in"):
        DistributedPoissonBatchSampler(10, 0.5, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas"):
        DistributedPoissonBatchSampler(10, 0.5, 2, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="sample_rate"):
        DistributedPoissonBatchSampler(10, 1.5, 2, num_replicas=2, rank=0)
    with pytest.raises(TypeError, match="generator"):
        DistributedPoissonBatchSampler(10, 0.5, 2, num_replicas=2, rank=0, generator=3)


def test_empty_batches_collate_to_zero_length_tensors():
    ds = TensorDataset(torch.arange(7), torch.randn(7, 3))
    loader = DistributedDPDataLoader(ds, sample_rate=1e-12, num_batches=3, num_replicas=2, rank=1)
    for idx, x in loader:
        assert idx.shape == (0,) and x.shape == (0, 3)
    assert loader.expected_batch_size == pytest.approx(7e-12)
    assert loader.local_expected_batch_size == pytest.approx(3e-12)


def test_distributed_needs_an_initialised_process_group():
    model = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(TensorDataset(torch.arange(8)), batch_size=2),
                                     noise_multiplier=1.0, max_grad_norm=1.0, distributed=True)

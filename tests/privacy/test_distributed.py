"""DistributedDPOptimizer on 2 CPU processes (gloo): noise once per logical step, and the
parameters equal those of one process that saw both ranks' samples, for the same seed."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ppml_fast.privacy import DPOptimizer, PrivateModule
from ppml_fast.privacy.distributed import DistributedDPOptimizer

STEPS = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(STEPS)]


def _train(opt_cls, model, batches, **kw):
    private = PrivateModule(model)
    seed = None if kw.get("secure_mode") else 42  # secure noise cannot be seeded
    opt = opt_cls(torch.optim.SGD(model.parameters(), lr=0.5), module=private, noise_multiplier=1.0,
                  max_grad_norm=0.5, expected_batch_size=16.0, seed=seed, **kw)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(private(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, init_file, out_file, secure=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        if rank == 1:  # a different init: the optimizer must broadcast rank 0's parameters
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        shard = [(x[rank::world], y[rank::world]) for x, y in _batches()]
        params = _train(DistributedDPOptimizer, model, shard, secure_mode=secure)
        torch.save(params, f"{out_file}.{rank}")
        dist.barrier()  # both ranks done before gloo shuts down (a rank could abort otherwise)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    out = str(tmp_path / "params")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    single = _train(DPOptimizer, _model(), _batches())
    for a, b, c in zip(rank0, rank1, single):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the ranks agree exactly
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)  # and match one process


def test_secure_mode_ranks_share_rank_zeros_noise(tmp_path):
    # secure noise cannot be drawn alike on two ranks: rank 0 draws it and broadcasts the noisy
    # gradient, so the ranks still agree exactly (and differ from any other noise draw)
    out = str(tmp_path / "params")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out, True), nprocs=2, join=True)
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    single = _train(DPOptimizer, _model(), _batches())
    for a, b in zip(rank0, rank1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.allclose(a, c) for a, c in zip(rank0, single))


def test_needs_an_initialised_process_group():
    model = _model()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=PrivateModule(model),
                               noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0)

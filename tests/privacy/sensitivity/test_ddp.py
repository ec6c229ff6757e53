"""Data-parallel DP-SGD on 2 gloo ranks (DistributedDPOptimizer, as tests/privacy/test_distributed.py
runs it): each rank clips its shard of one logical batch; the all-reduced clipped sum, read on
every rank as p.grad * B after a step without noise, equals the float64 per-record reference of
the whole batch, and removing an adversarial record from one rank's shard moves it by at most
the bound. One spawn runs every configuration (process start-up dominates)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ppml_fast.privacy import PrivateModule
from ppml_fast.privacy.distributed import DistributedDPOptimizer
from tests.privacy.sensitivity import test_layers as layers
from tests.privacy.sensitivity._harness import (
    CANCEL_KAPPA, Case, clip_and_sum, flat_norm, per_record_grads, rtol, select, sens_tol)

WORLD = 2
MODELS = ("linear_sequence", "encoder_batch_first", "mha_cross")
MODES = ("ghost", "materialize")
CLIPPINGS = ("flat", "per_layer", "automatic")


def _case(name: str, mode: str = "ghost", clipping: str = "flat") -> Case:
    kw = dict(layers.CASES[name])
    kw.setdefault("target", layers._y())
    return Case(name=f"ddp:{name}[{mode},{clipping}]", mode=mode, clipping=clipping, **kw)


def _variants(case: Case) -> dict[str, list[int]]:
    """The full batch and each adversarial record removed (record 1 sits in rank 1's shard)."""
    out = {"full": list(range(case.size))}
    for j in case.adversarial:
        out[f"drop{j}"] = [i for i in range(case.size) if i != j]
    return out


def _step(case: Case, idx: list[int], rank: int) -> dict[str, torch.Tensor]:
    model = case.build()
    x, y = select(case, case.inputs, case.target, idx)
    x, y = select(case, x, y, list(range(rank, len(idx), WORLD)))  # this rank's shard
    private = PrivateModule(model, grad_sample_mode=case.mode)
    opt = DistributedDPOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                                 module=private, noise_multiplier=0.0, max_grad_norm=case.C,
                                 expected_batch_size=float(len(idx)), clipping=case.clipping)
    opt.zero_grad()
    case.run_loss(private, x, y).backward()
    opt.step()
    out = {n: p.grad.double() * len(idx) for n, p in model.named_parameters() if p.requires_grad}
    private.remove_hooks()
    return out


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in MODELS:
            for mode in MODES:
                for clipping in CLIPPINGS:
                    case = _case(name, mode, clipping)
                    for key, idx in _variants(case).items():
                        try:
                            results[(name, mode, clipping, key)] = _step(case, idx, rank)
                        except Exception as e:  # reported by the parent, named
                            results[(name, mode, clipping, key)] = f"{type(e).__name__}: {e}"
        torch.save(results, f"{out_file}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_sum_and_sensitivity(tmp_path):
    out = str(tmp_path / "sums")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    failures = []
    for name in MODELS:
        for clipping in CLIPPINGS:
            base = _case(name, clipping=clipping)
            model64 = base.build()
            want = {}
            for key, idx in _variants(base).items():
                x, y = select(base, base.inputs, base.target, idx)
                want[key] = clip_and_sum(base, per_record_grads(base, model64, x, y))
            for mode in MODES:
                got = {}
                for key in want:
                    r0, r1 = ranks[0][(name, mode, clipping, key)], ranks[1][(name, mode, clipping, key)]
                    label = f"{name}[{mode},{clipping}] {key}"
                    if isinstance(r0, str) or isinstance(r1, str):
                        failures.append(f"{label}: raised {r0 if isinstance(r0, str) else r1}")
                        break
                    for n in r0:  # the ranks agree exactly
                        if not torch.equal(r0[n], r1[n]):
                            failures.append(f"{label}: ranks differ on {n}")
                    ref, norms = want[key]
                    err = math.sqrt(sum(float((r0[n] - ref[n]).pow(2).sum()) for n in ref)) / float(norms.sum())
                    if err > rtol(torch.float64, CANCEL_KAPPA):
                        failures.append(f"{label}: clipped sum off the reference by {err:.3e} of sum_i ||clipped g_i||")
                    got[key] = r0
                if len(got) != len(want):
                    continue
                bound = base.C * (math.sqrt(len(got["full"])) if clipping == "per_layer" else 1.0)
                for key in got:
                    if key == "full":
                        continue
                    delta = flat_norm({n: got["full"][n] - got[key][n] for n in got["full"]})
                    tol = sens_tol(torch.float64, flat_norm(got["full"]) + flat_norm(got[key]), bound)
                    if delta / bound > 1 + tol:
                        failures.append(f"{name}[{mode},{clipping}] {key}: sensitivity {delta / bound:.4f} x the bound")
    assert not failures, "\n".join(failures)

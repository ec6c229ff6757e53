"""CPU against CUDA: the noise is bit-identical for the same (seed, offset), clipping and
aggregation agree within float tolerance. Skipped without a GPU or without the CUDA kernels
in this build of ppml_fast."""

from __future__ import annotations

import math

import pytest
import torch

from ppml_fast.ops import (
    CLIPPING_MODES,
    add_gaussian_noise_,
    clip_and_accumulate,
    cuda_available,
    noisy_scale_,
    weighted_aggregate,
)
from ppml_fast.ops._reference import clip_and_accumulate_ref, weighted_aggregate_ref

from ._util import (
    DTYPES,
    assert_norms_close,
    assert_sum_close,
    noncontiguous,
    randn,
    row_scales,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cuda_available()),
        reason="needs a CUDA GPU and a build of ppml_fast with the CUDA kernels",
    ),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["add", "noisy_scale"])
def test_noise_is_bit_identical(dtype, fused):
    gen = torch.Generator().manual_seed(1)
    numels = [1, 1_000_003, 4096, 7]
    cpu = [randn(n, dtype, gen) for n in numels]
    gpu = [t.cuda() for t in cpu]
    for tensors in (cpu, gpu):
        if fused:
            off = noisy_scale_(tensors, 0.7, 3.0, seed=2**64 - 9, offset=2**32 - 5)
        else:
            off = add_gaussian_noise_(tensors, 0.7, seed=2**64 - 9, offset=2**32 - 5)
        assert off == 2**32 - 5 + sum((n + 1) // 2 for n in numels)
    torch.cuda.synchronize()
    for c, g in zip(cpu, gpu):
        assert torch.equal(c, g.cpu())


def test_noise_on_a_noncontiguous_cuda_view():
    base_cpu = torch.zeros(64, 33)
    base_gpu = base_cpu.cuda()
    add_gaussian_noise_(base_cpu[:, ::4], 1.0, seed=5, offset=0)
    add_gaussian_noise_(base_gpu[:, ::4], 1.0, seed=5, offset=0)
    assert torch.equal(base_cpu, base_gpu.cpu())
    assert bool((base_cpu[:, 1::4] == 0).all())


def test_secure_noise_on_cuda():
    x = torch.zeros(200_000, device="cuda", dtype=torch.float64)
    add_gaussian_noise_(x, 1.0, seed=0, offset=0, secure=True)
    n = x.numel()
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.var()) - 1.0) < 5 * math.sqrt(2.0 / (n - 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_clip_and_accumulate_matches_cpu(dtype, clipping):
    gen = torch.Generator().manual_seed(2)
    batch = 37
    shapes = [(40_000,), (3, 5), (16_385,), ()]
    grads = [(torch.randn((batch,) + s, generator=gen, dtype=torch.float64)
              * row_scales(batch, gen).reshape((batch,) + (1,) * len(s))).to(dtype)
             for s in shapes]
    grads[1][4, 0, 0] = float("nan")
    grads[0][9, 3] = float("inf")
    max_norm = [0.5, 1.0, 2.0, 0.1] if clipping == "per_layer" else 1.0
    s_cpu, n_cpu = clip_and_accumulate(grads, max_norm, clipping=clipping)
    gpu = [g.cuda() for g in grads]
    gpu[1] = noncontiguous(gpu[1])
    s_gpu, n_gpu = clip_and_accumulate(gpu, max_norm, clipping=clipping)
    ref, ref_norms = clip_and_accumulate_ref(grads, max_norm, clipping=clipping)
    mag, _ = clip_and_accumulate_ref([g.abs() for g in grads], max_norm, clipping=clipping)
    width = sum(g[0].numel() for g in grads)
    for k in range(len(grads)):
        assert s_gpu[k].device.type == "cuda" and s_gpu[k].dtype == dtype
        assert_sum_close(s_gpu[k], ref[k], mag[k], batch, dtype, what=f"cuda sums[{k}]")
        assert_sum_close(s_gpu[k].cpu(), s_cpu[k].double(), 2 * mag[k], 2 * batch, dtype,
                         what=f"cuda vs cpu sums[{k}]")
    assert_norms_close(n_gpu.cpu(), ref_norms, width, dtype)
    assert_norms_close(n_gpu.cpu(), n_cpu.double(), width, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("as_list", [False, True], ids=["matrix", "list"])
@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_weighted_aggregate_matches_cpu(dtype, as_list, clip_norm):
    gen = torch.Generator().manual_seed(3)
    k, p = 33, 50_001
    u = (torch.randn(k, p, generator=gen, dtype=torch.float64) * 0.01).to(dtype)
    u[5, 7] = float("nan")
    w = torch.rand(k, generator=gen, dtype=torch.float64)
    ug = u.cuda()
    agg, norms = weighted_aggregate(list(ug) if as_list else ug, w.cuda(), clip_norm=clip_norm)
    ref, ref_norms = weighted_aggregate_ref(u, w, clip_norm=clip_norm)
    mag, _ = weighted_aggregate_ref(u.abs(), w, clip_norm=clip_norm)
    assert agg.device.type == "cuda" and agg.dtype == dtype
    assert_sum_close(agg, ref, mag, k + 1, dtype, what="cuda aggregate")
    assert_norms_close(norms.cpu(), ref_norms, p, dtype)


def test_weighted_aggregate_noise_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(8, 1001, generator=gen, dtype=torch.float64)
    w = torch.arange(1.0, 9.0, dtype=torch.float64)
    a_cpu, _ = weighted_aggregate(u, w, clip_norm=3.0, noise_std=0.5, seed=9, offset=4)
    a_gpu, _ = weighted_aggregate(u.cuda(), w.cuda(), clip_norm=3.0, noise_std=0.5, seed=9,
                                  offset=4)
    torch.testing.assert_close(a_gpu.cpu(), a_cpu, rtol=1e-12, atol=1e-13)


def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="per_sample_grads.*device"):
        clip_and_accumulate([torch.ones(2, 3), torch.ones(2, 3, device="cuda")], 1.0)
    with pytest.raises(ValueError, match="tensors.*device"):
        add_gaussian_noise_([torch.ones(3), torch.ones(3, device="cuda")], 1.0, seed=0, offset=0)

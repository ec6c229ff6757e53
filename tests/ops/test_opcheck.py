"""torch.library.opcheck on every registered op: schema (mutation annotations), fake
(meta) implementations, autograd registration and AOT dispatch, on small inputs."""

from __future__ import annotations

import pytest
import torch

import ppml_fast.ops  # noqa: F401  (registers torch.ops.ppml_fast.*)


def _grads(dtype, batch=3):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 4, generator=gen).to(dtype),
            torch.randn(batch, 2, 3, generator=gen).to(dtype),
            torch.randn(batch, generator=gen).to(dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "max_norms, clipping",
    [([1.0], "flat"), ([0.5, 1.0, 2.0], "per_layer"), ([1.0], "automatic")],
)
def test_clip_and_accumulate(dtype, max_norms, clipping):
    args = (_grads(dtype), max_norms, clipping, 1e-6, 0.01)
    torch.library.opcheck(torch.ops.ppml_fast.clip_and_accumulate.default, args)


def test_clip_and_accumulate_empty_batch():
    args = (_grads(torch.float32, batch=0), [1.0], "flat", 1e-6, 0.01)
    torch.library.opcheck(torch.ops.ppml_fast.clip_and_accumulate.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_add_gaussian_noise_(dtype):
    tensors = [torch.zeros(5, dtype=dtype), torch.ones(2, 3, dtype=dtype)]
    # secure=False: opcheck reruns the op and compares, which needs the reproducible stream
    torch.library.opcheck(
        torch.ops.ppml_fast.add_gaussian_noise_.default, (tensors, 0.5, -3, 7, False)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_noisy_scale_(dtype):
    sums = [torch.ones(7, dtype=dtype), torch.zeros(1, dtype=dtype)]
    torch.library.opcheck(
        torch.ops.ppml_fast.noisy_scale_.default, (sums, 0.5, 4.0, 11, 0, False)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("clip_norm, noise_std", [(None, 0.0), (1.0, 0.0), (1.0, 0.3)])
@pytest.mark.parametrize("as_list", [False, True], ids=["matrix", "list"])
def test_weighted_aggregate(dtype, clip_norm, noise_std, as_list):
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(4, 9, generator=gen).to(dtype)
    updates = list(u) if as_list else [u]
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.ppml_fast.weighted_aggregate.default,
        (updates, weights, clip_norm, noise_std, 5, 0),
    )

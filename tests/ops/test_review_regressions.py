"""Regression tests for the problems a review found: float-stage overflow/underflow of the sums
of squares, norms that overflow float32, multi-block clipping, overlapping tensors in the noise
ops, reused noise, and arguments of the registered ops."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ppml_fast.ops import (
    add_gaussian_noise_,
    clip_and_accumulate,
    noisy_scale_,
    weighted_aggregate,
)
from ppml_fast.ops._reference import clip_and_accumulate_ref, weighted_aggregate_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [2e19, 1e-25])
def test_one_pass_norms_survive_float_overflow_and_underflow(dtype, value):
    u = torch.ones(2, 5000, dtype=dtype)
    u[0] *= value
    agg, norms = weighted_aggregate(u, [1.0, 1.0])
    ref_agg, ref_norms = weighted_aggregate_ref(u, [1.0, 1.0])
    assert norms.dtype == torch.float64
    np.testing.assert_allclose(norms.numpy(), ref_norms.numpy(), rtol=1e-6)
    np.testing.assert_allclose(agg.double().numpy(), ref_agg.numpy(), rtol=1e-2)


def test_norms_of_huge_finite_float32_samples_stay_finite():
    g = torch.full((2, 8), 0.1, dtype=torch.float32)
    g[0] = 1e38
    sums, norms = clip_and_accumulate([g], 1.0)
    assert bool(torch.isfinite(norms).all())
    # the huge sample is clipped to norm 1 and contributes; so does the small one
    ref_sums, ref_norms = clip_and_accumulate_ref([g], 1.0)
    np.testing.assert_allclose(norms.numpy(), ref_norms.numpy(), rtol=1e-12)
    np.testing.assert_allclose(sums[0].double().numpy(), ref_sums[0].numpy(), rtol=1e-6)


_BLOCKS_CODE = """
import hashlib, torch
from ppml_fast.ops import clip_and_accumulate
g = torch.Generator().manual_seed(3)
x = torch.randn(40, 70_000, generator=g) * torch.logspace(-2, 1, 40)[:, None]
x[7, 5] = float("nan"); x[19, 60_000] = float("inf")
y = torch.randn(40, 3, 5, generator=g)
for mode in ("flat", "per_layer", "automatic"):
    s, n = clip_and_accumulate([x, y], 1.0, clipping=mode)
    print(mode, hashlib.sha256(b"".join(t.numpy().tobytes() for t in s) + n.numpy().tobytes()).hexdigest())
"""


def test_many_row_blocks_give_the_same_bits_as_one_block():
    # PPML_FAST_BLOCK_BYTES=1 MiB forces 3-row blocks of the two-pass kernel (rows of 280 kB);
    # 1 GiB puts all 40 rows in one block. The additions happen in the same order either way.
    def run(block_bytes):
        env = dict(os.environ, PPML_FAST_BLOCK_BYTES=str(block_bytes))
        return subprocess.run(
            [sys.executable, "-c", _BLOCKS_CODE], capture_output=True, text=True, check=True,
            env=env, timeout=300,
        ).stdout

    many, one = run(1 << 20), run(1 << 30)
    assert many.count("\n") == 3
    assert many == one


def test_many_row_blocks_match_the_reference(monkeypatch):
    env = dict(os.environ, PPML_FAST_BLOCK_BYTES=str(1 << 20))
    code = (
        "import torch, numpy as np\n"
        "from ppml_fast.ops import clip_and_accumulate\n"
        "from ppml_fast.ops._reference import clip_and_accumulate_ref\n"
        "g = torch.Generator().manual_seed(9)\n"
        "x = torch.randn(30, 100_000, generator=g, dtype=torch.float64)"
        " * torch.logspace(-3, 1, 30, dtype=torch.float64)[:, None]\n"
        "x[4, 1] = float('nan')\n"
        "s, n = clip_and_accumulate([x], 1.0)\n"
        "rs, rn = clip_and_accumulate_ref([x], 1.0)\n"
        "np.testing.assert_allclose(s[0].numpy(), rs[0].numpy(), rtol=1e-9, atol=1e-12)\n"
        "np.testing.assert_allclose(n.numpy(), rn.numpy(), rtol=1e-12)\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("fn", [add_gaussian_noise_, noisy_scale_], ids=["add", "noisy_scale"])
def test_noise_rejects_the_same_memory_twice(fn):
    x = torch.zeros(1000)
    extra = (2.0,) if fn is noisy_scale_ else ()
    name = "sums" if fn is noisy_scale_ else "tensors"
    with pytest.raises(ValueError, match=rf"{name}\[0\] and {name}\[1\] share memory"):
        fn([x, x], 1.0, *extra, seed=1, offset=0)
    with pytest.raises(ValueError, match=rf"{name}\[0\] and {name}\[1\] share memory"):
        fn([x[:600], x[500:]], 1.0, *extra, seed=1, offset=0)
    assert bool((x == 0).all())


def test_noise_rejects_expanded_views_before_touching_anything():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=r"tensors\[1\] has overlapping elements"):
        add_gaussian_noise_([x, torch.zeros(1).expand(3)], 1.0, seed=1, offset=0)
    assert bool((x == 0).all())


def test_noise_accepts_disjoint_views_of_one_buffer():
    x = torch.zeros(1000)
    nxt = add_gaussian_noise_([x[:500], x[500:]], 1.0, seed=1, offset=0)
    y = torch.zeros(1000)
    assert nxt == add_gaussian_noise_([y], 1.0, seed=1, offset=0)
    assert torch.equal(x, y)


def test_aggregate_noise_needs_an_explicit_seed():
    u = torch.randn(3, 10)
    with pytest.raises(ValueError, match="seed is required"):
        weighted_aggregate(u, [1.0, 1.0, 1.0], noise_std=0.1)
    a, _ = weighted_aggregate(u, [1.0, 1.0, 1.0], noise_std=0.1, seed=5, offset=0)
    b, _ = weighted_aggregate(u, [1.0, 1.0, 1.0], noise_std=0.1, seed=5, offset=5)
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1.0, 0.0, 0, 0), "clip_norm"),
        ((None, -5.0, 0, 0), "noise_std"),
        ((None, 0.0, 0, -1), "offset"),
    ],
)
def test_registered_aggregate_op_checks_its_arguments(args, match):
    u = torch.randn(3, 10)
    with pytest.raises(ValueError, match=match):
        torch.ops.ppml_fast.weighted_aggregate([u], torch.ones(3, dtype=torch.float64), *args)


def test_registered_noise_op_checks_offset():
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="offset"):
        torch.ops.ppml_fast.add_gaussian_noise_([x], 1.0, 0, -1, False)
    assert bool((x == 0).all())


def test_no_second_openmp_runtime_warning_on_import():
    code = (
        "import warnings\n"
        "warnings.simplefilter('error')\n"
        "import ppml_fast\n"
        "from ppml_fast.ops._native import openmp_runtimes\n"
        "print(len(openmp_runtimes()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    if sys.platform.startswith("linux"):
        assert out == "1"


def test_portable_and_avx2_philox_paths_give_the_same_noise():
    code = (
        "import hashlib, torch\n"
        "from ppml_fast.ops import add_gaussian_noise_\n"
        "x = torch.zeros(100_003, dtype=torch.float64)\n"
        "y = torch.zeros(77, dtype=torch.float32)\n"
        "add_gaussian_noise_([x, y], 1.5, seed=2**64 - 5, offset=2**32 - 3)\n"
        "print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())\n"
    )

    def run(disable):
        env = {k: v for k, v in os.environ.items() if k != "PPML_FAST_DISABLE_AVX2"}
        if disable:
            env["PPML_FAST_DISABLE_AVX2"] = "1"
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
            timeout=120,
        ).stdout

    assert run(True) == run(False)


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
def test_zero_width_segments_give_zero_norms_and_leave_the_others_alone(clipping):
    # Every segment of width 0 (no column chunks) used to index an empty vector in the CPU
    # kernel (&partial[0], UB; an assertion failure under _GLIBCXX_ASSERTIONS).
    empty = torch.zeros(3, 0, dtype=torch.float32)
    sums, norms = clip_and_accumulate([empty], 1.0, clipping=clipping)
    assert sums[0].shape == (0,)
    assert norms.tolist() == ([[0.0, 0.0, 0.0]] if clipping == "per_layer" else [0.0, 0.0, 0.0])
    # a zero-width segment beside a real one: the real one is clipped as without it
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float32)
    sums, norms = clip_and_accumulate([empty, g], 1.0, clipping=clipping)
    ref_sums, ref_norms = clip_and_accumulate_ref([empty, g], 1.0, clipping=clipping)
    assert sums[0].shape == (0,)
    np.testing.assert_allclose(sums[1].double().numpy(), ref_sums[1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(norms.numpy(), ref_norms.numpy(), rtol=1e-12)

"""add_gaussian_noise_ and noisy_scale_: the exact Philox/Box-Muller stream (against the numpy
reference), stream bookkeeping (offsets), dtypes, views, thread independence, the
distribution (mean, variance, KS), secure mode and argument checking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ppml_fast.ops import add_gaussian_noise_, noise_blocks, noisy_scale_
from ppml_fast.ops._reference import gaussian_noise_ref

from ._util import DTYPES, randn

SEEDS = st.one_of(
    st.integers(0, 2**32 - 1), st.integers(2**63, 2**64 - 1), st.integers(0, 2**64 - 1)
)
OFFSETS = st.one_of(
    st.integers(0, 1000), st.integers(2**32 - 300, 2**32 + 300), st.integers(0, 2**62)
)


def _blocks(numels) -> int:
    return sum((n + 1) // 2 for n in numels)


# --- the exact stream ------------------------------------------------------------------------


@settings(max_examples=60)
@given(
    numels=st.lists(st.one_of(st.integers(0, 9), st.integers(1, 400)), min_size=1, max_size=5),
    seed=SEEDS,
    offset=OFFSETS,
    std=st.floats(1e-3, 1e3),
)
def test_noise_equals_reference_float64(numels, seed, offset, std):
    xs = [torch.zeros(n, dtype=torch.float64) for n in numels]
    nxt = add_gaussian_noise_(xs, std, seed=seed, offset=offset)
    assert nxt == offset + _blocks(numels)
    for x, z in zip(xs, gaussian_noise_ref(numels, seed, offset)):
        # relative to each sample: the kernel's log/sincos polynomials are within a few ulp
        np.testing.assert_allclose(x.numpy(), std * z, rtol=1e-12, atol=0)


@settings(max_examples=30)
@given(
    numels=st.lists(st.integers(1, 200), min_size=1, max_size=4),
    seed=SEEDS,
    offset=OFFSETS,
    std=st.floats(1e-3, 1e3),
    den=st.floats(1e-3, 1e4),
)
def test_noisy_scale_equals_reference_float64(numels, seed, offset, std, den):
    gen = torch.Generator().manual_seed(numels[0])
    xs = [randn(n, torch.float64, gen, 3.0) for n in numels]
    before = [x.clone() for x in xs]
    nxt = noisy_scale_(xs, std, den, seed=seed, offset=offset)
    assert nxt == offset + _blocks(numels)
    for x, x0, z in zip(xs, before, gaussian_noise_ref(numels, seed, offset)):
        expected = (x0.numpy() + std * z) / den
        # x0 + std z can cancel: compare relative to the size of the terms
        np.testing.assert_allclose(
            x.numpy(), expected, rtol=1e-12, atol=1e-12 * (3.0 * 6 + std * 9) / den
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["add", "noisy_scale"])
def test_low_precision_dtypes_round_the_double_result_once(dtype, fused):
    gen = torch.Generator().manual_seed(2)
    numels = [1001, 2, 17]
    xs = [randn(n, dtype, gen, 2.0) for n in numels]
    x64 = [x.double() for x in xs]
    std, den = 0.75, 3.0
    if fused:
        noisy_scale_(xs, std, den, seed=99, offset=5)
    else:
        add_gaussian_noise_(xs, std, seed=99, offset=5)
        den = 1.0
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    for x, x0, z in zip(xs, x64, gaussian_noise_ref(numels, 99, 5)):
        assert x.dtype == dtype
        expected = (x0 + std * torch.from_numpy(z)) / den
        err = (x.double() - expected).abs()
        # one rounding to the storage dtype (via float32 for 16-bit types): < 1 ulp
        assert bool((err <= eps * expected.abs() + tiny).all()), float(err.max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("den", [1.0, 3.0, 1e-3, 7e4, 1e-30, 1e30])
def test_storage_conversions_round_like_torch(dtype, den):
    # With std = 1e-300, x + std z == x in double for every non-zero x here, so noisy_scale_
    # computes round(x / den) through the kernel's hand-written loads and stores: every
    # float16 / bfloat16 bit pattern (subnormals, Inf, NaN, overflow and underflow after the
    # division) must round as torch rounds double -> float -> dtype.
    if dtype == torch.float32:
        gen = torch.Generator().manual_seed(0)
        bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=gen, dtype=torch.int32)
        x = bits.view(torch.float32)
    else:
        x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    y = x.clone()
    noisy_scale_(y, 1e-300, den, seed=0, offset=0)
    expected = (x.double() / den).float().to(dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


def test_mixed_dtypes_in_one_call_equal_separate_calls():
    gen = torch.Generator().manual_seed(6)
    xs = [randn(n, d, gen) for n, d in
          [(5, torch.float32), (8, torch.float64), (3, torch.bfloat16), (6, torch.float16)]]
    together = [x.clone() for x in xs]
    off = add_gaussian_noise_(together, 0.5, seed=2**63, offset=1)
    o = 1
    for x, t in zip(xs, together):
        o = add_gaussian_noise_(x, 0.5, seed=2**63, offset=o)
        assert torch.equal(x, t)
    assert o == off


def test_contiguous_slice_with_storage_offset():
    base = torch.zeros(10, dtype=torch.float64)
    add_gaussian_noise_(base[3:7], 1.0, seed=2**63, offset=0)
    assert bool((base[:3] == 0).all()) and bool((base[7:] == 0).all())
    np.testing.assert_allclose(base[3:7].numpy(), gaussian_noise_ref([4], 2**63, 0)[0], rtol=1e-12)


def test_seed_and_offset_fix_the_numbers():
    a, b = torch.zeros(1001, dtype=torch.float64), torch.zeros(1001, dtype=torch.float64)
    assert add_gaussian_noise_(a, 1.0, seed=123, offset=40) == 40 + 501
    add_gaussian_noise_(b, 1.0, seed=123, offset=40)
    assert torch.equal(a, b)
    c = torch.zeros(1001, dtype=torch.float64)
    add_gaussian_noise_(c, 1.0, seed=124, offset=40)
    assert not bool((a == c).any()), "another seed gave some of the same samples"
    d = torch.zeros(1001, dtype=torch.float64)
    add_gaussian_noise_(d, 1.0, seed=123, offset=41)
    # offset + 1 is the stream shifted by one block (two samples): no other overlap
    assert torch.equal(d[:-2], a[2:])
    e = torch.zeros(1001, dtype=torch.float64)
    add_gaussian_noise_(e, 1.0, seed=123, offset=40 + 501)
    assert not bool(torch.isin(e, a).any()), "consecutive streams overlap"


@pytest.mark.parametrize("n", [2, 1000, 40_000])
def test_two_calls_on_n_equal_one_call_on_2n(n):
    whole = torch.zeros(2 * n, dtype=torch.float64)
    add_gaussian_noise_(whole, 1.5, seed=7, offset=3)
    first, second = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    off = add_gaussian_noise_(first, 1.5, seed=7, offset=3)
    assert off == 3 + n // 2
    assert add_gaussian_noise_(second, 1.5, seed=7, offset=off) == 3 + n
    assert torch.equal(torch.cat([first, second]), whole)


@settings(max_examples=30)
@given(numels=st.lists(st.integers(0, 50), min_size=1, max_size=6), offset=OFFSETS)
def test_a_list_equals_chained_calls(numels, offset):
    together = [torch.zeros(n, dtype=torch.float64) for n in numels]
    end = noisy_scale_(together, 2.0, 4.0, seed=2**64 - 5, offset=offset)
    off = offset
    for n, t in zip(numels, together):
        alone = torch.zeros(n, dtype=torch.float64)
        off = noisy_scale_(alone, 2.0, 4.0, seed=2**64 - 5, offset=off)
        assert torch.equal(alone, t)
    assert off == end == offset + sum(noise_blocks(n) for n in numels)


def test_results_do_not_depend_on_threads(restore_threads):
    numels = [100_001, 30_000, 3, 0, 8_193]
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        xs = [torch.ones(n, dtype=torch.float32) for n in numels]
        add_gaussian_noise_(xs, 1.0, seed=5, offset=11)
        ys = [torch.ones(n, dtype=torch.bfloat16) for n in numels]
        noisy_scale_(ys, 1.0, 7.0, seed=5, offset=11)
        results.append(xs + ys)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    # and the threaded run is the reference stream
    for x, z in zip(results[1][:5], gaussian_noise_ref(numels, 5, 11)):
        np.testing.assert_allclose(x.double().numpy(), 1.0 + z, rtol=2**-23, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_on_a_noncontiguous_view_changes_only_the_view(dtype):
    gen = torch.Generator().manual_seed(4)
    base = randn((6, 10), dtype, gen)
    original = base.clone()
    view = base[:, 1::3]                      # shape (6, 3), strides (10, 3)
    assert not view.is_contiguous()
    expected = view.clone()                   # contiguous copy of the same logical elements
    nxt = add_gaussian_noise_([view, base[0, :0]], 0.5, seed=8, offset=0)
    add_gaussian_noise_(expected, 0.5, seed=8, offset=0)
    assert nxt == noise_blocks(18)
    assert torch.equal(base[:, 1::3], expected)
    mask = torch.ones(6, 10, dtype=torch.bool)
    mask[:, 1::3] = False
    assert torch.equal(base[mask], original[mask]), "elements outside the view changed"
    # element order is the view's logical (row-major) order
    z = torch.from_numpy(gaussian_noise_ref([18], 8, 0)[0]).reshape(6, 3)
    ref = (original[:, 1::3].double() + 0.5 * z).to(dtype)
    torch.testing.assert_close(base[:, 1::3], ref, rtol=torch.finfo(dtype).eps, atol=0)


def test_transposed_view_and_contiguous_tensor_in_one_call():
    base = torch.zeros(4, 5, dtype=torch.float64)
    other = torch.zeros(3, dtype=torch.float64)
    noisy_scale_([base.t(), other], 1.0, 2.0, seed=1, offset=0)
    z_t, z_other = gaussian_noise_ref([20, 3], 1, 0)
    np.testing.assert_allclose(base.t().reshape(-1).numpy(), z_t / 2.0, rtol=1e-12)
    np.testing.assert_allclose(other.numpy(), z_other / 2.0, rtol=1e-12)


def test_empty_tensors():
    x = torch.zeros(0)
    assert add_gaussian_noise_(x, 1.0, seed=1, offset=9) == 9
    y = torch.zeros(4, dtype=torch.float64)
    assert add_gaussian_noise_([x, y], 1.0, seed=1, offset=9) == 11
    np.testing.assert_allclose(y.numpy(), gaussian_noise_ref([4], 1, 9)[0], rtol=1e-12)


# --- the distribution ------------------------------------------------------------------------

N_STAT = 200_000


def _assert_normal(samples: np.ndarray, std: float, ks_alpha: float) -> None:
    """Mean within 5 standard errors, variance within 5 standard errors of the sample variance
    of a normal (std^2 sqrt(2 / (n - 1))), KS against N(0, std^2) at level ``ks_alpha``, and
    neighbouring samples (the two halves of a Box-Muller pair) uncorrelated within 5 / sqrt(n)."""
    n = samples.size
    mean = samples.mean()
    assert abs(mean) < 5 * std / math.sqrt(n), f"mean {mean}"
    var = samples.var(ddof=1)
    assert abs(var - std**2) < 5 * std**2 * math.sqrt(2.0 / (n - 1)), f"variance {var} vs {std**2}"
    p = stats.kstest(samples / std, "norm").pvalue
    assert p > ks_alpha, f"KS p-value {p}"
    pairs = samples[: n - n % 2].reshape(-1, 2)
    r = np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]
    assert abs(r) < 5 / math.sqrt(pairs.shape[0]), f"pair correlation {r}"


@pytest.mark.parametrize("seed", [0, 20240601, 2**64 - 1])
def test_reproducible_noise_is_normal(seed):
    x = torch.zeros(N_STAT, dtype=torch.float64)
    add_gaussian_noise_(x, 2.5, seed=seed, offset=12345)
    _assert_normal(x.numpy(), 2.5, ks_alpha=1e-3)


def test_noisy_scale_noise_is_normal():
    x = torch.full((N_STAT,), 3.0, dtype=torch.float32)
    noisy_scale_(x, 2.0, 4.0, seed=77, offset=0)
    # (3 + N(0, 4)) / 4 = 0.75 + N(0, 0.25)
    _assert_normal(x.double().numpy() - 0.75, 0.5, ks_alpha=1e-3)


def test_secure_noise_is_normal_and_differs_call_to_call():
    # Secure mode cannot be seeded. Its samples are (z1 + z2 + z3 + z4) / 2 of four standard
    # normals, again N(0, 1). alpha = 1e-6 for KS so that a correct sampler fails about once
    # in a million runs; a wrong scale (e.g. a missing / 2, variance 4) fails the variance test.
    x = torch.zeros(N_STAT, dtype=torch.float64)
    nxt = add_gaussian_noise_(x, 1.5, seed=3, offset=10, secure=True)
    assert nxt == 10 + N_STAT // 2
    _assert_normal(x.numpy(), 1.5, ks_alpha=1e-6)
    y = torch.zeros(N_STAT, dtype=torch.float64)
    add_gaussian_noise_(y, 1.5, seed=3, offset=10, secure=True)
    assert not bool((x == y).any()), "two secure calls share samples"
    philox = torch.zeros(N_STAT, dtype=torch.float64)
    add_gaussian_noise_(philox, 1.5, seed=3, offset=10)
    assert not bool((x == philox).any()), "secure mode returned the reproducible stream"


def test_secure_noisy_scale():
    x = torch.full((N_STAT,), 1.0, dtype=torch.float32)
    noisy_scale_(x, 1.0, 2.0, seed=0, offset=0, secure=True)
    _assert_normal(x.double().numpy() - 0.5, 0.5, ks_alpha=1e-6)


# --- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["add", "noisy_scale"])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(std=0.0), ValueError, "std"),
        (dict(std=-1.0), ValueError, "std"),
        (dict(std=float("nan")), ValueError, "std"),
        (dict(std=float("inf")), ValueError, "std"),
        (dict(std="1"), TypeError, "std"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=None), TypeError, "seed"),
        (dict(offset=-1), ValueError, "offset"),
        (dict(offset=2**63), ValueError, "offset"),
        (dict(offset=2.0), TypeError, "offset"),
        (dict(secure="yes"), TypeError, "secure"),
    ],
)
def test_bad_arguments(fused, kwargs, error, match):
    x = torch.ones(5)
    args = dict(std=1.0, seed=0, offset=0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        if fused:
            noisy_scale_(x, args.pop("std"), 2.0, **args)
        else:
            add_gaussian_noise_(x, args.pop("std"), **args)
    assert torch.equal(x, torch.ones(5))


@pytest.mark.parametrize("den", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_denominator(den):
    x = torch.ones(5)
    with pytest.raises(ValueError, match="denominator"):
        noisy_scale_(x, 1.0, den, seed=0, offset=0)
    assert torch.equal(x, torch.ones(5))


@pytest.mark.parametrize("fused", [False, True], ids=["add", "noisy_scale"])
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: [torch.ones(3), torch.ones(3, dtype=torch.int64)], TypeError, r"{name}\[1\]"),
        (lambda: torch.ones(3, dtype=torch.int32), TypeError, r"{name}\[0\]"),
        (lambda: [torch.ones(3), torch.ones(2, device="meta")], ValueError, "{name}.*device"),
        (lambda: [], ValueError, "{name} must not be empty"),
        (lambda: np.ones(3), TypeError, "{name} must be"),
        (lambda: [torch.ones(3), np.ones(3)], TypeError, r"{name}\[1\]"),
    ],
    ids=["int64", "int32", "devices", "empty", "numpy", "numpy-in-list"],
)
def test_bad_tensors(fused, make, error, match):
    tensors = make()
    name = "sums" if fused else "tensors"
    cpu = [t for t in (tensors if isinstance(tensors, list) else [tensors])
           if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    before = [t.clone() for t in cpu]
    with pytest.raises(error, match=match.format(name=name)):
        if fused:
            noisy_scale_(tensors, 1.0, 2.0, seed=0, offset=0)
        else:
            add_gaussian_noise_(tensors, 1.0, seed=0, offset=0)
    assert all(torch.equal(a, b) for a, b in zip(cpu, before))


def test_registered_ops_check_their_arguments_too():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="std"):
        torch.ops.ppml_fast.add_gaussian_noise_([x], 0.0, 0, 0, False)
    with pytest.raises(ValueError, match="denominator"):
        torch.ops.ppml_fast.noisy_scale_([x], 1.0, -1.0, 0, 0, False)
    assert torch.equal(x, torch.ones(3))

"""weighted_aggregate against its float64 reference (tensor, list and numpy inputs), clipping,
non-finite updates, fused noise, thread independence and argument checking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml_fast.ops import weighted_aggregate
from ppml_fast.ops._reference import gaussian_noise_ref, weighted_aggregate_ref

from ._util import (
    DTYPES,
    assert_norms_close,
    assert_sum_close,
    assert_unchanged,
    noncontiguous,
    randn,
    row_scales,
)

FORMS = ("matrix", "matrix-noncontiguous", "list", "list-noncontiguous", "numpy", "numpy-list")
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _make_updates(u: torch.Tensor, form: str):
    if form == "matrix":
        return u
    if form == "matrix-noncontiguous":
        return noncontiguous(u)
    if form == "list":
        return list(u.clone())
    if form == "list-noncontiguous":
        return [noncontiguous(r) for r in u]
    if form == "numpy":
        return u.numpy()
    return [r.numpy() for r in u]


def _check(u: torch.Tensor, form: str, weights, clip_norm):
    dtype = u.dtype
    k, p = u.shape
    updates = _make_updates(u, form)
    before = u.clone()
    agg, norms = weighted_aggregate(updates, weights, clip_norm=clip_norm)
    ref, ref_norms = weighted_aggregate_ref(u, weights, clip_norm=clip_norm)
    magnitude, _ = weighted_aggregate_ref(u.abs(), weights, clip_norm=clip_norm)
    if form.startswith("numpy"):
        assert isinstance(agg, np.ndarray) and isinstance(norms, np.ndarray)
        assert agg.dtype == NUMPY_DTYPES[dtype]
        assert norms.dtype == np.float64
    else:
        assert isinstance(agg, torch.Tensor) and agg.dtype == dtype
        assert norms.dtype == torch.float64
    assert tuple(agg.shape) == (p,) and tuple(norms.shape) == (k,)
    # each term is w_k c_k / sum(w) * u_k: K terms plus the scale's own rounding
    assert_sum_close(agg, ref, magnitude, k + 1, dtype, what="aggregate")
    assert_norms_close(norms, ref_norms, p, dtype)
    assert_unchanged(u, before)
    return agg, norms


@st.composite
def aggregate_cases(draw, numpy_ok: bool):
    forms = FORMS if numpy_ok else FORMS[:4]
    form = draw(st.sampled_from(forms))
    k_min = 0 if form in ("matrix", "matrix-noncontiguous", "numpy") else 1
    k = draw(st.one_of(st.sampled_from([k_min, 1, 2, 3]), st.integers(k_min, 20)))
    p = draw(st.one_of(st.sampled_from([1, 2, 3]), st.integers(1, 300)))
    clip_norm = draw(st.one_of(st.none(), st.floats(0.05, 20.0)))
    weight_form = draw(st.sampled_from(["tensor", "list", "numpy"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return form, k, p, clip_norm, weight_form, seed


def _weights(k: int, gen: torch.Generator, form: str):
    w = torch.rand(k, generator=gen, dtype=torch.float64) * 10
    w = torch.where(torch.rand(k, generator=gen) < 0.2, torch.zeros_like(w), w)
    if k and float(w.sum()) == 0:
        w[0] = 1.0
    return w if form == "tensor" else (w.tolist() if form == "list" else w.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=100)
@given(data=st.data())
def test_matches_reference(dtype, data):
    form, k, p, clip_norm, weight_form, seed = data.draw(
        aggregate_cases(numpy_ok=dtype in NUMPY_DTYPES)
    )
    gen = torch.Generator().manual_seed(seed)
    u = (torch.randn(k, p, generator=gen, dtype=torch.float64)
         * row_scales(k, gen)[:, None]).to(dtype)
    _check(u, form, _weights(k, gen, weight_form), clip_norm)


def test_hand_computed_clipping():
    u = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    agg, norms = weighted_aggregate(u, torch.tensor([1.0, 3.0]), clip_norm=1.0)
    # c = (1/5, 1): (1 * (0.6, 0.8) + 3 * (0.3, 0.4)) / 4
    torch.testing.assert_close(agg, torch.tensor([1.5 / 4, 2.0 / 4], dtype=torch.float64))
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5], dtype=torch.float64))
    agg, _ = weighted_aggregate(u, [1.0, 3.0])
    torch.testing.assert_close(agg, torch.tensor([3.9 / 4, 5.2 / 4], dtype=torch.float64))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_update_counts_as_zero_but_keeps_its_weight(form, bad):
    u = torch.tensor([[1.0, 2.0], [bad, 0.0], [3.0, 4.0]], dtype=torch.float64)
    agg, norms = weighted_aggregate(_make_updates(u, form), [1.0, 1.0, 2.0], clip_norm=10.0)
    agg, norms = torch.as_tensor(agg), torch.as_tensor(norms)
    np.testing.assert_allclose(np.asarray(agg), [7 / 4, 10 / 4], rtol=1e-15)
    assert not math.isfinite(norms[1]) and (math.isnan(norms[1]) == math.isnan(bad))
    assert norms[0] == math.sqrt(5.0) and norms[2] == 5.0
    _check(u, form, [1.0, 1.0, 2.0], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_noise_is_the_reference_stream(dtype):
    gen = torch.Generator().manual_seed(9)
    u = randn((5, 1001), dtype, gen)
    w = torch.tensor([1.0, 2.0, 0.0, 4.0, 1.0])
    plain, norms0 = weighted_aggregate(u, w, clip_norm=3.0)
    noisy, norms1 = weighted_aggregate(u, w, clip_norm=3.0, noise_std=0.3, seed=2**64 - 2,
                                       offset=2**32 - 100)
    assert torch.equal(norms0, norms1)
    z = torch.from_numpy(gaussian_noise_ref([1001], 2**64 - 2, 2**32 - 100)[0])
    ref, _ = weighted_aggregate_ref(u, w, clip_norm=3.0)
    expected = ref + 0.3 * z
    if dtype == torch.float64:
        torch.testing.assert_close(noisy, expected, rtol=1e-12, atol=1e-14)
    else:
        # noise added in float32 accumulation, rounded once; plus the float32 sum itself
        torch.testing.assert_close(noisy.double(), expected, rtol=4e-7, atol=1e-6)
    # the same stream twice, another seed differs
    again, _ = weighted_aggregate(u, w, clip_norm=3.0, noise_std=0.3, seed=2**64 - 2,
                                  offset=2**32 - 100)
    assert torch.equal(again, noisy)
    other, _ = weighted_aggregate(u, w, clip_norm=3.0, noise_std=0.3, seed=1, offset=2**32 - 100)
    assert not bool((other == noisy).any())


def test_numpy_float16_and_list_forms_agree():
    gen = torch.Generator().manual_seed(2)
    u = randn((4, 33), torch.float16, gen)
    a_np, n_np = weighted_aggregate(u.numpy(), np.array([1.0, 2.0, 3.0, 4.0]))
    a_list, n_list = weighted_aggregate([r.numpy() for r in u], [1, 2, 3, 4])
    a_t, n_t = weighted_aggregate(u, torch.tensor([1, 2, 3, 4]))
    assert a_np.dtype == np.float16 and n_np.dtype == np.float64
    np.testing.assert_array_equal(a_np, a_list)
    np.testing.assert_array_equal(a_np, a_t.numpy())
    np.testing.assert_array_equal(n_np, n_t.numpy())


@pytest.mark.parametrize("clip_norm", [None, 5.0])
def test_large_inputs_do_not_depend_on_threads_or_form(clip_norm, restore_threads):
    gen = torch.Generator().manual_seed(4)
    u = randn((10, 50_001), torch.float32, gen, 0.05)
    w = torch.rand(10, generator=gen, dtype=torch.float64)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(weighted_aggregate(u, w, clip_norm=clip_norm))
        results.append(weighted_aggregate(list(u), w, clip_norm=clip_norm))
    for agg, norms in results[1:]:
        assert torch.equal(agg, results[0][0]) and torch.equal(norms, results[0][1])
    _check(u, "matrix", w, clip_norm)


def test_empty_k_gives_zeros():
    agg, norms = weighted_aggregate(torch.empty(0, 7), torch.empty(0))
    assert torch.equal(agg, torch.zeros(7)) and norms.shape == (0,)
    agg, norms = weighted_aggregate(np.empty((0, 3), dtype=np.float32), [])
    assert isinstance(agg, np.ndarray) and agg.dtype == np.float32
    np.testing.assert_array_equal(agg, np.zeros(3, dtype=np.float32))


# --- argument checks -------------------------------------------------------------------------


def _good():
    gen = torch.Generator().manual_seed(1)
    return randn((3, 4), torch.float32, gen), torch.tensor([1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "weights, error, match",
    [
        (torch.tensor([1.0, 2.0]), ValueError, "weights"),
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), ValueError, "weights"),
        (torch.ones(3, 1), ValueError, "weights"),
        (torch.tensor([1.0, -2.0, 3.0]), ValueError, "weights"),
        (torch.zeros(3), ValueError, "weights"),
        (torch.tensor([1.0, float("nan"), 3.0]), ValueError, "weights"),
        (torch.tensor([1.0, float("inf"), 3.0]), ValueError, "weights"),
        ([1.0, 2.0], ValueError, "weights"),
        (np.array([0.0, 0.0, 0.0]), ValueError, "weights"),
        (["a", "b", "c"], TypeError, "weights"),
        (None, TypeError, "weights"),
        ("123", TypeError, "weights"),
        (torch.ones(3, dtype=torch.complex64), TypeError, "weights"),
        (torch.ones(3, dtype=torch.bool), TypeError, "weights"),
    ],
    ids=["short", "long", "2d", "negative", "all-zero", "nan", "inf", "short-list",
         "all-zero-numpy", "strings", "none", "str", "complex", "bool"],
)
def test_bad_weights(weights, error, match):
    u, _ = _good()
    before = u.clone()
    with pytest.raises(error, match=match):
        weighted_aggregate(u, weights)
    assert torch.equal(u, before)


def test_weights_on_another_device():
    u, _ = _good()
    with pytest.raises(ValueError, match="weights"):
        weighted_aggregate(u, torch.ones(3, device="meta"))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda u: u.to(torch.int64), TypeError, "updates"),
        (lambda u: u.numpy().astype(np.int32), TypeError, "updates"),
        (lambda u: [u[0], u[1], u[2, :3]], ValueError, "updates"),
        (lambda u: [u[0], u[1], u[2:]], ValueError, r"updates\[2\]"),
        (lambda u: u[None], ValueError, "updates"),
        (lambda u: u[0], ValueError, "updates"),
        (lambda u: [], ValueError, "updates"),
        (lambda u: "updates", TypeError, "updates"),
        (lambda u: [u[0], u[1].double(), u[2]], TypeError, "updates"),
        (lambda u: [u[0], u[1].to(torch.int32), u[2]], TypeError, r"updates\[1\]"),
        (lambda u: [u[0], u[1], torch.empty(4, device="meta")], ValueError, "updates.*device"),
    ],
    ids=["int-tensor", "int-numpy", "lengths", "2d-in-list", "3d", "1d", "empty", "str",
         "mixed-dtype", "int-in-list", "devices"],
)
def test_bad_updates(make, error, match):
    u, w = _good()
    before = u.clone()
    with pytest.raises(error, match=match):
        weighted_aggregate(make(u), w)
    assert torch.equal(u, before)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(clip_norm=0.0), ValueError, "clip_norm"),
        (dict(clip_norm=-1.0), ValueError, "clip_norm"),
        (dict(clip_norm=float("nan")), ValueError, "clip_norm"),
        (dict(clip_norm=float("inf")), ValueError, "clip_norm"),
        (dict(clip_norm="1"), TypeError, "clip_norm"),
        (dict(noise_std=-1.0), ValueError, "noise_std"),
        (dict(noise_std=float("nan")), ValueError, "noise_std"),
        (dict(noise_std=1.0, seed=-1), ValueError, "seed"),
        (dict(noise_std=1.0, offset=-1), ValueError, "offset"),
        (dict(noise_std=1.0, seed=0.5), TypeError, "seed"),
    ],
)
def test_bad_options(kwargs, error, match):
    u, w = _good()
    before = u.clone()
    with pytest.raises(error, match=match):
        weighted_aggregate(u, w, **kwargs)
    assert torch.equal(u, before)


@pytest.mark.parametrize("k, p", [(3, 10), (37, 9000), (5, 20_000)])
def test_one_pass_and_two_pass_kernels_agree_bitwise(k, p):
    # No clip_norm runs the one-pass kernel; a clip_norm no update reaches runs the two-pass
    # kernel with factor 1: same additions in the same order, so the same bits. The norms come
    # from two sum-of-squares loops (float stage or not) and agree to float precision.
    g = torch.Generator().manual_seed(k * p)
    u = torch.randn(k, p, generator=g)
    w = torch.rand(k, generator=g) + 0.1
    plain, n1 = weighted_aggregate(u, w)
    clipped, n2 = weighted_aggregate(u, w, clip_norm=1e30)
    assert torch.equal(plain, clipped)
    torch.testing.assert_close(n1, n2, rtol=4 * 2.0**-24, atol=0)


def test_zero_weight_nan_update_does_not_poison_the_one_pass_kernel():
    u = torch.randn(4, 9000)
    u[2, 5] = float("nan")
    w = torch.tensor([1.0, 2.0, 0.0, 1.0])
    got, norms = weighted_aggregate(u, w)
    assert bool(torch.isfinite(got).all())
    assert math.isnan(float(norms[2]))
    expected = (w[:, None].double() * torch.nan_to_num(u.double(), nan=0.0)).sum(0) / w.sum()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_nan_update_with_weight_triggers_the_recompute_and_matches_zeroing_it():
    u = torch.randn(6, 10_000)
    w = torch.arange(1.0, 7.0)
    bad = u.clone()
    bad[3, 7777] = float("inf")
    got, norms = weighted_aggregate(bad, w)
    zeroed = u.clone()
    zeroed[3] = 0.0
    want, _ = weighted_aggregate(zeroed, w)
    assert math.isinf(float(norms[3]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

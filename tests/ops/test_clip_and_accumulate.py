"""clip_and_accumulate against its float64 reference, hand-computed cases, non-finite samples,
thread-count independence and argument checking."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml_fast.ops import CLIPPING_MODES, clip_and_accumulate
from ppml_fast.ops._reference import clip_and_accumulate_ref

from ._util import (
    DTYPES,
    assert_norms_close,
    assert_sum_close,
    noncontiguous,
    randn,
    row_scales,
)


def _check_against_reference(grads, max_norm, clipping, eps=1e-6, gamma=0.01):
    """Runs the op, checks dtypes/shapes and compares with the reference; returns the results."""
    dtype = grads[0].dtype
    batch = grads[0].shape[0]
    sums, norms = clip_and_accumulate(grads, max_norm, clipping=clipping, eps=eps, gamma=gamma)
    ref_sums, ref_norms = clip_and_accumulate_ref(
        grads, max_norm, clipping=clipping, eps=eps, gamma=gamma
    )
    # magnitude of the terms: the same factors applied to |g| (same norms, so same factors)
    abs_sums, _ = clip_and_accumulate_ref(
        [g.abs() for g in grads], max_norm, clipping=clipping, eps=eps, gamma=gamma
    )
    assert len(sums) == len(grads)
    for k, (s, r, m, g) in enumerate(zip(sums, ref_sums, abs_sums, grads)):
        assert s.dtype == dtype and s.shape == g.shape[1:] and s.device == g.device
        assert_sum_close(s, r, m, batch, dtype, what=f"sums[{k}]")
    norm_dtype = torch.float64  # always: float32 would overflow to inf for finite samples
    assert norms.dtype == norm_dtype
    width = sum(g[0].numel() for g in grads) if batch else 0
    assert_norms_close(norms, ref_norms, width, dtype)
    return sums, norms


@st.composite
def clip_cases(draw):
    batch = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 33)))
    n_tensors = draw(st.one_of(st.integers(1, 3), st.integers(1, 12)))
    shapes = draw(
        st.lists(
            st.lists(st.integers(1, 7), max_size=3).map(tuple),
            min_size=n_tensors,
            max_size=n_tensors,
        )
    )
    clipping = draw(st.sampled_from(CLIPPING_MODES))
    if clipping == "per_layer" and draw(st.booleans()):
        max_norm = draw(st.lists(st.floats(0.05, 20.0), min_size=n_tensors, max_size=n_tensors))
    else:
        max_norm = draw(st.floats(0.05, 20.0))
    layout = draw(st.sampled_from(["contiguous", "noncontiguous", "mixed"]))
    eps = draw(st.sampled_from([1e-6, 0.0, 0.25]))
    gamma = draw(st.sampled_from([0.01, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, shapes, clipping, max_norm, layout, eps, gamma, seed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=100)
@given(case=clip_cases())
def test_matches_reference(dtype, case):
    batch, shapes, clipping, max_norm, layout, eps, gamma, seed = case
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for k, shape in enumerate(shapes):
        scale = row_scales(batch, gen).reshape((batch,) + (1,) * len(shape))
        g = (torch.randn((batch,) + shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        if layout == "noncontiguous" or (layout == "mixed" and k % 2):
            g = noncontiguous(g)
        grads.append(g)
    before = [g.clone() for g in grads]
    _check_against_reference(grads, max_norm, clipping, eps, gamma)
    for g, b in zip(grads, before):
        assert torch.equal(g, b), "the op changed its input"


def test_flat_hand_computed():
    # sample 0: ||(3, 0, 4)|| = 5 -> factor 1/5; sample 1: ||(0, 0.5, 0)|| = 0.5 -> factor 1
    a = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    b = torch.tensor([[4.0], [0.0]], dtype=torch.float64)
    (sa, sb), norms = clip_and_accumulate([a, b], 1.0, eps=0.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(sa, torch.tensor([0.6, 0.5], dtype=torch.float64))
    torch.testing.assert_close(sb, torch.tensor([0.8], dtype=torch.float64))
    # eps enters the denominator: factor 1 / (5 + 1)
    (sa, sb), _ = clip_and_accumulate([a, b], 1.0, eps=1.0)
    torch.testing.assert_close(sb, torch.tensor([4.0 / 6.0], dtype=torch.float64))
    # automatic clipping (Bu et al. 2023): C / (||g|| + gamma) for every sample, also small ones
    (sa, sb), _ = clip_and_accumulate([a, b], 1.0, clipping="automatic", gamma=0.5)
    torch.testing.assert_close(
        sa, torch.tensor([3.0 / 5.5, 0.5 / 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(sb, torch.tensor([4.0 / 5.5], dtype=torch.float64))


def test_per_layer_hand_computed_with_list_max_norm():
    # layer 0 of sample 0 has norm 3 (limit 1 -> factor 1/3); layer 1 of sample 0 has norm 0.5
    # (limit 2 -> unclipped); sample 1: layer 0 norm 0.5 (unclipped), layer 1 norm 4 (-> 1/2)
    a = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.5], [-4.0]], dtype=torch.float64)
    (sa, sb), norms = clip_and_accumulate([a, b], [1.0, 2.0], clipping="per_layer", eps=0.0)
    assert norms.shape == (2, 2)
    torch.testing.assert_close(norms, torch.tensor([[3.0, 0.5], [0.5, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(sa, torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(sb, torch.tensor([0.5 - 2.0], dtype=torch.float64))
    # one float for every layer
    (sa, sb), _ = clip_and_accumulate([a, b], 1.0, clipping="per_layer", eps=0.0)
    torch.testing.assert_close(sb, torch.tensor([0.5 - 1.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_empty_batch_gives_zeros(dtype, clipping):
    grads = [torch.empty(0, 3, 2, dtype=dtype), torch.empty(0, dtype=dtype)]
    sums, norms = clip_and_accumulate(grads, 1.0, clipping=clipping)
    assert [tuple(s.shape) for s in sums] == [(3, 2), ()]
    assert all(s.dtype == dtype and bool((s == 0).all()) for s in sums)
    assert tuple(norms.shape) == ((2, 0) if clipping == "per_layer" else (0,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_non_finite_sample_is_reported_and_excluded(dtype, clipping):
    gen = torch.Generator().manual_seed(7)
    grads = [randn((6, 5), dtype, gen), randn((6, 2, 3), dtype, gen), randn((6,), dtype, gen)]
    grads[1][1, 0, 2] = float("nan")      # sample 1: NaN in tensor 1
    grads[0][3, 4] = float("inf")         # sample 3: +Inf in tensor 0
    grads[2][4] = float("-inf")           # sample 4: -Inf in tensor 2
    sums, norms = _check_against_reference(grads, 1.0, clipping)
    for s in sums:
        assert bool(torch.isfinite(s).all())
    if clipping == "per_layer":
        assert math.isnan(norms[1, 1]) and math.isinf(norms[0, 3]) and math.isinf(norms[2, 4])
        assert bool(torch.isfinite(norms[0, [0, 1, 2, 4, 5]]).all())
    else:
        assert math.isnan(norms[1]) and norms[3] == math.inf and norms[4] == math.inf
        assert bool(torch.isfinite(norms[[0, 2, 5]]).all())
    # the bad samples contribute nothing: same sums as the batch without them
    good = [0, 2, 5]
    sums_good, _ = clip_and_accumulate([g[good] for g in grads], 1.0, clipping=clipping)
    for s, sg in zip(sums, sums_good):
        torch.testing.assert_close(s, sg)


def test_per_layer_non_finite_layer_drops_the_whole_sample():
    a = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0], [10.0], [3.0]], dtype=torch.float64)
    (sa, sb), norms = clip_and_accumulate([a, b], [100.0, 100.0], clipping="per_layer")
    assert math.isnan(norms[0, 1]) and norms[1, 1] == 10.0
    # sample 1's finite layer b is dropped too: sb = 1 + 3, not 1 + 10 + 3
    torch.testing.assert_close(sb, torch.tensor([4.0], dtype=torch.float64))
    torch.testing.assert_close(sa, torch.tensor([1.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_large_and_many_tensors_do_not_depend_on_threads(clipping, restore_threads):
    # widths above the kernel's column chunk (4096) and enough work for several threads
    gen = torch.Generator().manual_seed(3)
    shapes = [(40_000,), (3, 5), (16_385,), (1,)] + [(7,)] * 30
    grads = [randn((6,) + s, torch.float32, gen) for s in shapes]
    grads = [g * row_scales(6, gen).to(torch.float32).reshape((6,) + (1,) * (g.dim() - 1))
             for g in grads]
    max_norm = [0.7] * len(grads) if clipping == "per_layer" else 0.7
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(clip_and_accumulate(grads, max_norm, clipping=clipping))
    s1, n1 = results[0]
    for s2, n2 in results[1:]:
        assert torch.equal(n1, n2)
        assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    _check_against_reference(grads, 0.7, clipping)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_equals_contiguous(dtype):
    gen = torch.Generator().manual_seed(11)
    grads = [randn((5, 4, 3), dtype, gen, 0.3), randn((5, 7), dtype, gen, 0.3)]
    views = [grads[0].permute(0, 2, 1).contiguous().permute(0, 2, 1), grads[1].t().contiguous().t()]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    s1, n1 = clip_and_accumulate(grads, 1.0)
    s2, n2 = clip_and_accumulate(views, 1.0)
    assert torch.equal(n1, n2) and all(torch.equal(a, b) for a, b in zip(s1, s2))


def test_zero_width_tensor():
    # a parameter with no elements (shape (B, 0)) next to a normal one
    gen = torch.Generator().manual_seed(5)
    grads = [randn((4, 3), torch.float32, gen), torch.empty(4, 0),
             randn((4, 2), torch.float32, gen)]
    for clipping in CLIPPING_MODES:
        sums, norms = clip_and_accumulate(grads, 1.0, clipping=clipping)
        assert sums[1].shape == (0,)
        ref, ref_norms = clip_and_accumulate_ref(grads, 1.0, clipping=clipping)
        torch.testing.assert_close(sums[0].double(), ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums[2].double(), ref[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-6, atol=0)


# --- argument checks -------------------------------------------------------------------------


def _good_grads():
    gen = torch.Generator().manual_seed(1)
    return [randn((3, 4), torch.float32, gen), randn((3, 2, 2), torch.float32, gen)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_norm=0.0), ValueError, "max_norm"),
        (dict(max_norm=-1.0), ValueError, "max_norm"),
        (dict(max_norm=float("nan")), ValueError, "max_norm"),
        (dict(max_norm=float("inf")), ValueError, "max_norm"),
        (dict(max_norm="1.0"), TypeError, "max_norm"),
        (dict(max_norm=None), TypeError, "max_norm"),
        (dict(max_norm=True), TypeError, "max_norm"),
        (dict(max_norm=[1.0, 0.0], clipping="per_layer"), ValueError, r"max_norm\[1\]"),
        (dict(max_norm=[-1.0, 1.0], clipping="per_layer"), ValueError, r"max_norm\[0\]"),
        (dict(max_norm=[1.0, float("nan")], clipping="per_layer"), ValueError, r"max_norm\[1\]"),
        (dict(max_norm=[1.0], clipping="per_layer"), ValueError, "max_norm"),
        (dict(max_norm=[1.0, 2.0, 3.0], clipping="per_layer"), ValueError, "max_norm"),
        (dict(max_norm=[1.0, 2.0], clipping="flat"), ValueError, "max_norm"),
        (dict(max_norm=1.0, clipping="bogus"), ValueError, "clipping"),
        (dict(max_norm=1.0, eps=-1e-6), ValueError, "eps"),
        (dict(max_norm=1.0, eps=float("nan")), ValueError, "eps"),
        (dict(max_norm=1.0, clipping="automatic", gamma=0.0), ValueError, "gamma"),
        (dict(max_norm=1.0, gamma=-1.0), ValueError, "gamma"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    grads = _good_grads()
    before = [g.clone() for g in grads]
    max_norm = kwargs.pop("max_norm")
    with pytest.raises(error, match=match):
        clip_and_accumulate(grads, max_norm, **kwargs)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda g: [g[0], g[1][:2]], ValueError, "per_sample_grads.*batch"),
        (lambda g: [g[0], torch.ones(3, 2, dtype=torch.int64)], TypeError,
         r"per_sample_grads\[1\]"),
        (lambda g: [torch.ones(3, 4, dtype=torch.int32)], TypeError, r"per_sample_grads\[0\]"),
        (lambda g: [g[0], g[1].double()], TypeError, "per_sample_grads"),
        (lambda g: [g[0].to(torch.complex64)], TypeError, r"per_sample_grads\[0\]"),
        (lambda g: g[0], TypeError, "per_sample_grads"),
        (lambda g: [], ValueError, "per_sample_grads"),
        (lambda g: [g[0], torch.tensor(1.0)], ValueError, r"per_sample_grads\[1\]"),
        (lambda g: [g[0].numpy()], TypeError, r"per_sample_grads\[0\]"),
        (lambda g: [g[0], torch.empty(3, 2, device="meta")], ValueError,
         "per_sample_grads.*device"),
    ],
    ids=["batch", "int64", "int32", "mixed-dtype", "complex", "bare-tensor", "empty", "0-dim",
         "numpy", "devices"],
)
def test_bad_grads(make, error, match):
    grads = _good_grads()
    before = [g.clone() for g in grads]
    with pytest.raises(error, match=match):
        clip_and_accumulate(make(grads), 1.0)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


def test_registered_op_checks_its_arguments_too():
    with pytest.raises(ValueError, match="max_norm"):
        torch.ops.ppml_fast.clip_and_accumulate(_good_grads(), [0.0], "flat", 1e-6, 0.01)

"""conv_fast / conv_taps / conv_book (issue 16): the channels-last, tap-cropped paths of
ConvRule (groups == 1) against the float64 per-sample reference and against the rule's original
paths (``conv_fast.FAST = False``), for every book-keeping method; cropped taps are exact zeros;
records whose ghost terms cancel are flagged and stay within C on these paths too."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ppml_fast.privacy.per_sample import Captured, conv, conv_book, conv_fast, conv_taps, make_rules
from tests.privacy.per_sample._reference import check_rule, randn, reference

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")


def _fn(n, kwargs):
    return lambda x, ps: CONV[n](x, ps["weight"], ps.get("bias"), **kwargs)


# n, (B, C_in, *spatial), C_out, kernel, kwargs
CASES = [
    (2, (3, 5, 1, 1), 4, (3, 3), dict(padding=1)),                  # 1x1 maps: centre tap only
    (2, (3, 4, 2, 2), 5, (3, 3), dict(stride=2, padding=1)),        # 2x2 of 3x3 taps, one position
    (2, (3, 4, 2, 2), 3, (3, 3), dict(padding=1)),                  # 2x2 maps: 16 of 36 pairs
    (2, (2, 3, 4, 4), 4, (3, 3), dict(padding=1)),                  # 4x4 maps: 100 of 144
    (2, (2, 3, 5, 4), 4, (3, 3), dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1))),
    (2, (2, 3, 1, 4), 2, (3, 3), dict(stride=(1, 3), padding=1)),   # rows cropped, columns not
    (2, (2, 2, 6, 5), 3, (2, 3), dict(padding="same", dilation=(2, 1))),  # asymmetric padding
    (2, (2, 3, 8, 8), 4, (1, 1), dict(stride=2)),                   # 1x1 stride 2
    (2, (2, 3, 9, 9), 4, (7, 7), dict(stride=2, padding=3)),        # a stem
    (2, (2, 2, 1, 1), 3, (1, 1), dict(stride=3, padding=1)),        # no tap ever reads the input
    (1, (3, 2, 3), 4, (5,), dict(padding=2)),
    (1, (2, 3, 9), 2, (2,), dict(stride=3)),                        # windows apart, not patches
    (3, (2, 2, 1, 2, 3), 3, (3, 3, 3), dict(padding=1)),
    (3, (2, 2, 4, 3, 2), 2, (2, 2, 1), dict(stride=(2, 1, 1), padding=(1, 0, 0))),
]


@pytest.mark.parametrize("book", ["auto", "dense", "taps", "native"])
@pytest.mark.parametrize("n, x_shape, cout, kernel, kwargs", CASES)
def test_fast_paths_match_reference(n, x_shape, cout, kernel, kwargs, book, monkeypatch):
    """norms_sq (auto / ghost / materialize), clipped_sum (with and without state) and per_sample
    in float64 (1e-10) and float32 against torch.func, for each book-keeping method."""
    monkeypatch.setattr(conv_book, "MODE", book)
    gen = torch.Generator().manual_seed(hash((x_shape, kernel)) % 2**31)
    params = {"weight": randn((cout, x_shape[1]) + kernel, gen), "bias": randn((cout,), gen)}
    x = randn(x_shape, gen)
    reduction = max(math.prod(x_shape[2:]), x_shape[1] * math.prod(kernel)) * 8
    check_rule(f"conv{n}d", _fn(n, kwargs), x, params, kwargs, reduction=reduction)


def _resnet_like(seed):
    """ResNet-18-GN's bench geometries at a smaller batch and width."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    shapes = [(3, 8, 16, 7, 2, 3), (8, 8, 4, 3, 1, 1), (8, 16, 4, 3, 2, 1), (16, 16, 2, 3, 1, 1),
              (16, 32, 2, 1, 2, 0), (16, 32, 2, 3, 2, 1), (32, 32, 1, 3, 1, 1)]
    for cin, cout, s, k, st, pad in shapes:
        x = randn((4, cin, s, s), gen)
        w = randn((cout, cin, k, k), gen)
        g = randn(F.conv2d(x, w, stride=st, padding=pad).shape, gen)
        out.append((Captured("conv2d", x, {"weight": w}, dict(stride=st, padding=pad)), g))
    return out


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_fast_equals_original_paths(mode, monkeypatch):
    """float64: the new paths' norms and sums equal the original paths' (conv_fast.FAST off)."""
    rule = make_rules()["conv2d"]
    factors = torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cap, g in _resnet_like(2):
        got = {}
        for fast in (False, True):
            monkeypatch.setattr(conv_fast, "FAST", fast)
            norms, state = rule.norms_sq(cap, g, mode=mode)
            got[fast] = (norms["weight"], rule.clipped_sum(cap, g, factors, state)["weight"])
        torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[True][1], got[False][1], rtol=1e-12, atol=1e-14)


def test_plan_crops_inactive_taps():
    # 3x3, padding 1 on a 1x1 map: only the centre tap reads the input
    p = conv_taps.plan((1, 1), (1, 1), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))
    assert p.cropped and p.k0 == (1, 1) and p.kernel == (1, 1) and p.taps == 1
    # 3x3 stride 2 from 2x2: taps 1..2 in each dimension, no padding left
    p = conv_taps.plan((2, 2), (1, 1), (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)))
    assert p.k0 == (1, 1) and p.kernel == (2, 2) and p.start == (0, 0) and p.end == (1, 1)
    # 2x2 maps: every tap reads the input somewhere (not cropped), 16 of 36 pairs do
    p = conv_taps.plan((2, 2), (2, 2), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)))
    assert not p.cropped and conv_book.boxes(p)[1] == 16 and conv_book.choose(p) == "taps"
    # no tap at all
    p = conv_taps.plan((1,), (1,), (1,), (3,), (1,), ((1, 1),))
    assert p.taps == 0


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_cropped_taps_are_exact_zeros(mode):
    gen = torch.Generator().manual_seed(3)
    x, w = randn((3, 4, 1, 1), gen, torch.float32), randn((5, 4, 3, 3), gen, torch.float32)
    g = randn((3, 5, 1, 1), gen, torch.float32)
    cap = Captured("conv2d", x, {"weight": w}, dict(padding=1))
    rule = make_rules()["conv2d"]
    norms, state = rule.norms_sq(cap, g, mode=mode)
    sums = rule.clipped_sum(cap, g, torch.ones(3), state)["weight"]
    ps = rule.per_sample(cap, g)["weight"]
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1, 1] = False
    assert not bool(sums[..., mask].any()) and not bool(ps[..., mask].any())
    if mode == "materialize":
        kept = state["weight"]
        assert kept.shape == (3,) + tuple(w.shape) and not bool(kept[..., mask].any())
    centre = torch.einsum("bo,bi->oi", g[:, :, 0, 0], x[:, :, 0, 0])
    torch.testing.assert_close(sums[..., 1, 1], centre)


def test_grad_out_of_the_wrong_shape_is_refused():
    gen = torch.Generator().manual_seed(4)
    cap = Captured("conv2d", randn((2, 3, 4, 4), gen), {"weight": randn((2, 3, 3, 3), gen)}, {})
    with pytest.raises(ValueError, match="output shape"):
        make_rules()["conv2d"].norms_sq(cap, randn((2, 2, 3, 3), gen))


def test_channels_last_and_strided_inputs():
    gen = torch.Generator().manual_seed(5)
    x = randn((3, 4, 5, 5), gen).contiguous(memory_format=torch.channels_last)
    w = randn((6, 4, 3, 3), gen)
    g = randn((3, 6, 5, 5), gen).contiguous(memory_format=torch.channels_last)
    fn = lambda xx, ps: F.conv2d(xx, ps["weight"], padding=1)  # noqa: E731
    want = reference(fn, x, {"weight": w}, g)["weight"]
    cap = Captured("conv2d", x, {"weight": w}, dict(padding=1))
    rule = make_rules()["conv2d"]
    f = torch.rand(3, generator=gen, dtype=torch.float64)
    for mode in ("ghost", "materialize"):
        norms, state = rule.norms_sq(cap, g, mode=mode)
        torch.testing.assert_close(norms["weight"], want.flatten(1).square().sum(1),
                                   rtol=1e-10, atol=0)
        torch.testing.assert_close(rule.clipped_sum(cap, g, f, state)["weight"],
                                   torch.einsum("b,b...->...", f, want), rtol=1e-10, atol=1e-12)


def _cancelling_case(dtype):
    """Conv2d 3x3, padding 1, stride (1, 3) on 1x4 images (rows cropped to the centre tap row; two
    positions whose windows are (0, x0, x1) and (x2, x3, 0)): record 0 has x0 = M e_0, x3 = -M e_0
    and equal output gradients at both positions, so its Gram terms are ~M^2 and cancel."""
    gen = torch.Generator().manual_seed(6)
    M = 2.0**30
    x = randn((4, 3, 1, 4), gen)
    x[0, 0, 0, 0], x[0, 0, 0, 3] = M, -M
    g = randn((4, 5, 1, 2), gen)
    g[0, :, 0, 1] = g[0, :, 0, 0]
    w = randn((5, 3, 3, 3), gen)
    kwargs = dict(stride=(1, 3), padding=1)
    want = reference(lambda xx, ps: F.conv2d(xx, ps["weight"], **kwargs), x.to(dtype).double(),
                     {"weight": w}, g.to(dtype).double())["weight"]
    return Captured("conv2d", x.to(dtype), {"weight": w.to(dtype)}, kwargs), g.to(dtype), want


@pytest.mark.parametrize("book", ["dense", "taps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cancelling_record_is_flagged_and_clipped(dtype, book, monkeypatch):
    monkeypatch.setattr(conv_book, "MODE", book)
    cap, g, want = _cancelling_case(dtype)
    geo = conv._Geometry(2, tuple(cap.params["weight"].shape), cap.kwargs)
    assert conv_fast.plan_for(geo, cap.activation, g).cropped
    rule = make_rules("ghost")["conv2d"]
    norms, state = rule.norms_sq(cap, g)
    exact = want.flatten(1).square().sum(1)
    assert conv_fast.FLAGGED in state and 0 in state[conv_fast.FLAGGED][0].tolist()
    assert bool((norms["weight"].double() >= exact * (1 - 2.0**-30)).all())
    f = (1.0 / (norms["weight"].double().sqrt() + 1e-6)).clamp(max=1.0)  # C = 1
    fdt = f.to(dtype)
    got = rule.clipped_sum(cap, g, fdt, state)["weight"].double()
    f_drop = fdt.clone()
    f_drop[0] = 0
    got_drop = rule.clipped_sum(cap, g, f_drop, state)["weight"].double()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert float((got - got_drop).norm()) <= 1.0 + tol  # one record moves the sum by <= C
    torch.testing.assert_close(got, torch.einsum("b,b...->...", f.to(dtype).double(), want),
                               rtol=tol, atol=tol)


def test_honest_records_not_flagged_on_resnet_shapes():
    rule = make_rules("ghost")["conv2d"]
    for cap, g in _resnet_like(7):
        cap = Captured(cap.op, cap.activation.float(), {"weight": cap.params["weight"].float()},
                       cap.kwargs)
        _, state = rule.norms_sq(cap, g.float())
        assert conv_fast.FLAGGED not in state


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_per_role_sums_equal_the_whole_call(mode):
    """Per-layer clipping calls clipped_sum once per role with the same state (flagged records
    included on the ghost path): each role's sum equals the whole call's."""
    cap, g, _ = _cancelling_case(torch.float32)
    gen = torch.Generator().manual_seed(8)
    cap = Captured(cap.op, cap.activation, {**cap.params, "bias": randn((5,), gen, torch.float32)},
                   cap.kwargs)
    rule = make_rules()["conv2d"]
    norms, state = rule.norms_sq(cap, g, mode=mode)
    assert (conv_fast.FLAGGED in state) == (mode == "ghost")
    f = (1.0 / (sum(norms.values()).sqrt() + 1e-6)).clamp(max=1.0)
    whole = rule.clipped_sum(cap, g, f, state)
    for r in cap.params:
        sub = Captured(cap.op, cap.activation, {r: cap.params[r]}, cap.kwargs)
        part = rule.clipped_sum(sub, g, f, state)
        assert set(part) == {r} and torch.equal(part[r], whole[r]), r

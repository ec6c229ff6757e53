"""Convolutions over non-overlapping patches (stride = kernel, no padding or dilation, one group:
ViT's patch embedding) go to the linear rule on the reshaped patches: results against the
torch.func float64 reference in 1, 2 and 3 dimensions, with pixels no window covers, and which
geometries take the path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppml_fast.privacy.per_sample import Captured, conv, make_rules

from ._reference import check_rule, randn

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _fn(n, kwargs, fixed):
    def fn(x, ps):
        merged = {**fixed, **ps}
        return CONV[n](x, merged["weight"], merged.get("bias"), **kwargs)

    return fn


@pytest.mark.parametrize(
    "n, x_shape, w_shape, roles",
    [
        (2, (4, 3, 8, 8), (5, 3, 4, 4), ("weight", "bias")),  # ViT-like
        (2, (3, 2, 9, 7), (4, 2, 2, 3), ("weight",)),  # rectangular kernel, pixels left over
        (1, (4, 3, 12), (6, 3, 3), ("weight", "bias")),
        (3, (2, 2, 4, 4, 6), (3, 2, 2, 2, 3), ("bias",)),
        (2, (5, 4, 3, 3), (6, 4, 1, 1), ("weight", "bias")),  # 1x1, stride 1
    ],
)
def test_patch_conv_matches_reference(n, x_shape, w_shape, roles):
    gen = torch.Generator().manual_seed(11)
    kwargs = {"stride": tuple(w_shape[2:])}
    full = {"weight": randn(w_shape, gen), "bias": randn((w_shape[0],), gen)}
    params = {r: full[r] for r in roles}
    fixed = {r: t for r, t in full.items() if r not in roles}
    cap = Captured(f"conv{n}d", torch.zeros(x_shape), {"weight": full["weight"]}, kwargs)
    assert conv.is_patches(conv._Geometry(n, w_shape, kwargs))
    assert make_rules()[f"conv{n}d"]._as_linear(cap, torch.zeros(
        (x_shape[0], w_shape[0]) + tuple(s // k for s, k in zip(x_shape[2:], w_shape[2:])))) is not None
    check_rule(f"conv{n}d", _fn(n, kwargs, fixed), randn(x_shape, gen), params, kwargs,
               reduction=max(w_shape[0], x_shape[1] * 16) * 16)


@pytest.mark.parametrize("kwargs", [{"stride": 2}, {"stride": 4, "padding": 1},
                                    {"stride": 4, "dilation": 2}, {"stride": 4, "groups": 2}])
def test_other_geometries_keep_the_convolution_path(kwargs):
    geo = conv._Geometry(2, (4, 2 if kwargs.get("groups") else 4, 4, 4), kwargs)
    assert not conv.is_patches(geo)


def test_patches_layout():
    """patches(x)[b, l] is the l-th window (row-major over output positions), flattened as the
    weight's (C, *kernel)."""
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    p = conv.patches(x, (2, 3))
    assert p.shape == (2, 4, 18)
    assert torch.equal(p[1, 3], x[1, :, 2:4, 3:6].reshape(-1))

"""ConvRule (conv1d/2d/3d) against the torch.func float64 reference: stride, padding (ints, tuples,
'same' incl. asymmetric, 'valid'), dilation, groups, bias or not; ghost and materialised paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ppml_fast.privacy.per_sample import Captured, make_rules
from ppml_fast.privacy.per_sample.conv import choose_path

from ._reference import check_empty, check_rule, randn

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _fn(n: int, kwargs: dict, fixed: dict):
    def fn(x, ps):
        merged = {**fixed, **ps}
        return CONV[n](x, merged["weight"], merged.get("bias"), **kwargs)

    return fn


CASES = [
    # n, (B, C_in, *spatial), C_out, kernel, kwargs, roles
    (1, (3, 4, 11), 6, (3,), dict(stride=2, padding=1, dilation=2, groups=2), ("weight", "bias")),
    (1, (3, 2, 9), 3, (4,), dict(padding="same"), ("weight", "bias")),
    (1, (2, 3, 8), 4, (3,), dict(padding="valid"), ("weight",)),
    (2, (3, 4, 7, 6), 6, (3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), ("weight", "bias")),
    (2, (2, 3, 6, 5), 4, (3, 4), dict(padding="same", dilation=(2, 1)), ("weight", "bias")),
    (2, (3, 4, 5, 5), 4, (3, 3), dict(padding=1, groups=4), ("weight",)),
    (2, (2, 1, 28, 28), 16, (8, 8), dict(stride=2, padding=3), ("weight", "bias")),
    (2, (3, 2, 5, 5), 3, (2, 2), dict(), ("bias",)),
    (3, (2, 2, 5, 6, 4), 4, (2, 3, 2), dict(stride=(1, 2, 1), padding=1, dilation=(1, 1, 2), groups=2), ("weight", "bias")),
    (3, (2, 2, 4, 4, 3), 3, (2, 2, 3), dict(padding="same"), ("weight",)),
]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("impl", ["grouped", "unfold"])
@pytest.mark.parametrize("n, x_shape, cout, kernel, kwargs, roles", CASES)
def test_conv_matches_reference(n, x_shape, cout, kernel, kwargs, roles, impl, monkeypatch):
    """Every case with both ways of materialising (grouped convolution_backward, unfold + matmul)."""
    from ppml_fast.privacy.per_sample import conv

    monkeypatch.setattr(conv, "PER_SAMPLE_IMPL", impl)
    gen = torch.Generator().manual_seed(11)
    groups = kwargs.get("groups", 1)
    full = {
        "weight": randn((cout, x_shape[1] // groups) + kernel, gen),
        "bias": randn((cout,), gen),
    }
    params = {r: full[r] for r in roles}
    fixed = {r: t for r, t in full.items() if r not in roles}
    x = randn(x_shape, gen)
    positions = CONV[n](x, full["weight"], None, **kwargs)[0, 0].numel()
    reduction = max(positions, x_shape[1] * math.prod(kernel)) * 8
    check_rule(f"conv{n}d", _fn(n, kwargs, fixed), x, params, kwargs,
               reduction=reduction)


def test_forced_paths_differ_and_agree():
    gen = torch.Generator().manual_seed(12)
    x, w = randn((3, 4, 9, 9), gen), randn((6, 2, 3, 3), gen)
    kwargs = dict(stride=2, padding=1, groups=2)
    g = randn(F.conv2d(x, w, **kwargs).shape, gen)
    cap = Captured("conv2d", x, {"weight": w}, kwargs)
    rule = make_rules()["conv2d"]
    ghost, s_ghost = rule.norms_sq(cap, g, mode="ghost")
    mat, s_mat = rule.norms_sq(cap, g, mode="materialize")
    assert "weight" not in s_ghost and "weight" in s_mat
    torch.testing.assert_close(ghost["weight"], mat["weight"], rtol=1e-12, atol=0)


def test_clipped_sum_without_state_uses_one_weight_gradient(monkeypatch):
    """Book-keeping path: one aten.convolution_backward call, and no per-sample unfold."""
    from ppml_fast.privacy.per_sample import conv

    gen = torch.Generator().manual_seed(13)
    x, w, b = randn((3, 2, 6, 6), gen), randn((4, 2, 3, 3), gen), randn((4,), gen)
    g = randn((3, 4, 4, 4), gen)
    cap = Captured("conv2d", x, {"weight": w, "bias": b}, {})
    calls = []
    monkeypatch.setattr(conv, "unfold", lambda *a: calls.append("unfold"))
    sums = make_rules()["conv2d"].clipped_sum(cap, g, torch.ones(3, dtype=torch.float64), None)
    assert calls == []
    want_w = torch.nn.grad.conv2d_weight(x, w.shape, g)
    torch.testing.assert_close(sums["weight"], want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums["bias"], g.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


def test_cost_model_choices():
    from ppml_fast.privacy.per_sample.conv import grouped_is_faster

    # Opacus MNIST CNN at batch 256: conv1 (L=196, d=64, p=16), conv2 (L=25, d=256, p=32).
    assert choose_path(256, 1, 196, 64, 16) == "materialize"
    assert choose_path(256, 1, 25, 256, 32) == "materialize"
    assert grouped_is_faster(196, 64, 16) and grouped_is_faster(25, 256, 32)
    # Few positions, many channels: ghost; and unfold beats the grouped call.
    assert choose_path(32, 1, 4, 256 * 9, 256) == "ghost"
    assert not grouped_is_faster(4, 128 * 9, 128)
    # Kept gradients over the cap: ghost whatever the shape.
    assert choose_path(4096, 1, 196, 64, 256) == "ghost"


def test_empty_batch():
    gen = torch.Generator().manual_seed(14)
    params = {"weight": randn((4, 2, 3, 3), gen), "bias": randn((4,), gen)}
    check_empty("conv2d", torch.zeros(0, 2, 6, 6, dtype=torch.float64), params, {}, (0, 4, 4, 4))


def test_bad_padding_is_refused():
    gen = torch.Generator().manual_seed(15)
    cap = Captured("conv1d", randn((2, 2, 6), gen), {"weight": randn((3, 2, 3), gen)}, {"padding": "full"})
    with pytest.raises(ValueError, match="padding"):
        make_rules()["conv1d"].norms_sq(cap, randn((2, 3, 4), gen))

"""LinearRule against the torch.func float64 reference: 2-D and sequence inputs, both paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppml_fast.privacy.per_sample import MATERIALIZE_MAX_ELEMENTS, Captured, make_rules
from ppml_fast.privacy.per_sample.linear import choose_path

from ._reference import check_empty, check_rule, randn


def _fn(fixed: dict):
    def fn(x, ps):
        merged = {**fixed, **ps}
        return F.linear(x, merged["weight"], merged.get("bias"))

    return fn


@pytest.mark.parametrize(
    "x_shape, p, roles",
    [
        ((5, 7), 3, ("weight", "bias")),
        ((5, 7), 3, ("weight",)),
        ((5, 7), 3, ("bias",)),
        ((4, 6, 5), 3, ("weight", "bias")),
        ((3, 2, 3, 4), 6, ("weight", "bias")),
        ((2, 9, 3), 8, ("weight",)),
    ],
)
def test_linear_matches_reference(x_shape, p, roles):
    gen = torch.Generator().manual_seed(1)
    d = x_shape[-1]
    full = {"weight": randn((p, d), gen), "bias": randn((p,), gen)}
    params = {r: full[r] for r in roles}
    fixed = {r: t for r, t in full.items() if r not in roles}
    check_rule("linear", _fn(fixed), randn(x_shape, gen), params, {}, reduction=max(d, p) * 16)


def test_forced_paths_differ_and_agree():
    """mode="ghost" keeps no weight gradients, mode="materialize" does; same norms to 1e-12."""
    gen = torch.Generator().manual_seed(2)
    x, g = randn((4, 6, 5), gen), randn((4, 6, 3), gen)
    cap = Captured("linear", x, {"weight": randn((3, 5), gen), "bias": randn((3,), gen)}, {})
    rule = make_rules()["linear"]
    ghost, s_ghost = rule.norms_sq(cap, g, mode="ghost")
    mat, s_mat = rule.norms_sq(cap, g, mode="materialize")
    assert "weight" not in s_ghost and "weight" in s_mat
    torch.testing.assert_close(ghost["weight"], mat["weight"], rtol=1e-12, atol=0)
    # The rule-level default is used when no mode is passed.
    _, s_default = make_rules("materialize")["linear"].norms_sq(cap, g)
    assert "weight" in s_default


def test_cost_model_choices():
    assert choose_path(256, 1, 784, 512) == "ghost"  # 2-D input: ||g||^2 ||x||^2
    assert choose_path(32, 64, 128, 10000) == "ghost"  # kept grads would be 41M elements
    assert 32 * 128 * 10000 > MATERIALIZE_MAX_ELEMENTS
    assert choose_path(32, 512, 128, 128) == "materialize"  # T^2 (d+p) >> d p
    assert choose_path(32, 4, 512, 512) == "ghost"  # short sequences, wide layer
    assert choose_path(32, 64, 128, 384) == "materialize"  # transformer in_proj, seq 64


def test_low_precision_inputs_norms_in_float32():
    gen = torch.Generator().manual_seed(3)
    x, g = randn((4, 6, 5), gen).bfloat16(), randn((4, 6, 3), gen).bfloat16()
    w = randn((3, 5), gen).bfloat16()
    cap = Captured("linear", x, {"weight": w}, {})
    rule = make_rules()["linear"]
    norms, state = rule.norms_sq(cap, g, mode="ghost")
    assert norms["weight"].dtype == torch.float32
    want = torch.einsum("btp,btd->bpd", g.double(), x.double()).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(norms["weight"].double(), want, rtol=1e-5, atol=0)
    sums = rule.clipped_sum(cap, g, torch.ones(4), state)
    assert sums["weight"].dtype == torch.float32  # a 16-bit parameter's sum: rounded after the noise


def test_empty_batch():
    gen = torch.Generator().manual_seed(4)
    params = {"weight": randn((3, 5), gen), "bias": randn((3,), gen)}
    check_empty("linear", torch.zeros(0, 6, 5, dtype=torch.float64), params, {}, (0, 6, 3))
    check_empty("linear", torch.zeros(0, 5, dtype=torch.float64), params, {}, (0, 3))


def test_mismatched_grad_out_is_refused():
    gen = torch.Generator().manual_seed(5)
    cap = Captured("linear", randn((4, 5), gen), {"weight": randn((3, 5), gen)}, {})
    with pytest.raises(ValueError, match="grad_out"):
        make_rules()["linear"].norms_sq(cap, randn((3, 3), gen))
    with pytest.raises(ValueError, match="mode"):
        make_rules()["linear"].norms_sq(cap, randn((4, 3), gen), mode="fast")

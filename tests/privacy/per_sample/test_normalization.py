"""Layer/group/instance/RMS norm rules against the torch.func float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppml_fast.privacy.per_sample import Captured, make_rules

from ._reference import check_empty, check_rule, randn


def _affine(gen, shape, roles):
    full = {"weight": randn(shape, gen) + 1.0, "bias": randn(shape, gen)}
    return {r: full[r] for r in roles}, {r: t for r, t in full.items() if r not in roles}


@pytest.mark.parametrize(
    "x_shape, ns, roles",
    [
        ((4, 6, 5), (5,), ("weight", "bias")),
        ((3, 2, 4, 5), (4, 5), ("weight", "bias")),
        ((4, 5), (5,), ("bias",)),
        ((4, 6, 5), (5,), ("weight",)),
    ],
)
def test_layer_norm(x_shape, ns, roles):
    gen = torch.Generator().manual_seed(31)
    params, fixed = _affine(gen, ns, roles)
    kwargs = {"normalized_shape": ns, "eps": 1e-3}

    def fn(x, ps):
        m = {**fixed, **ps}
        return F.layer_norm(x, ns, m.get("weight"), m.get("bias"), 1e-3)

    check_rule("layer_norm", fn, randn(x_shape, gen), params, kwargs, reduction=64)


@pytest.mark.parametrize(
    "x_shape, groups, roles",
    [((4, 6, 5), 3, ("weight", "bias")), ((3, 4, 3, 3), 2, ("weight", "bias")), ((4, 6), 2, ("weight",))],
)
def test_group_norm(x_shape, groups, roles):
    gen = torch.Generator().manual_seed(32)
    params, fixed = _affine(gen, (x_shape[1],), roles)

    def fn(x, ps):
        m = {**fixed, **ps}
        return F.group_norm(x, groups, m.get("weight"), m.get("bias"), 1e-4)

    check_rule("group_norm", fn, randn(x_shape, gen), params, {"num_groups": groups, "eps": 1e-4})


@pytest.mark.parametrize("x_shape", [(4, 3, 7), (3, 2, 4, 5)])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm(x_shape, use_input_stats):
    gen = torch.Generator().manual_seed(33)
    c = x_shape[1]
    params, _ = _affine(gen, (c,), ("weight", "bias"))
    mean, var = randn((c,), gen), torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    stats = {} if use_input_stats else {"running_mean": mean, "running_var": var}

    def fn(x, ps):
        rm, rv = stats.get("running_mean"), stats.get("running_var")
        return F.instance_norm(x, rm, rv, ps["weight"], ps["bias"], use_input_stats, 0.1, 1e-5)

    before = (mean.clone(), var.clone())
    check_rule("instance_norm", fn, randn(x_shape, gen), params,
               {"use_input_stats": use_input_stats, "eps": 1e-5, **stats})
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])  # never updated


def test_instance_norm_leaves_running_stats_alone_with_input_stats():
    gen = torch.Generator().manual_seed(34)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x, g = randn((2, 3, 5), gen) + 4.0, randn((2, 3, 5), gen)
    cap = Captured("instance_norm", x, {"weight": randn((3,), gen)},
                   {"use_input_stats": True, "running_mean": mean, "running_var": var})
    make_rules()["instance_norm"].norms_sq(cap, g)
    assert not bool(mean.any()) and bool((var == 1).all())


@pytest.mark.parametrize("x_shape, ns, eps", [((4, 6, 5), (5,), 1e-6), ((3, 4, 5), (4, 5), None)])
def test_rms_norm(x_shape, ns, eps):
    gen = torch.Generator().manual_seed(35)
    params, _ = _affine(gen, ns, ("weight",))

    def fn(x, ps):
        return F.rms_norm(x, list(ns), ps["weight"], eps)

    check_rule("rms_norm", fn, randn(x_shape, gen), params, {"normalized_shape": ns, "eps": eps})


def test_wrong_kwargs_are_caught():
    gen = torch.Generator().manual_seed(36)
    cap = Captured("layer_norm", randn((2, 3, 4), gen), {"weight": randn((4,), gen)}, {"normalized_shape": (3, 4)})
    with pytest.raises(ValueError, match="per-sample weight"):
        make_rules()["layer_norm"].norms_sq(cap, randn((2, 3, 4), gen))
    cap = Captured("group_norm", randn((2, 4, 3), gen), {"weight": randn((4,), gen)}, {})
    with pytest.raises(ValueError, match="num_groups"):
        make_rules()["group_norm"].norms_sq(cap, randn((2, 4, 3), gen))


def test_empty_batch():
    gen = torch.Generator().manual_seed(37)
    params = {"weight": randn((4,), gen), "bias": randn((4,), gen)}
    check_empty("group_norm", torch.zeros(0, 4, 3, dtype=torch.float64), params, {"num_groups": 2}, (0, 4, 3))
    check_empty("layer_norm", torch.zeros(0, 5, 4, dtype=torch.float64), params, {"normalized_shape": (4,)}, (0, 5, 4))

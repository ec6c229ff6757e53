"""The "linear_t" rule (``x @ W + b`` with W of shape (in, out): transformers' ``Conv1D``, GPT-2's
c_attn / c_proj / c_fc) against the torch.func float64 reference, its ghost-norm cancellation
record, and how layers.py matches ``Conv1D`` without importing transformers (stock forward only,
checked bit for bit once per class)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers  # in the test extra: imported, never skipped
from torch import nn

from ppml_fast.privacy import layers
from ppml_fast.privacy.per_sample import Captured, make_rules

from ._reference import check_empty, check_rule, randn


def _fn(fixed: dict):
    def fn(x, ps):
        merged = {**fixed, **ps}
        out = x @ merged["weight"]
        return out + merged["bias"] if "bias" in merged else out

    return fn


@pytest.mark.parametrize(
    "x_shape, p, roles",
    [
        ((5, 7), 3, ("weight", "bias")),
        ((4, 6, 5), 3, ("weight", "bias")),
        ((4, 6, 5), 5, ("weight", "bias")),  # square W: a layout mix-up would not raise
        ((3, 2, 3, 4), 6, ("weight",)),
        ((2, 9, 3), 8, ("bias",)),
        ((3, 40, 4), 4, ("weight", "bias")),  # T (d + p) >= KAPPA d p: auto materialises
    ],
)
def test_linear_t_matches_reference(x_shape, p, roles):
    gen = torch.Generator().manual_seed(5)
    d = x_shape[-1]
    full = {"weight": randn((d, p), gen), "bias": randn((p,), gen)}
    params = {r: full[r] for r in roles}
    fixed = {r: t for r, t in full.items() if r not in roles}
    check_rule("linear_t", _fn(fixed), randn(x_shape, gen), params, {}, reduction=max(d, p) * 16)


def test_linear_t_empty_batch():
    check_empty("linear_t", torch.zeros(0, 4, 3, dtype=torch.float64),
                {"weight": torch.zeros(3, 5, dtype=torch.float64),
                 "bias": torch.zeros(5, dtype=torch.float64)}, {}, (0, 4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_linear_t_cancellation_record(dtype):
    """x_1 = (M, a), x_2 = (-M, a) with equal output gradients: the ghost norm is flagged, the
    record materialised in float64 in the weight's (in, out) layout; clipped sum = reference."""
    gen = torch.Generator().manual_seed(6)
    B, T, d, p, M = 5, 4, 6, 6, 2.0**30
    x = randn((B, T, d), gen)
    g = randn((B, T, p), gen)
    x[0, T - 1] = x[0, 0]
    x[0, 0, 0], x[0, T - 1, 0] = M, -M
    g[0, T - 1] = g[0, 0]
    w = randn((d, p), gen)
    cap = Captured("linear_t", x.to(dtype), {"weight": w.to(dtype)}, {})
    rule = make_rules("ghost")["linear_t"]
    norms, state = rule.norms_sq(cap, g.to(dtype))
    assert "weight:flagged" in state and state["weight:flagged"][1].shape[1:] == (d, p)
    ref = torch.einsum("btd,btp->bdp", x.to(dtype).double(), g.to(dtype).double())
    ref_sq = ref.flatten(1).square().sum(1)
    assert bool((norms["weight"].double() >= ref_sq * (1 - 2.0**-30)).all())
    f = (1.0 / (ref_sq.sqrt() + 1e-6)).clamp(max=1.0)
    got = rule.clipped_sum(cap, g.to(dtype), f.to(dtype), state)["weight"]
    want = torch.einsum("b,bdp->dp", f.to(dtype).double(), ref)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (got.double() - want).norm() <= tol * B


def _conv1d(nf=6, nx=4):
    torch.manual_seed(0)
    return transformers.pytorch_utils.Conv1D(nf, nx)


def test_hf_conv1d_gets_the_rule():
    m = _conv1d()
    assert layers.rule_for(m)[0] == "linear_t"
    f = layers.functional_forward(m)
    x = torch.randn(3, 5, 4)
    assert torch.equal(f(m, x, {}), m(x))


def test_hf_conv1d_subclass_overriding_forward_goes_to_torch_func():
    class Scaled(transformers.pytorch_utils.Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    m = Scaled(6, 4)
    assert layers.rule_for(m) is None and layers.functional_forward(m) is None


def test_same_name_elsewhere_or_other_forward_is_not_matched(monkeypatch):
    """A class called Conv1D in another module is not transformers'; one in transformers'
    module whose forward computes something else (a future version) fails the bit-for-bit check."""

    class Conv1D(nn.Module):  # noqa: N801 - the name is the point
        def __init__(self):
            super().__init__()
            self.nf = 6
            self.weight = nn.Parameter(torch.randn(4, 6))
            self.bias = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return x @ self.weight - self.bias

    assert layers.rule_for(Conv1D()) is None
    monkeypatch.setattr(Conv1D, "__module__", "transformers.pytorch_utils")
    monkeypatch.setattr(layers, "_lazy_checked", {})
    assert layers.rule_for(Conv1D()) is None  # matched by name, refused by the check
    monkeypatch.setattr(layers, "_lazy_checked", {})
    assert layers.rule_for(_conv1d())[0] == "linear_t"  # the real one still passes


def test_ppml_fast_does_not_import_transformers():
    code = ("import sys, ppml_fast.privacy, ppml_fast.privacy.layers; "
            "assert 'transformers' not in sys.modules, 'imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)

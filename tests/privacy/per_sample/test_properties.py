"""Property tests over random geometries: for conv (1-3 d) and sequence linear, the ghost norms,
both ways of materialising and the book-keeping clipped sum agree with per-sample autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml_fast.privacy.per_sample import Captured, make_rules
from ppml_fast.privacy.per_sample import conv as conv_module

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")


@st.composite
def conv_case(draw):
    n = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    same = draw(st.booleans())
    stride = (1,) * n if same else tuple(draw(st.integers(1, 2)) for _ in range(n))
    padding = "same" if same else tuple(draw(st.integers(0, 2)) for _ in range(n))
    span = [dil * (k - 1) + 1 for k, dil in zip(kernel, dilation)]
    size = tuple(s + draw(st.integers(0, 3)) for s in span)
    batch = draw(st.integers(1, 3))
    return n, batch, cin, cout, kernel, size, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _autograd_per_sample(fn, x, w, b, g):
    ws, bs = [], []
    for i in range(x.shape[0]):
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        (fn(x[i : i + 1], wi, bi) * g[i : i + 1]).sum().backward()
        ws.append(wi.grad)
        bs.append(bi.grad)
    return torch.stack(ws), torch.stack(bs)


@settings(max_examples=30)
@given(conv_case(), st.integers(0, 2**31 - 1))
def test_conv_paths_agree_with_autograd(case, seed):
    n, batch, cin, cout, kernel, size, kwargs = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, cin) + size, generator=gen, dtype=torch.float64)
    w = torch.randn((cout, cin // kwargs["groups"]) + kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    fn = lambda xi, wi, bi: CONV[n](xi, wi, bi, **kwargs)  # noqa: E731
    g = torch.randn(fn(x, w, b).shape, generator=gen, dtype=torch.float64)
    want_w, want_b = _autograd_per_sample(fn, x, w, b, g)
    factors = torch.rand(batch, generator=gen, dtype=torch.float64)
    cap = Captured(f"conv{n}d", x, {"weight": w, "bias": b}, kwargs)
    rule = make_rules()[f"conv{n}d"]
    want_norm = want_w.flatten(1).pow(2).sum(1)
    for mode, impl in (("ghost", "auto"), ("materialize", "grouped"), ("materialize", "unfold")):
        conv_module.PER_SAMPLE_IMPL = impl
        try:
            norms, state = rule.norms_sq(cap, g, mode=mode)
            sums = rule.clipped_sum(cap, g, factors, state)
        finally:
            conv_module.PER_SAMPLE_IMPL = "auto"
        torch.testing.assert_close(norms["weight"], want_norm, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norms["bias"], want_b.pow(2).sum(1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sums["weight"], torch.einsum("b,b...->...", factors, want_w), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sums["bias"], factors @ want_b, rtol=1e-10, atol=1e-12)


@settings(max_examples=30)
@given(
    st.integers(0, 3), st.lists(st.integers(1, 4), min_size=0, max_size=2), st.integers(1, 6),
    st.integers(1, 6), st.integers(0, 2**31 - 1),
)
def test_linear_paths_agree_with_autograd(batch, middle, d, p, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, *middle, d], generator=gen, dtype=torch.float64)
    w = torch.randn(p, d, generator=gen, dtype=torch.float64)
    b = torch.randn(p, generator=gen, dtype=torch.float64)
    g = torch.randn([batch, *middle, p], generator=gen, dtype=torch.float64)
    want_w, want_b = (_autograd_per_sample(F.linear, x, w, b, g) if batch
                      else (torch.zeros(0, p, d, dtype=torch.float64), torch.zeros(0, p, dtype=torch.float64)))
    factors = torch.rand(batch, generator=gen, dtype=torch.float64)
    cap = Captured("linear", x, {"weight": w, "bias": b}, {})
    rule = make_rules()["linear"]
    for mode in ("ghost", "materialize", "auto"):
        norms, state = rule.norms_sq(cap, g, mode=mode)
        sums = rule.clipped_sum(cap, g, factors, state)
        torch.testing.assert_close(norms["weight"], want_w.flatten(1).pow(2).sum(1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norms["bias"], want_b.pow(2).sum(1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sums["weight"], torch.einsum("b,b...->...", factors, want_w), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sums["bias"], factors @ want_b, rtol=1e-10, atol=1e-12)

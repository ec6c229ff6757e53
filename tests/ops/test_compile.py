"""The public ops inside one torch.compile(fullgraph=True) function: no graph break, and the
same results as eager mode (the noise stream is fixed by seed and offset)."""

from __future__ import annotations

import torch

from ppml_fast.ops import (
    add_gaussian_noise_,
    clip_and_accumulate,
    noisy_scale_,
    weighted_aggregate,
)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(8, 5, generator=gen), torch.randn(8, 2, 3, generator=gen)
    updates = torch.randn(4, 6, generator=gen) * 2
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    return g1, g2, updates, weights


def _clip_and_noise(g1, g2, extra):
    sums, norms = clip_and_accumulate([g1, g2], 1.0)
    offset = noisy_scale_(sums, 0.5, 8.0, seed=3, offset=0)
    add_gaussian_noise_(extra, 0.25, seed=3, offset=offset)
    return [sums[0] * 2, sums[1], norms, extra + 1]


def _step_public(g1, g2, updates, weights, extra):
    out = _clip_and_noise(g1, g2, extra)
    agg, unorms = weighted_aggregate(updates, weights, clip_norm=2.0, noise_std=0.1, seed=4)
    return out + [agg, unorms]


def _step_registered_aggregate(g1, g2, updates, weights, extra):
    out = _clip_and_noise(g1, g2, extra)
    agg, unorms = torch.ops.ppml_fast.weighted_aggregate(
        [updates], weights.double(), 2.0, 0.1, 4, 0
    )
    return out + [agg, unorms]


def _compare(fn):
    g1, g2, updates, weights = _inputs()
    # the in-place noise goes to a non-contiguous view of a caller's tensor
    base_eager, base_compiled = torch.zeros(3, 4), torch.zeros(3, 4)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    eager = fn(g1, g2, updates, weights, base_eager[:, ::2])
    got = compiled(g1, g2, updates, weights, base_compiled[:, ::2])
    assert len(got) == len(eager)
    for e, c in zip(eager, got):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    # the in-place op reached the caller's tensor in the compiled function too, view only
    torch.testing.assert_close(base_compiled, base_eager, rtol=0, atol=0)
    assert bool((base_compiled[:, ::2] != 0).all()) and bool((base_compiled[:, 1::2] == 0).all())


def test_fullgraph_compile_of_the_three_ops_equals_eager():
    # clip_and_accumulate, noisy_scale_, add_gaussian_noise_ through their public wrappers,
    # weighted_aggregate as the registered op
    _compare(_step_registered_aggregate)


def test_fullgraph_compile_of_the_public_wrappers_equals_eager():
    _compare(_step_public)

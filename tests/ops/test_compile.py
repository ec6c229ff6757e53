"""The public ops inside one torch.compile(fullgraph=True) function: no graph break, and the
same results as eager mode (the noise stream is fixed by seed and offset).

Each test compiles in a child process: on torch 2.4-2.5 the C++ code inductor builds is linked
with -ffast-math, and loading it turns on flush-to-zero / denormals-are-zero for the rest of the
process (pytorch/pytorch#126848), in the threads that exist or start then; the bit-exact op tests
that follow in the same pytest process would then see subnormals flushed (seen on torch 2.5.1:
test_noise's storage conversions and the huge-sample clipping test failed after this module).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def _compare_in_child(step: str) -> None:
    root = Path(__file__).resolve().parents[2]
    code = f"import tests.ops.test_compile as m; m._compare(m.{step}); print('compiled OK')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root),
                                                                  os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled OK" in proc.stdout, proc.stdout + proc.stderr


def test_fullgraph_compile_of_the_three_ops_equals_eager():
    # clip_and_accumulate, noisy_scale_, add_gaussian_noise_ through their public wrappers,
    # weighted_aggregate as the registered op
    _compare_in_child("_step_registered_aggregate")


def test_fullgraph_compile_of_the_public_wrappers_equals_eager():
    _compare_in_child("_step_public")

"""Float64 per-sample reference for the rule tests, built with torch.func, and the shared checks.

For an op ``fn(x, params)`` and a captured batch, sample i's loss is ``(fn(x_i) * grad_out_i).sum()``
(a random linear functional of its output), so ``vmap(grad(loss_i))`` is sample i's gradient of a
summed loss whose output gradient is ``grad_out``: exactly what a rule receives. Tolerances: float64
results must match to 1e-10 relative; float32 results to a bound derived from float32's unit
roundoff and the reduction length (see :func:`float32_rtol`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import grad, vmap

from ppml_fast.privacy.per_sample import Captured, make_rules
from ppml_fast.privacy.per_sample.bounds import TAU

RTOL64 = 1e-10
UPPER_SLACK = (1 + TAU) / (1 - TAU) - 1


def float32_rtol(reduction: int) -> float:
    """Worst-case-style bound for a float32 sum of ``reduction`` products, relative to the sum of
    magnitudes: ``reduction * u`` (u = 2^-24), times 8 for the chained matmuls and the squares of a
    norm and for cancellation in random data; floored at 64 u."""
    return 8 * max(reduction, 8) * 2.0**-24


def reference(fn: Callable, x: torch.Tensor, params: dict, grad_out: torch.Tensor) -> dict:
    """role -> (B, *shape) per-sample gradients in float64 via vmap(grad(...))."""
    params64 = {r: p.detach().double() for r, p in params.items()}
    x64 = x if not x.is_floating_point() else x.double()

    def loss(ps, xi, gi):
        return (fn(xi[None], ps)[0] * gi).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params64, x64, grad_out.double())


def output_grad(fn: Callable, x: torch.Tensor, params: dict, gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        out = fn(x, params)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """Normwise: max |got - want| <= rtol * max |want| (elementwise for norms: pass them one by one)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def assert_norms(
    got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, over: float = 0.0
) -> None:
    """Per sample: want_i (1 - rtol) <= got_i <= want_i (1 + rtol + over)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = got.double() - want
    err = diff.abs()
    bad = (diff < -rtol * want.abs()) | (diff > (rtol + over) * want.abs())
    assert not bool(bad.any()), (
        f"{what}: relative errors {(err / want.abs()).max().item():.3e} > {rtol:.1e}"
    )


def check_rule(
    op: str,
    fn: Callable,
    x: torch.Tensor,
    params: dict,
    kwargs: dict,
    *,
    seed: int = 0,
    reduction: int = 64,
    modes: tuple[str, ...] = ("auto", "ghost", "materialize"),
) -> None:
    """norms_sq / clipped_sum / per_sample of RULES[op] in every mode against the reference, in
    float64 (1e-10) and float32 (float32_rtol(reduction)); ``x`` and ``params`` are float64 (x may be
    integer indices)."""
    gen = torch.Generator().manual_seed(seed)
    g64 = output_grad(fn, x, params, gen)
    want = reference(fn, x, params, g64)
    batch = g64.shape[0]
    factors = torch.rand(batch, generator=gen, dtype=torch.float64) + 0.1
    want_norms = {r: want[r].flatten(1).pow(2).sum(1) for r in want}
    want_sums = {r: torch.einsum("b,b...->...", factors, want[r]) for r in want}
    for dtype, rtol in ((torch.float64, RTOL64), (torch.float32, float32_rtol(reduction))):
        xd = x.to(dtype) if x.is_floating_point() else x
        pd = {r: p.detach().to(dtype) for r, p in params.items()}
        # The reference saw float64 data: round the data first and compare against that.
        if dtype != torch.float64:
            want_d = reference(fn, xd, {r: p.double() for r, p in pd.items()}, g64.to(dtype))
            wn = {r: want_d[r].flatten(1).pow(2).sum(1) for r in want_d}
            ws = {r: torch.einsum("b,b...->...", factors.to(dtype).double(), want_d[r]) for r in want_d}
        else:
            want_d, wn, ws = want, want_norms, want_sums
        cap = Captured(op=op, activation=xd, params=pd, kwargs=kwargs)
        gd = g64.to(dtype)
        rules = make_rules()
        rule = rules[op]
        for mode in modes:
            tag = f"{op} {dtype} mode={mode}"
            norms, state = rule.norms_sq(cap, gd, mode=mode)
            assert set(norms) == set(pd), f"{tag}: roles {set(norms)} != {set(pd)}"
            for r in pd:
                assert norms[r].dtype == dtype, f"{tag}: norms dtype {norms[r].dtype}"
                # Ghost norms are upper bounds (per_sample/bounds.py): over by at most the factor
                # (1 + TAU) / (1 - TAU) of an unflagged record, never under.
                assert_norms(norms[r], wn[r], rtol, f"{tag} norms[{r}]", over=UPPER_SLACK)
            for st in (state, None):
                sums = rule.clipped_sum(cap, gd, factors.to(dtype), st)
                assert set(sums) == set(pd)
                for r in pd:
                    assert sums[r].dtype == dtype and sums[r].shape == pd[r].shape
                    assert_close(sums[r], ws[r], rtol, f"{tag} clipped_sum[{r}] state={st is not None}")
        ps = rule.per_sample(cap, gd)
        for r in pd:
            assert ps[r].dtype == dtype
            assert_close(ps[r], want_d[r], rtol, f"{op} {dtype} per_sample[{r}]")


def check_empty(op: str, x: torch.Tensor, params: dict, kwargs: dict, out_shape: tuple) -> None:
    """A batch of 0: norms of shape (0,), zero clipped sums, (0, *shape) per-sample gradients."""
    cap = Captured(op=op, activation=x, params=params, kwargs=kwargs)
    g = torch.zeros(out_shape, dtype=torch.float64)
    rule = make_rules()[op]
    for mode in ("auto", "ghost", "materialize"):
        norms, state = rule.norms_sq(cap, g, mode=mode)
        for r, p in params.items():
            assert norms[r].shape == (0,)
        sums = rule.clipped_sum(cap, g, torch.zeros(0, dtype=torch.float64), state)
        for r, p in params.items():
            assert sums[r].shape == p.shape and not bool(sums[r].any())
    ps = rule.per_sample(cap, g)
    for r, p in params.items():
        assert ps[r].shape == (0,) + tuple(p.shape)


def randn(shape, gen, dtype=torch.float64):
    return torch.randn(shape, generator=gen, dtype=dtype)


def prod(shape) -> int:
    return math.prod(shape)

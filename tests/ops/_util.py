"""Helpers for the op tests: test data, non-contiguous copies, and tolerances derived from the
dtypes (unit roundoff of the storage type and of the accumulation type), not tuned to pass."""

from __future__ import annotations

import numpy as np
import torch

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def acc_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the type the kernels accumulate in (float64 for float64, else float32)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def pair_eps(dtype: torch.dtype) -> float:
    """Relative error of the float stage of the CPU sum of squares for 16/32-bit inputs: four
    squares added in float (3 additions + 1 multiplication, <= 4 * 2^-24) before going to
    double; half of it reaches the norm, counted in full here. 0 for float64."""
    return 0.0 if dtype == torch.float64 else 4 * 2.0**-24


def out_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the storage dtype (one rounding of a result costs at most eps/2)."""
    return torch.finfo(dtype).eps


def randn(shape, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Normal data drawn in float64 and rounded to ``dtype`` (the references see the rounded
    values, so rounding the inputs costs no accuracy in the comparison)."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def row_scales(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample magnitudes spanning "far below", "around" and "far above" a clip norm of 1,
    with some exact-zero samples (a zero gradient is a valid clip)."""
    s = 10.0 ** (torch.rand(batch, generator=gen, dtype=torch.float64) * 4.0 - 2.5)
    zero = torch.rand(batch, generator=gen) < 0.1
    return torch.where(zero, torch.zeros_like(s), s)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view that is not contiguous whenever it has more than one element."""
    base = torch.zeros(tuple(t.shape) + (2,), dtype=t.dtype, device=t.device)
    base[..., 0] = t
    view = base[..., 0]
    assert t.numel() <= 1 or not view.is_contiguous()
    return view


def assert_sum_close(got, ref, magnitude, n_terms: int, dtype: torch.dtype, what: str = "") -> None:
    """``got`` (a sum of ``n_terms`` products, stored in ``dtype``) against the float64 ``ref``.

    Bound: one rounding of the result to the storage dtype, plus (n_terms + 2) roundings in the
    accumulation type relative to ``magnitude`` (the sum of the absolute values of the terms,
    which covers cancellation), plus the smallest normal of ``dtype`` for underflow.
    """
    got = torch.as_tensor(np.asarray(got) if isinstance(got, np.ndarray) else got)
    got = got.detach().to("cpu", torch.float64)
    ref = torch.as_tensor(ref).to(torch.float64)
    magnitude = torch.as_tensor(magnitude).to(torch.float64)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bound = (
        out_eps(dtype) * ref.abs()
        + (n_terms + 2) * acc_eps(dtype) * magnitude
        + torch.finfo(dtype).tiny
    )
    err = (got - ref).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ref.numel()} elements off; first at flat index {i}: "
            f"got {got.reshape(-1)[i].item()!r}, expected {ref.reshape(-1)[i].item()!r}, "
            f"bound {bound.reshape(-1)[i].item():.3g}"
        )


def assert_norms_close(got, ref, n_elems: int, dtype: torch.dtype, what: str = "norms") -> None:
    """Norms: the same NaN/Inf pattern, and finite values within a sum-of-squares error
    (n_elems roundings in double) plus one rounding to the returned type."""
    got = torch.as_tensor(np.asarray(got) if isinstance(got, np.ndarray) else got)
    got = got.detach().to("cpu", torch.float64)
    ref = torch.as_tensor(ref).to(torch.float64)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaN pattern {got} vs {ref}"
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref)), f"{what}: Inf {got} vs {ref}"
    fin = torch.isfinite(ref)
    bound = (acc_eps(dtype) + pair_eps(dtype) + (n_elems + 2) * 2.0**-52) * ref[fin].abs() + 1e-300
    err = (got[fin] - ref[fin]).abs()
    assert bool((err <= bound).all()), f"{what}: got {got[fin]}, expected {ref[fin]}"


def assert_unchanged(after: torch.Tensor, before: torch.Tensor) -> None:
    """Bit-for-bit the same values (NaN equal to NaN): an op must not touch its inputs."""
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)

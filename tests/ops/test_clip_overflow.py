"""Samples of extreme but finite magnitude keep their clipped contribution (csrc/cpu/clip_rescue.h).

Two ways the CPU kernel used to give a finite, nonzero gradient a weight of exactly zero:
- float32 / bfloat16 rows of norm ~1e38 and more: the factor C / ||g|| (~1e-38) was rounded to a
  float below the normal range, a subnormal with few bits, and exactly 0 under flush-to-zero /
  denormals-are-zero (torch.set_flush_denormal(True), or any -ffast-math library loaded into the
  process);
- float64 rows with entries beyond ~1e154: the sum of squares overflowed to inf, and the row was
  dropped as if it held an inf or a NaN (also by weighted_aggregate without clipping).
The references scale each row by a power of two before taking its norm (exact), in float64; the
sums are compared within float32 (or float64) rounding, relative to the clip norm. Rows with an
inf or a NaN are still dropped, and rescued rows give the same bits on every instruction set and
thread count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppml_fast import _C
from ppml_fast.ops import clip_and_accumulate, weighted_aggregate


@pytest.fixture(autouse=True)
def restore():
    threads = torch.get_num_threads()
    isa = _C._set_cpu_isa("auto")
    clip_avx512 = _C._set_clip_avx512(False)
    yield
    _C._set_clip_avx512(clip_avx512)
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)
    _C._set_cpu_isa(isa)


def _scaled(row: np.ndarray) -> tuple[np.ndarray, int]:
    """(row * 2^-E, E) with 2^E the power of two of max |row| (exact)."""
    m = float(np.max(np.abs(row)))
    if m == 0.0:
        return row.copy(), 0
    e = math.frexp(m)[1] - 1
    return np.ldexp(row, -e), e


def _reference(rows: np.ndarray, max_norm: float, clipping: str, eps=1e-6, gamma=0.01):
    """float64 sum of the clipped rows and the rows' norms (inf where a norm exceeds the
    largest double), each factor computed in the scale of its row, so nothing overflows."""
    total = np.zeros(rows.shape[1])
    norms = []
    for row in rows:
        g, e = _scaled(row.astype(np.float64))
        n_scaled = float(np.sqrt(np.sum(g * g)))
        norms.append(math.ldexp(n_scaled, e) if e < 1000 else
                     (math.inf if n_scaled * 2.0 ** (e - 1000) > 2.0**23 else
                      math.ldexp(n_scaled, e)))
        if n_scaled == 0.0:
            continue
        if clipping == "automatic":
            fs = max_norm / (n_scaled + math.ldexp(gamma, -e))
        else:
            fs = min(max_norm / (n_scaled + math.ldexp(eps, -e)), math.ldexp(1.0, e))
        total += fs * g
    return total, np.array(norms)


def _huge_float_rows(width: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(6, width, generator=gen, dtype=torch.float64)
    r[1] *= 1e30
    r[2] *= 1e37                                    # norm ~3e38 * sqrt(width / 1000)
    r[3] = r[3] / r[3].abs().max() * 3.3e38         # entries up to the largest floats
    r[4] = 1e-3 * r[4]
    r[4, 7] = 3.0e38                                # one huge entry among small ones
    return r.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("flush", [False, True], ids=["ieee", "flush_to_zero"])
def test_huge_float_rows_keep_their_clipped_contribution(dtype, clipping, flush):
    torch.set_num_threads(1)  # flush-to-zero is a per-thread setting (MXCSR)
    if flush:
        assert torch.set_flush_denormal(True)
    g = _huge_float_rows(4099, dtype)
    assert torch.isfinite(g).all()
    sums, norms = clip_and_accumulate([g], 1.0, clipping=clipping)
    ref, ref_norms = _reference(g.double().numpy(), 1.0, clipping)
    # float32 accumulation, then one rounding to the output dtype (bfloat16 sums are bfloat16)
    err = np.abs(sums[0].double().numpy() - ref)
    tol = 8 * 2.0**-24 * g.shape[0] + torch.finfo(dtype).eps * np.abs(ref)
    assert (err <= tol).all(), (float(np.max(err - tol)), dtype, clipping, flush)
    np.testing.assert_allclose(norms.numpy(), ref_norms, rtol=1e-6)
    # every sample on its own: its clipped sum has the norm C ||g|| / (||g|| + eps) (flat; all
    # rows here have norms far above C) or C ||g|| / (||g|| + gamma) (automatic), not 0
    for b in range(g.shape[0]):
        one, _ = clip_and_accumulate([g[b:b + 1]], 1.0, clipping=clipping)
        n = ref_norms[b]
        expected = n / (n + (0.01 if clipping == "automatic" else 1e-6))
        got = float(one[0].double().norm())
        assert abs(got - expected) <= 1e-5 + 2 * torch.finfo(dtype).eps, (b, got, expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_per_layer_clipping_of_huge_float_rows(threads):
    torch.set_num_threads(threads)
    a, b = _huge_float_rows(300, torch.float32), _huge_float_rows(5000, torch.float32)
    sums, norms = clip_and_accumulate([a, b], [0.5, 2.0], clipping="per_layer")
    for k, (t, c) in enumerate(((a, 0.5), (b, 2.0))):
        ref, ref_norms = _reference(t.double().numpy(), c, "per_layer")
        err = np.abs(sums[k].double().numpy() - ref)
        assert (err <= 8 * 2.0**-24 * (c * t.shape[0] + np.abs(ref))).all()
        np.testing.assert_allclose(norms[k].numpy(), ref_norms, rtol=1e-6)


def _huge_double_rows(width: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(5, width, generator=gen, dtype=torch.float64)
    r[1] *= 1e200                                  # ||g||^2 ~1e403: overflows, ||g|| does not
    r[2] = r[2] / r[2].abs().max() * 1.7e308       # ||g|| > the largest double
    r[3] *= 1e-300                                 # ||g||^2 underflows (norm reported 0)
    return r


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("threads", [1, 2])
def test_float64_rows_whose_sum_of_squares_overflows(clipping, threads):
    torch.set_num_threads(threads)
    g = _huge_double_rows(9001)
    sums, norms = clip_and_accumulate([g], 1.0, clipping=clipping)
    ref, ref_norms = _reference(g.numpy(), 1.0, clipping)
    assert np.max(np.abs(sums[0].numpy() - ref)) <= 64 * 2.0**-53 * g.shape[0]
    assert math.isinf(float(norms[2])) and ref_norms[2] == math.inf
    np.testing.assert_allclose(norms.numpy()[[0, 1, 4]], ref_norms[[0, 1, 4]], rtol=1e-12)
    # a row whose squares underflow: norm 0 (not rescued: its factor is 1 either way, exact)
    assert float(norms[3]) == 0.0
    for b in (1, 2):
        one, _ = clip_and_accumulate([g[b:b + 1]], 1.0, clipping=clipping)
        assert abs(float(one[0].norm()) - 1.0) <= 1e-9


def test_weighted_aggregate_keeps_float64_updates_whose_norm_overflows():
    g = _huge_double_rows(4097)[:2]  # a normal update and one of entries ~1e200
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    got = weighted_aggregate([g], w)[0]
    ref = (w[:, None] * g).sum(0) / w.sum()
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=0.0)


def test_rows_with_inf_or_nan_are_still_dropped():
    g = _huge_float_rows(4099, torch.float32)
    bad = g.clone()
    bad[2, 5] = math.inf
    bad[3, 9] = math.nan
    sums, norms = clip_and_accumulate([bad], 1.0)
    keep = torch.tensor([0, 1, 4, 5])
    ref, _ = clip_and_accumulate([g[keep]], 1.0)
    assert torch.equal(sums[0], ref[0])
    assert not math.isfinite(float(norms[2])) and not math.isfinite(float(norms[3]))


def test_rescued_rows_give_the_same_bits_on_every_instruction_set_and_thread_count():
    order = ["portable", "avx2", "avx512"]
    isas = order[: order.index(_C._cpu_isa_available()) + 1]
    rows = [_huge_float_rows(9001, torch.float32), _huge_double_rows(9001)]
    for g in rows:
        got = []
        for isa in isas:
            for threads in (1, 2):
                _C._set_cpu_isa(isa)
                _C._set_clip_avx512(isa == "avx512")
                torch.set_num_threads(threads)
                sums, norms = clip_and_accumulate([g, g[:, :77]], [1.0, 3.0], clipping="per_layer")
                got.append((sums[0].clone(), sums[1].clone(), norms.clone()))
        for other in got[1:]:
            for a, b in zip(other, got[0]):
                assert torch.equal(a, b)

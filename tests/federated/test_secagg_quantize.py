"""The fixed-point encoding of secure aggregation: unbiased stochastic rounding (statistical
test with a bound from the Bernoulli variance), errors below one step, clipping, the no-wrap bound
K * 2^b <= 2^32, exact decoding of grid values, and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from ppml_fast.federated.secagg import Quantizer, max_bits


def _seed(i: int) -> bytes:
    """A fixed 32-byte ChaCha20 key for the rounding uniforms."""
    return i.to_bytes(32, "little")


@pytest.mark.parametrize("k", [1, 2, 3, 100, 1000, 2**20 + 1])
def test_max_bits_is_the_largest_that_cannot_wrap(k):
    b = max_bits(k)
    assert k * 2**b <= 2**32
    assert b == 32 or k * 2 ** (b + 1) > 2**32
    q = Quantizer(1.0, b)
    assert q.max_clients() >= k and k * q.levels < 2**32


def test_sum_of_extreme_codes_does_not_wrap():
    k = 100
    q = Quantizer(2.0, max_bits(k))
    codes = [q.quantize(torch.full((8,), 2.0), seed=_seed(i)).to(torch.int64) & 0xFFFFFFFF for i in range(k)]
    assert all(bool((c == q.levels).all()) for c in codes)
    ring_sum = torch.stack(codes).sum(0) % 2**32  # what the masked protocol delivers
    assert torch.equal(ring_sum, torch.stack(codes).sum(0))  # no wrap-around
    assert torch.allclose(q.dequantize(ring_sum, k), torch.full((8,), 2.0 * k, dtype=torch.float64))


def test_rounding_error_below_one_step_and_clipping():
    q = Quantizer(1.5, 12)
    x = torch.linspace(-3, 3, 10_001, dtype=torch.float64)
    codes = q.quantize(x, seed=_seed(1)).to(torch.int64)
    assert int(codes.min()) == 0 and int(codes.max()) == q.levels
    decoded = codes.to(torch.float64) / q.scale - q.clip_range
    clipped = x.clamp(-1.5, 1.5)
    assert float((decoded - clipped).abs().max()) < 1 / q.scale


def test_stochastic_rounding_is_unbiased():
    # n copies of a value a fraction f of a step above a grid point: the mean code estimates
    # f with standard error sqrt(f (1 - f) / n); a biased rounding (e.g. to nearest) misses by
    # min(f, 1 - f) = 0.3 steps, i.e. ~200 standard errors.
    q = Quantizer(1.0, 10)
    n = 50_000
    for i, f in enumerate((0.3, 0.5, 0.9)):
        x = torch.full((n,), (400 + f) / q.scale - q.clip_range, dtype=torch.float64)
        codes = q.quantize(x, seed=_seed(2 + i)).to(torch.float64)
        assert set(codes.unique().tolist()) == {400.0, 401.0}
        se = math.sqrt(f * (1 - f) / n)
        assert abs(float(codes.mean()) - (400 + f)) < 5 * se


def test_factor_scales_after_clipping_and_grid_values_decode_exactly():
    q = Quantizer(2.0, 20)
    ks = torch.tensor([0, 1, 12345, q.levels], dtype=torch.float64)
    x = ks / q.scale - q.clip_range  # exactly on the grid: rounding is deterministic
    codes = q.quantize(x, seed=_seed(5))
    assert torch.equal(codes.to(torch.int64), ks.to(torch.int64))
    assert torch.equal(q.dequantize(codes, 1), x)
    half = q.quantize(torch.tensor([10.0]), seed=_seed(6), factor=0.5)  # clip to 2, then halve
    assert abs(float(q.dequantize(half, 1)) - 1.0) < 1 / q.scale


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_range=0.0, bits=8), "clip_range must be a finite number > 0"),
    (dict(clip_range=float("inf"), bits=8), "clip_range must be a finite number > 0"),
    (dict(clip_range=1.0, bits=33), r"bits must be an int in \[1, 32\]"),
    (dict(clip_range=1.0, bits=0), r"bits must be an int in \[1, 32\]"),
])
def test_bad_quantizer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quantizer(**kwargs)


def test_bad_quantize_and_dequantize_arguments():
    q = Quantizer(1.0, 16)
    with pytest.raises(ValueError, match="x must be finite"):
        q.quantize(torch.tensor([0.0, float("nan")]), seed=_seed(0))
    with pytest.raises(TypeError, match="x must be a floating torch.Tensor"):
        q.quantize(torch.tensor([1, 2]), seed=_seed(0))
    with pytest.raises(ValueError, match=r"factor must be a number in \[0, 1\]"):
        q.quantize(torch.zeros(2), seed=_seed(0), factor=1.5)
    with pytest.raises(ValueError, match="seed must be 32 bytes"):
        q.quantize(torch.zeros(2), seed=b"short")
    with pytest.raises(ValueError, match="count must be <= 65537"):
        q.dequantize(torch.zeros(2, dtype=torch.int32), 65538)
    with pytest.raises(TypeError, match="total must be an int32, uint32 or int64 tensor"):
        q.dequantize(torch.zeros(2), 1)
    with pytest.raises(ValueError, match="num_clients must be an int >= 1"):
        max_bits(0)

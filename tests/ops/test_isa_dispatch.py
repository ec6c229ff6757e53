"""The CPU kernels' instruction sets, chosen at run time (csrc/cpu/target.h, isa.cpp): AVX-512 (F, BW,
DQ, VL), AVX2 and portable builds give the same bits. Every set this CPU has is compared with the
portable build, bit for bit: the reproducible Gaussian noise (Philox + Box-Muller: the AVX-512 path
of csrc/cpu/noise_avx512.h, eight blocks per vector; AVX2; portable) on float32/float64/16-bit
tensors, sizes around the vector groups, counters that cross 2^32, plain and fused with each
scaling (divide, power-of-two reciprocal), 1 and 2 threads; and clip_and_accumulate /
weighted_aggregate (flat, per-layer, automatic, the one-pass kernel) over widths that cross the
16-float vectors and the 4096-element chunks (their AVX-512 loops switched by
_C._set_clip_avx512). PPML_FAST_CPU_ISA selects the set for a process
(checked in a child process), a value naming no set is ignored with a warning, and the switch
_C._set_cpu_isa refuses unknown names. On a CPU without AVX-512 the comparisons cover the sets
it has (AVX2 and portable)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from ppml_fast import _C
from ppml_fast.ops import (
    add_gaussian_noise_,
    clip_and_accumulate,
    noisy_scale_,
    weighted_aggregate,
)

ORDER = ("portable", "avx2", "avx512")
AVAILABLE = _C._cpu_isa_available()
# the sets of this CPU, best first; the portable build last (the reference)
ISAS = [isa for isa in reversed(ORDER) if ORDER.index(isa) <= ORDER.index(AVAILABLE)]

INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@pytest.fixture(autouse=True)
def restore():
    """Each test sets the instruction set and threads it needs; put back what was there."""
    previous = _C._set_cpu_isa("auto")
    simd = (_C._set_clip_simd(True), _C._set_noise_simd(True))
    clip_avx512 = _C._set_clip_avx512(False)
    threads = torch.get_num_threads()
    yield
    _C._set_clip_avx512(clip_avx512)
    _C._set_cpu_isa(previous)
    _C._set_clip_simd(simd[0])
    _C._set_noise_simd(simd[1])
    torch.set_num_threads(threads)


def test_switch_caps_at_the_cpu_and_returns_the_previous_set():
    assert AVAILABLE in ORDER
    assert _C._cpu_isa() == AVAILABLE  # the fixture set "auto"
    assert _C._set_cpu_isa("portable") == AVAILABLE
    assert _C._cpu_isa() == "portable"
    assert _C._set_cpu_isa("AVX512") == "portable"  # case-insensitive, capped by the CPU
    assert _C._cpu_isa() == AVAILABLE
    with pytest.raises(ValueError, match="isa must be one of .*got 'sse9'"):
        _C._set_cpu_isa("sse9")
    assert _C._cpu_isa() == AVAILABLE  # unchanged by the refused call


def _noise(isa, sizes, dtype, offset, denominator, threads):
    _C._set_cpu_isa(isa)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(sum(sizes) + offset % 997)
    xs = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    seed = 2**64 - 3 - offset % 2**40
    if denominator is None:
        nxt = add_gaussian_noise_(xs, 1.7, seed=seed, offset=offset)
    else:
        nxt = noisy_scale_(xs, 0.9, denominator, seed=seed, offset=offset)
    return nxt, [x.view(INT_VIEW[dtype]).clone() for x in xs]


# the AVX-512 group is 40 blocks (80 elements), the AVX2 group 20 (40)
NOISE_SIZES = {
    "groups": [1, 2, 3, 15, 16, 17, 39, 40, 41, 79, 80, 81, 159, 160, 161, 241, 1001],
    "1e6": [1_000_003],
    "with_empty": [0, 81, 0, 8161, 12_345],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes", NOISE_SIZES.values(), ids=NOISE_SIZES.keys())
@pytest.mark.parametrize("denominator", [None, 37.0, 256.0], ids=["add", "divide", "reciprocal"])
def test_noise_is_bit_identical_on_every_instruction_set(dtype, sizes, denominator):
    for offset in (0, 5, 2**32 - 7):
        for threads in (1, 2):
            got = {isa: _noise(isa, sizes, dtype, offset, denominator, threads) for isa in ISAS}
            ref = got["portable"]
            for isa in ISAS[:-1]:
                assert got[isa][0] == ref[0]
                for a, b in zip(got[isa][1], ref[1]):
                    assert torch.equal(a, b), (isa, dtype, sizes, offset, denominator, threads)


def _clip_outputs(isa, grads, clipping, threads, weights=None, clip_norm=None):
    _C._set_cpu_isa(isa)
    _C._set_clip_avx512(isa == "avx512")
    torch.set_num_threads(threads)
    if weights is not None:
        return list(weighted_aggregate(grads, weights, clip_norm=clip_norm))
    max_norm = [0.7 + 0.1 * i for i in range(len(grads))] if clipping == "per_layer" else 1.3
    sums, norms = clip_and_accumulate(grads, max_norm, clipping=clipping)
    return list(sums) + [norms]


def _assert_same_bits(got, what):
    ref = got["portable"]
    for isa in ISAS[:-1]:
        assert len(got[isa]) == len(ref)
        for a, b in zip(got[isa], ref):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])), (isa, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
def test_clipping_is_bit_identical_on_every_instruction_set(dtype, clipping):
    gen = torch.Generator().manual_seed(11)
    widths = [1, 15, 16, 17, 33, 4095, 4097, 9001]
    grads = [
        (torch.randn(37, w, generator=gen, dtype=torch.float64)
         * (10.0 ** (torch.rand(37, 1, generator=gen, dtype=torch.float64) * 4 - 2))).to(dtype)
        for w in widths
    ]
    for threads in (1, 2):
        got = {isa: _clip_outputs(isa, grads, clipping, threads) for isa in ISAS}
        _assert_same_bits(got, (dtype, clipping, threads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clip_norm", [None, 2.0], ids=["one_pass", "clipped"])
def test_aggregation_is_bit_identical_on_every_instruction_set(dtype, clip_norm):
    gen = torch.Generator().manual_seed(12)
    for width in (17, 4097, 20_011):
        updates = torch.randn(13, width, generator=gen, dtype=torch.float64).to(dtype)
        weights = torch.rand(13, generator=gen, dtype=torch.float64) + 0.25
        for threads in (1, 2):
            got = {isa: _clip_outputs(isa, [updates], "flat", threads, weights, clip_norm)
                   for isa in ISAS}
            _assert_same_bits(got, (dtype, width, clip_norm, threads))


CHILD = (
    "import hashlib, torch\n"
    "from ppml_fast import _C\n"
    "from ppml_fast.ops import add_gaussian_noise_, clip_and_accumulate\n"
    "print(_C._cpu_isa())\n"
    "x = torch.zeros(100_003)\n"
    "add_gaussian_noise_([x], 1.5, seed=2**64 - 5, offset=2**32 - 3)\n"
    "g = torch.linspace(-3.0, 5.0, 37 * 9001).reshape(37, 9001)\n"
    "sums, norms = clip_and_accumulate([g], 2.0)\n"
    "print(hashlib.sha256(x.numpy().tobytes() + sums[0].numpy().tobytes()"
    " + norms.numpy().tobytes()).hexdigest())\n"
)


def _child(value):
    env = dict(os.environ, PPML_FAST_CPU_ISA=value)
    env.pop("PPML_FAST_DISABLE_AVX2", None)
    return subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          check=True, env=env, timeout=120)


def _digest_here():
    x = torch.zeros(100_003)
    add_gaussian_noise_([x], 1.5, seed=2**64 - 5, offset=2**32 - 3)
    g = torch.linspace(-3.0, 5.0, 37 * 9001).reshape(37, 9001)
    sums, norms = clip_and_accumulate([g], 2.0)
    return hashlib.sha256(x.numpy().tobytes() + sums[0].numpy().tobytes()
                          + norms.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("value", ["avx2", "portable", "avx512", "auto"])
def test_environment_variable_selects_the_instruction_set(value):
    out = _child(value).stdout.split()
    expected = AVAILABLE if value in ("auto", "avx512") else value
    if ORDER.index(expected) > ORDER.index(AVAILABLE):
        expected = AVAILABLE
    assert out[0] == expected
    assert out[1] == _digest_here()  # the same bits as this process's best set


def test_environment_variable_naming_no_set_is_ignored_with_a_warning():
    done = _child("avx1024")
    assert done.stdout.split()[0] == AVAILABLE
    assert "RuntimeWarning" in done.stderr and "PPML_FAST_CPU_ISA" in done.stderr
    assert "avx1024" in done.stderr

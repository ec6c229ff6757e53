"""The AVX2 path of the reproducible CPU noise (csrc/cpu/noise_avx2.h) gives the same bits as the
portable path (Philox and Box-Muller of csrc/include/ppml, one block at a time), on ~1e6
elements, offsets that cross 32-bit counter boundaries, odd sizes and sizes around the vector
group (20 blocks), float32/float64 and the 16-bit types (whose vector updates need F16C: compared
with F16C, without it, and with every 16-bit pattern as data), plain and fused (noisy_scale_), 1 and 2
threads; and PPML_FAST_DISABLE_AVX2=1 still selects the portable path."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from ppml_fast import _C
from ppml_fast.ops import add_gaussian_noise_, noisy_scale_


def _simd_available() -> bool:
    previous = _C._set_noise_simd(True)
    available = _C._set_noise_simd(previous)  # True only where the CPU has AVX2
    return bool(available)


def _f16c_available() -> bool:
    previous = _C._set_noise_f16c(True)
    return bool(_C._set_noise_f16c(previous))  # True only where the CPU has AVX2 and F16C


pytestmark = pytest.mark.skipif(not _simd_available(), reason="no AVX2 path on this CPU")
f16c_only = pytest.mark.skipif(not _f16c_available(), reason="no AVX2 + F16C on this CPU")

# (AVX2 switch, F16C switch) of the 16-bit comparisons, the portable path last
PATHS_16 = [(True, True), (True, False), (False, True)]

INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}

SIZES = [
    [1_000_003],
    # odd sizes, and sizes around the 20-block (40-element) vector group
    [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 39, 40, 41, 79, 80, 81, 127, 1001],
    # M1's parameters (an MLP of 535,818 parameters)
    [512 * 784, 512, 256 * 512, 256, 2570, 10],
    [0, 31, 0, 64, 12_345],
]
OFFSETS = [0, 1, 7, 2**32 - 5, 2**62 + 3]


@pytest.fixture
def restore():
    previous = _C._set_noise_simd(True)
    previous_f16c = _C._set_noise_f16c(True)
    threads = torch.get_num_threads()
    yield
    _C._set_noise_simd(previous)
    _C._set_noise_f16c(previous_f16c)
    torch.set_num_threads(threads)


def _run(sizes, dtype, offset, fused, simd, threads):
    _C._set_noise_simd(simd)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(sum(sizes) + offset % 1000)
    xs = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes]
    seed = 2**64 - 1 - offset % 2**40
    if fused:
        nxt = noisy_scale_(xs, 0.73, 37.0, seed=seed, offset=offset)
    else:
        nxt = add_gaussian_noise_(xs, 1.3, seed=seed, offset=offset)
    return nxt, [x.view(INT_VIEW[dtype]) for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", SIZES, ids=["1e6", "small", "m1", "with_empty"])
@pytest.mark.parametrize("fused", [False, True], ids=["add", "noisy_scale"])
def test_avx2_path_equals_portable_path(restore, dtype, sizes, fused):
    for offset in OFFSETS:
        for threads in (1, 2):
            n_simd, simd = _run(sizes, dtype, offset, fused, True, threads)
            n_port, port = _run(sizes, dtype, offset, fused, False, threads)
            assert n_simd == n_port
            for a, b in zip(simd, port):
                assert torch.equal(a, b), (dtype, sizes, offset, fused, threads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes", SIZES, ids=["1e6", "small", "m1", "with_empty"])
@pytest.mark.parametrize("fused", [False, True], ids=["add", "noisy_scale"])
def test_avx2_path_equals_portable_path_16_bit(restore, dtype, sizes, fused):
    for offset in (0, 7, 2**32 - 5):
        for threads in (1, 2):
            got = []
            for simd, f16c in PATHS_16:
                _C._set_noise_f16c(f16c)
                got.append(_run(sizes, dtype, offset, fused, simd, threads))
            for n, xs in got[:-1]:
                assert n == got[-1][0]
                for a, b in zip(xs, got[-1][1]):
                    assert torch.equal(a, b), (dtype, sizes, offset, fused, threads)


@f16c_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("std", [1e-300, 1e-3, 1.3, 7e4])
@pytest.mark.parametrize("denominator", [None, 3.0, 256.0, 2.0**-20, 2.0**30, 1e-30],
                         ids=lambda d: "add" if d is None else float(d).hex())
def test_every_16_bit_pattern_gives_the_same_bits_on_every_path(restore, dtype, std, denominator):
    # Every float16 / bfloat16 pattern as data (NaNs of every payload, signalling ones,
    # infinities, subnormals, the largest values): the vector update (load, x + std * z in
    # double, the scaling, rounding through float) against the element-by-element AVX2 update
    # and the portable path. std 1e-300 stores each value divided (rounding of results in the
    # subnormal range, overflow to infinity with the tiny denominators), 7e4 overflows float16.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    perm = torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(5))
    for data in (bits, bits[perm]):
        for threads in (1, 2):
            got = []
            for simd, f16c in PATHS_16:
                _C._set_noise_simd(simd)
                _C._set_noise_f16c(f16c)
                torch.set_num_threads(threads)
                xs = [data[:40_001].clone().view(dtype), data[40_001:].clone().view(dtype)]
                if denominator is None:
                    add_gaussian_noise_(xs, std, seed=2**63 + 5, offset=2**32 - 9)
                else:
                    noisy_scale_(xs, std, denominator, seed=2**63 + 5, offset=2**32 - 9)
                got.append([x.view(torch.int16) for x in xs])
            for path, xs in zip(PATHS_16, got[:-1]):
                for a, b in zip(xs, got[-1]):
                    assert torch.equal(a, b), (dtype, std, denominator, threads, path)


# Powers of two take the AVX2 path's multiplication by the exact reciprocal instead of the
# division (csrc/cpu/noise_avx2.h, Scale): results that overflow, are subnormal in float64 or in
# float32, and a denominator whose reciprocal is not finite (2^-1074: division kept); beside them
# values that are not powers of two.
DENOMINATORS = [256.0, 1.0, 0.5, 2.0**-1022, 2.0**-1000, 2.0**60, 2.0**140, 2.0**1023, 2.0**-1074,
                256.0 + 2.0**-44, 3.0 * 2.0**-1030]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("denominator", DENOMINATORS, ids=lambda d: float(d).hex())
def test_power_of_two_denominators_equal_the_portable_division(restore, dtype, denominator):
    sizes = [1001, 80, 3]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-310, -3e38],
                           dtype=torch.float64)
    for offset in (0, 2**32 - 5):
        for threads in (1, 2):
            got = []
            for simd in (True, False):
                _C._set_noise_simd(simd)
                torch.set_num_threads(threads)
                gen = torch.Generator().manual_seed(offset % 1000 + 3)
                xs = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
                xs[0][: special.numel()] = special
                xs[1] *= 1e-300  # tiny inputs: subnormal float64 results for large denominators
                xs = [x.to(dtype) for x in xs]
                noisy_scale_(xs, 0.73, denominator, seed=2**63 + 11, offset=offset)
                got.append([x.view(INT_VIEW[dtype]) for x in xs])
            for a, b in zip(*got):
                assert torch.equal(a, b), (dtype, denominator, offset, threads)


@f16c_only
def test_disable_f16c_environment_variable_keeps_16_bit_updates_element_by_element(restore):
    code = (
        "import hashlib, torch\n"
        "from ppml_fast import _C\n"
        "from ppml_fast.ops import noisy_scale_\n"
        "print(_C._set_noise_f16c(False), _C._set_noise_simd(True))\n"
        "x = torch.zeros(100_001, dtype=torch.float16)\n"
        "y = torch.zeros(999, dtype=torch.bfloat16)\n"
        "noisy_scale_([x, y], 1.5, 3.0, seed=2**64 - 5, offset=2**32 - 3)\n"
        "print(hashlib.sha256(x.view(torch.int16).numpy().tobytes()"
        " + y.view(torch.int16).numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, PPML_FAST_DISABLE_F16C="1")
    env.pop("PPML_FAST_DISABLE_AVX2", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
        timeout=120,
    ).stdout.split()
    assert out[:2] == ["False", "True"]
    _C._set_noise_simd(True)
    _C._set_noise_f16c(True)
    x = torch.zeros(100_001, dtype=torch.float16)
    y = torch.zeros(999, dtype=torch.bfloat16)
    noisy_scale_([x, y], 1.5, 3.0, seed=2**64 - 5, offset=2**32 - 3)
    assert out[2] == hashlib.sha256(
        x.view(torch.int16).numpy().tobytes() + y.view(torch.int16).numpy().tobytes()
    ).hexdigest()


def test_disable_avx2_environment_variable_selects_the_portable_path(restore):
    code = (
        "import hashlib, torch\n"
        "from ppml_fast import _C\n"
        "from ppml_fast.ops import add_gaussian_noise_\n"
        "print(_C._set_noise_simd(False))\n"  # the setting the environment chose
        "x = torch.zeros(1_000_001, dtype=torch.float32)\n"
        "y = torch.zeros(999, dtype=torch.float64)\n"
        "add_gaussian_noise_([x, y], 1.5, seed=2**64 - 5, offset=2**32 - 3)\n"
        "print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, PPML_FAST_DISABLE_AVX2="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
        timeout=120,
    ).stdout.split()
    assert out[0] == "False"
    # the same numbers from the AVX2 path in this process
    _C._set_noise_simd(True)
    x = torch.zeros(1_000_001, dtype=torch.float32)
    y = torch.zeros(999, dtype=torch.float64)
    add_gaussian_noise_([x, y], 1.5, seed=2**64 - 5, offset=2**32 - 3)
    assert out[1] == hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()

"""The AVX2 and the portable builds of the CPU clipping / aggregation loops (csrc/cpu/row_loops.h)
give the same bits: clip_and_accumulate (flat, per-layer, automatic; two-pass kernel) and
weighted_aggregate (one-pass kernel without clip_norm, two-pass with it) over random shapes
that cross the 4096-element column chunks and the vector tails, float32/float64/bfloat16/float16,
B = 0, non-finite samples, 1 and 2 threads; for float16 also the F16C build of the loops and the
AVX2 build without it, including every float16 bit pattern (NaN payloads, signalling NaNs,
subnormals, infinities) as data. PPML_FAST_DISABLE_AVX2=1 starts the process on the portable
build, PPML_FAST_DISABLE_F16C=1 on the AVX2 build without F16C, and the library holds no GNU
IFUNC (target_clones) symbol or relocation."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml_fast import _C
from ppml_fast.ops import CLIPPING_MODES, clip_and_accumulate, weighted_aggregate

from ._util import DTYPES


def _simd_available() -> bool:
    previous = _C._set_clip_simd(True)
    available = _C._set_clip_simd(previous)  # True only where the CPU has AVX2
    return bool(available)


def _f16c_available() -> bool:
    previous = _C._set_clip_f16c(True)
    available = _C._set_clip_f16c(previous)  # True only where the CPU has AVX2 and F16C
    return bool(available)


simd_only = pytest.mark.skipif(not _simd_available(), reason="no AVX2 build on this CPU")
f16c_only = pytest.mark.skipif(not _f16c_available(), reason="no AVX2 + F16C on this CPU")

# (AVX2 switch, F16C switch) of the builds compared, the portable one last: the F16C switch only
# matters for float16 while the AVX2 switch is on
BUILDS_16 = [(True, True), (True, False), (False, True)]
BUILDS = [(True, True), (False, True)]


def _builds(dtype):
    return BUILDS_16 if dtype == torch.float16 else BUILDS


def _set_build(build) -> None:
    _C._set_clip_simd(build[0])
    _C._set_clip_f16c(build[1])

INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@pytest.fixture(scope="module", autouse=True)
def restore():
    """Every test sets the switch and the thread count it needs; the module restores both."""
    previous = _C._set_clip_simd(True)
    previous_f16c = _C._set_clip_f16c(True)
    threads = torch.get_num_threads()
    yield
    _C._set_clip_simd(previous)
    _C._set_clip_f16c(previous_f16c)
    torch.set_num_threads(threads)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def _assert_same_bits(a: list[torch.Tensor], b: list[torch.Tensor], what) -> None:
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(_bits(x), _bits(y)), (what, k)


def _data(batch, widths, dtype, magnitude, bad, seed):
    """(batch, width) tensors of dtype with row norms spread around 1 (times `magnitude`), a few
    exact-zero rows, and, with `bad`, a NaN and an inf in two samples."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (torch.rand(batch, 1, generator=gen, dtype=torch.float64) * 4.0 - 2.5)
    scale[torch.rand(batch, generator=gen) < 0.1] = 0.0
    total = max(1, sum(widths))
    grads = []
    for w in widths:
        g = torch.randn(batch, w, generator=gen, dtype=torch.float64) * scale / total**0.5
        grads.append((g * magnitude).to(dtype))
    if bad and batch >= 2 and grads[-1].shape[1] > 0:
        grads[-1][0, -1] = float("nan")
        grads[-1][batch - 1, 0] = float("inf")
    return grads


def _clip_builds(grads, max_norm, clipping, threads):
    """Sums and norms from each build of _builds(dtype), the portable one last."""
    out = []
    for build in _builds(grads[0].dtype):
        _set_build(build)
        torch.set_num_threads(threads)
        sums, norms = clip_and_accumulate(grads, max_norm, clipping=clipping)
        out.append(list(sums) + [norms])
    return out


def _assert_builds_equal(results, what, any_nan=False) -> None:
    """Every build's outputs equal the portable build's (the last) bit for bit; with any_nan,
    NaNs compare as NaNs only (see test_every_float16_pattern_gives_the_same_bits_in_every_build)."""
    for k, r in enumerate(results[:-1]):
        if not any_nan:
            _assert_same_bits(r, results[-1], (what, k))
            continue
        for j, (x, y) in enumerate(zip(r, results[-1])):
            assert torch.equal(torch.isnan(x), torch.isnan(y)), (what, k, j)
            keep = ~torch.isnan(x)
            assert torch.equal(_bits(x[keep]), _bits(y[keep])), (what, k, j)


# widths around the vector lengths (4, 8, 32 and 4 * 32 elements) and the 4096-element chunks
WIDTHS = st.one_of(
    st.integers(0, 300),
    st.sampled_from([1, 3, 4, 7, 8, 31, 32, 33, 127, 128, 129, 4095, 4096, 4097, 8191, 12_289]),
)


@simd_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=40)
@given(
    batch=st.one_of(st.sampled_from([0, 1, 2, 5]), st.integers(0, 40)),
    widths=st.lists(WIDTHS, min_size=1, max_size=4),
    clipping=st.sampled_from(CLIPPING_MODES),
    magnitude=st.sampled_from([1.0, 1e-30, 1e20]),
    bad=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_clip_avx2_build_equals_portable_build(
    dtype, batch, widths, clipping, magnitude, bad, threads, seed
):
    grads = _data(batch, widths, dtype, magnitude, bad, seed)
    results = _clip_builds(grads, 0.7, clipping, threads)
    _assert_builds_equal(results, (dtype, batch, widths, clipping, magnitude, bad, threads))


@simd_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_clip_large_rows_many_chunks(dtype, clipping):
    # a block of rows large enough for 2 threads and several column chunks per thread
    grads = _data(48, [70_001, 4096, 3], dtype, 1.0, True, seed=11)
    for threads in (1, 2):
        _assert_builds_equal(_clip_builds(grads, 1.0, clipping, threads), (dtype, clipping, threads))


@simd_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=25)
@given(
    k=st.one_of(st.sampled_from([1, 4, 5]), st.integers(1, 30)),
    p=st.one_of(st.integers(1, 300), st.sampled_from([4095, 4097, 20_011])),
    clip_norm=st.sampled_from([None, 0.5]),
    form=st.sampled_from(["matrix", "list"]),
    magnitude=st.sampled_from([1.0, 1e20]),
    bad=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_aggregate_avx2_build_equals_portable_build(
    dtype, k, p, clip_norm, form, magnitude, bad, threads, seed
):
    (u,) = _data(k, [p], dtype, magnitude, bad, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    if k > 1:
        w[0] = 0.0  # a zero weight: the one-pass kernel skips the row
    updates = u if form == "matrix" else list(u.unbind(0))
    out = []
    for build in _builds(dtype):
        _set_build(build)
        torch.set_num_threads(threads)
        agg, norms = weighted_aggregate(updates, w, clip_norm=clip_norm)
        out.append([agg, norms])
    _assert_builds_equal(out, (dtype, k, p, clip_norm, form, magnitude, bad, threads))


def _all_half_patterns(seed):
    """The 65,536 float16 bit patterns, in order (seed None) or shuffled."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    if seed is not None:
        bits = bits[torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(seed))]
    return bits.view(torch.float16)


@f16c_only
@pytest.mark.parametrize("shape", [(512, 128), (2048, 32), (128, 512), (4, 16384), (1, 65536),
                                   (5, 13107)], ids=str)
@pytest.mark.parametrize("order", [None, 1, 2], ids=["sorted", "shuffled1", "shuffled2"])
def test_every_float16_pattern_gives_the_same_bits_in_every_build(shape, order):
    # Every float16 pattern as data, in rows whose widths hit the 8-element vectors, the
    # 32 / 128-element steps of the one-pass sums of squares and their tails: norms of rows with
    # NaNs, infinities, subnormals and the largest finite values, clipped sums of the finite
    # rows, weighted sums. A row here holds NaNs of many payloads: which payload a sum of two
    # NaNs keeps is the order of the operands of one addition (x86 returns the first), which
    # C++ leaves to the compiler (the AVX2 and the portable builds of one source already differ
    # there), so NaN outputs compare as NaN here; test_float16_nan_payloads_are_kept checks the
    # payloads of rows with one NaN each.
    flat = _all_half_patterns(order)
    n = shape[0] * shape[1]
    g = flat[:n].reshape(shape).clone()
    layers = [g[:, : shape[1] // 3].contiguous(), g[:, shape[1] // 3 :].contiguous()]
    for threads in (1, 2):
        for clipping in CLIPPING_MODES:
            for grads in ([g], layers):
                for max_norm in (1e-3, 1e30):
                    results = _clip_builds(grads, max_norm, clipping, threads)
                    _assert_builds_equal(results, (shape, order, threads, clipping, max_norm),
                                         any_nan=True)
        w = torch.linspace(0.25, 2.0, shape[0], dtype=torch.float64)
        for clip_norm in (None, 3.0):
            out = []
            for build in BUILDS_16:
                _set_build(build)
                torch.set_num_threads(threads)
                out.append(list(weighted_aggregate(g, w, clip_norm=clip_norm)))
            _assert_builds_equal(out, (shape, order, threads, clip_norm), any_nan=True)


@f16c_only
@pytest.mark.parametrize("width", [1, 8, 33, 128, 4097], ids=str)
def test_float16_nan_payloads_are_kept(width):
    # One NaN per row, every one of the 2,046 float16 NaN patterns (signalling and quiet, both
    # signs), among finite values: each build gives the same bits as the portable one, and the
    # norm is that NaN, quieted, payload and sign kept (the F16C conversion quiets signalling
    # NaNs earlier than the portable code does, which changes no result). Also the finite rows'
    # sums and the weighted sums (rows with a NaN are dropped).
    nan_bits = [p for p in range(2**16) if (p & 0x7C00) == 0x7C00 and (p & 0x3FF)]
    gen = torch.Generator().manual_seed(width)
    g = (torch.randn(len(nan_bits) + 7, width, generator=gen) * 0.1).to(torch.float16)
    g = g.view(torch.int16)
    cols = torch.randint(0, width, (len(nan_bits),), generator=gen)
    for b, (p, c) in enumerate(zip(nan_bits, cols.tolist())):
        g[b, c] = p - 2**16 if p >= 2**15 else p
    g = g.view(torch.float16)
    want = [(p >> 15 << 63) | 0x7FF0000000000000 | (((p & 0x3FF) | 0x200) << 42) for p in nan_bits]
    for threads in (1, 2):
        for clipping in CLIPPING_MODES:
            results = _clip_builds([g], 0.5, clipping, threads)
            _assert_builds_equal(results, (width, threads, clipping))
            norms = results[-1][-1].reshape(-1)[: len(nan_bits)].view(torch.int64)
            assert [n % 2**64 for n in norms.tolist()] == want
        out = []
        for build in BUILDS_16:
            _set_build(build)
            torch.set_num_threads(threads)
            out.append(list(weighted_aggregate(g, torch.ones(g.shape[0], dtype=torch.float64))))
        _assert_builds_equal(out, (width, threads, "aggregate"))


@f16c_only
def test_disable_f16c_environment_variable_selects_the_avx2_build_without_f16c():
    code = (
        "import hashlib, torch\n"
        "from ppml_fast import _C\n"
        "from ppml_fast.ops import clip_and_accumulate\n"
        "print(_C._set_clip_f16c(False), _C._set_clip_simd(True))\n"
        "g = torch.linspace(-3.0, 5.0, 37 * 9001).reshape(37, 9001).to(torch.float16)\n"
        "sums, norms = clip_and_accumulate([g], 2.0)\n"
        "print(hashlib.sha256(sums[0].numpy().tobytes() + norms.numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, PPML_FAST_DISABLE_F16C="1")
    env.pop("PPML_FAST_DISABLE_AVX2", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
        timeout=120,
    ).stdout.split()
    assert out[:2] == ["False", "True"]
    _set_build((True, True))
    g = torch.linspace(-3.0, 5.0, 37 * 9001).reshape(37, 9001).to(torch.float16)
    sums, norms = clip_and_accumulate([g], 2.0)
    assert out[2] == hashlib.sha256(sums[0].numpy().tobytes() + norms.numpy().tobytes()).hexdigest()


@simd_only
def test_disable_avx2_environment_variable_selects_the_portable_build():
    code = (
        "import hashlib, torch\n"
        "from ppml_fast import _C\n"
        "from ppml_fast.ops import clip_and_accumulate\n"
        "print(_C._set_clip_simd(False))\n"  # the setting the environment chose
        "g = torch.linspace(-3.0, 5.0, 37 * 9001).reshape(37, 9001)\n"
        "sums, norms = clip_and_accumulate([g], 2.0)\n"
        "print(hashlib.sha256(sums[0].numpy().tobytes() + norms.numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, PPML_FAST_DISABLE_AVX2="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
        timeout=120,
    ).stdout.split()
    assert out[0] == "False"
    _C._set_clip_simd(True)
    g = torch.linspace(-3.0, 5.0, 37 * 9001).reshape(37, 9001)
    sums, norms = clip_and_accumulate([g], 2.0)
    assert out[1] == hashlib.sha256(sums[0].numpy().tobytes() + norms.numpy().tobytes()).hexdigest()


def _elf_ifuncs(path: str) -> list[str]:
    """GNU IFUNC symbols (STT_GNU_IFUNC) and IRELATIVE relocations of an x86-64 ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    found = []
    for i in range(shnum):
        _, sh_type, _, _, off, size, _, _, _, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize
        )
        if sh_type in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM: st_info & 0xf == 10 is STT_GNU_IFUNC
            for e in range(off, off + size, entsize):
                if data[e + 4] & 0xF == 10:
                    found.append(f"IFUNC symbol at {e:#x}")
        elif sh_type == 4:  # SHT_RELA: type 37 is R_X86_64_IRELATIVE
            for e in range(off, off + size, entsize):
                (info,) = struct.unpack_from("<Q", data, e + 8)
                if info & 0xFFFFFFFF == 37:
                    found.append(f"IRELATIVE relocation at {e:#x}")
    return found


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"),
    reason="the ELF check is written for x86-64 Linux",
)
def test_library_has_no_ifunc():
    # target_clones makes IFUNC resolvers, the main suspect of a crash of the clipping kernel on
    # a g++ 13 / AVX-512 host; every AVX2 path is chosen at run time instead (csrc/cpu/target.h)
    assert _elf_ifuncs(_C.__file__) == []

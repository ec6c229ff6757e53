"""secagg_mask_: the native ChaCha20 mask kernel against the numpy reference, bit for bit
(lengths around the 16-word block and the 4096-word chunk, many seeds, both signs, any thread
count), RFC 8439 known answers, opcheck, argument errors, and CPU = CUDA where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppml_fast import _C
from ppml_fast.ops import cuda_available, secagg_mask_
from ppml_fast.ops._secagg_reference import chacha20_blocks, secagg_keystream, secagg_mask_reference

LENGTHS = [1, 15, 16, 17, 127, 128, 129, 4095, 4096, 4097, 3 * 4096 + 5, 70_001]


def _seeds(rng: np.random.Generator, count: int) -> list[bytes]:
    return [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(count)]


def _ring(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)


# RFC 8439 Appendix A.1, test vectors 1 and 2: the all-zero key and nonce, block counters 0 and 1
# (the first two blocks of the mask stream of the all-zero seed).
RFC_A1_BLOCK0 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")
RFC_A1_BLOCK1 = bytes.fromhex(
    "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
    "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f")


def test_zero_seed_stream_is_rfc8439_appendix_a1():
    expected = np.frombuffer(RFC_A1_BLOCK0 + RFC_A1_BLOCK1, dtype="<u4")
    assert np.array_equal(secagg_keystream(bytes(32), 32), expected)
    x = torch.zeros(32, dtype=torch.int32)
    secagg_mask_(x, [bytes(32)], [1])
    assert np.array_equal(x.numpy().view(np.uint32), expected)


def test_reference_blocks_equal_native_block_function():
    rng = np.random.default_rng(3)
    for _ in range(5):
        key = rng.integers(0, 2**32, 8, dtype=np.uint64).astype(np.uint32)
        counters = rng.integers(0, 2**32, 4, dtype=np.uint64).astype(np.uint32)
        blocks = chacha20_blocks(key, counters)
        for c, block in zip(counters, blocks):
            assert list(block) == _C.chacha20_block([int(k) for k in key], [0, 0, 0], int(c))


@pytest.mark.parametrize("n", LENGTHS)
def test_native_equals_reference(n):
    rng = np.random.default_rng(n)
    count = int(rng.integers(1, 12))
    seeds = _seeds(rng, count)
    signs = [int(s) for s in rng.choice([-1, 1], count)]
    x0 = _ring(rng, n)
    x = torch.from_numpy(x0.view(np.int32).copy())
    assert secagg_mask_(x, seeds, signs) is x
    assert np.array_equal(x.numpy().view(np.uint32), secagg_mask_reference(x0, seeds, signs))


@pytest.mark.parametrize("threads", [1, 2])
def test_many_seeds_and_thread_counts(threads, restore_threads):
    torch.set_num_threads(threads)
    rng = np.random.default_rng(11)
    n, count = 2 * 4096 + 33, 150
    seeds = _seeds(rng, count)
    signs = [int(s) for s in rng.choice([-1, 1], count)]
    x0 = _ring(rng, n)
    x = torch.from_numpy(x0.view(np.int32).copy())
    secagg_mask_(x, torch.from_numpy(np.frombuffer(b"".join(seeds), np.uint8).reshape(count, 32).copy()),
                 torch.tensor(signs, dtype=torch.int8))
    assert np.array_equal(x.numpy().view(np.uint32), secagg_mask_reference(x0, seeds, signs))


def test_portable_path_equals_reference():
    # the CPU kernel without AVX2 (byte-shuffle rotations off): the same words
    previous = _C._set_secagg_simd(False)
    try:
        rng = np.random.default_rng(12)
        n, count = 4096 + 77, 9
        seeds = _seeds(rng, count)
        signs = [int(s) for s in rng.choice([-1, 1], count)]
        x0 = _ring(rng, n)
        x = torch.from_numpy(x0.view(np.int32).copy())
        secagg_mask_(x, seeds, signs)
        assert np.array_equal(x.numpy().view(np.uint32), secagg_mask_reference(x0, seeds, signs))
    finally:
        _C._set_secagg_simd(previous)


def test_uint32_tensor_and_cancellation():
    rng = np.random.default_rng(5)
    seeds = _seeds(rng, 3)
    x0 = _ring(rng, 1000)
    x = torch.from_numpy(x0.copy())  # torch.uint32
    assert x.dtype == torch.uint32
    secagg_mask_(x, seeds, [1, 1, -1])
    assert not np.array_equal(x.numpy(), x0)
    secagg_mask_(x, seeds, [-1, -1, 1])  # the same masks with opposite signs cancel exactly
    assert np.array_equal(x.numpy(), x0)
    # a pair of clients' copies of one pairwise mask cancel in their sum
    a, b = torch.zeros(77, dtype=torch.int32), torch.zeros(77, dtype=torch.int32)
    secagg_mask_(a, seeds[:1], [1])
    secagg_mask_(b, seeds[:1], [-1])
    assert torch.equal(a + b, torch.zeros(77, dtype=torch.int32))


def test_empty_inputs_are_no_ops():
    x = torch.zeros(0, dtype=torch.int32)
    secagg_mask_(x, [bytes(32)], [1])
    y = torch.arange(5, dtype=torch.int32)
    secagg_mask_(y, [], [])
    assert torch.equal(y, torch.arange(5, dtype=torch.int32))


def test_opcheck():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(_ring(rng, 40).view(np.int32).copy())
    seeds = torch.from_numpy(rng.integers(0, 256, (3, 32), dtype=np.uint8))
    signs = torch.tensor([1, -1, 1], dtype=torch.int8)
    torch.library.opcheck(torch.ops.ppml_fast.secagg_mask_.default, (x, seeds, signs))


@pytest.mark.parametrize("x, seeds, signs, error, match", [
    (torch.zeros(4), [bytes(32)], [1], TypeError, "x must have dtype int32 or uint32"),
    (torch.zeros(4, 2, dtype=torch.int32).t(), [bytes(32)], [1], ValueError, "x must be contiguous"),
    ([0, 1], [bytes(32)], [1], TypeError, "x must be a torch.Tensor"),
    (torch.zeros(4, dtype=torch.int32), [bytes(31)], [1], ValueError, r"seeds\[0\] must be 32 bytes"),
    (torch.zeros(4, dtype=torch.int32), bytes(32), [1], TypeError, "seeds must be"),
    (torch.zeros(4, dtype=torch.int32), [bytes(32)], [0], ValueError, r"signs\[0\] must be \+1 or -1"),
    (torch.zeros(4, dtype=torch.int32), [bytes(32)], [1, 1], ValueError, "one sign per seed"),
    (torch.zeros(4, dtype=torch.int32), torch.zeros(2, 16, dtype=torch.uint8), [1, 1], ValueError,
     r"\(S, 32\) uint8"),
    (torch.zeros(4, dtype=torch.int32), [bytes(32)], torch.tensor([2], dtype=torch.int8), ValueError,
     r"signs must each be \+1 or -1"),
])
def test_bad_arguments(x, seeds, signs, error, match):
    before = x.clone() if isinstance(x, torch.Tensor) else None
    with pytest.raises(error, match=match):
        secagg_mask_(x, seeds, signs)
    if before is not None:
        assert torch.equal(x, before)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                    reason="needs a CUDA GPU and a build of ppml_fast with the CUDA kernels")
@pytest.mark.parametrize("n, count", [(1, 1), (17, 3), (4097, 70), (1_000_003, 5)])
def test_cuda_equals_cpu(n, count):
    rng = np.random.default_rng(n)
    seeds = torch.from_numpy(rng.integers(0, 256, (count, 32), dtype=np.uint8))
    signs = torch.from_numpy(rng.choice(np.array([-1, 1], dtype=np.int8), count))
    x = torch.from_numpy(_ring(rng, n).view(np.int32))
    cpu = secagg_mask_(x.clone(), seeds, signs)
    gpu = secagg_mask_(x.cuda(), seeds.cuda(), signs.cuda())
    assert torch.equal(gpu.cpu(), cpu)

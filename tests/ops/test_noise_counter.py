"""Issue 15, item 3: the secure noise stream has 64-bit block indices (ChaCha20 with a fresh
nonce per 2^32 blocks), tested across the 2^32-block boundary on a small buffer; and no noise
offset (Philox or ChaCha20) can wrap: a call whose blocks would pass the limit is refused.

The kernel is called directly (``_C.gaussian_noise``) with chosen key words, so the secure
samples can be compared with a float64 reference: RFC 8439 blocks (ops/_secagg_reference), then
Box-Muller per four words and (z1 + z2 + z3 + z4) / 2 per eight normals (csrc/include/ppml/noise.h).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppml_fast import _C
from ppml_fast.ops import add_gaussian_noise_, noisy_scale_
from ppml_fast.ops import noise as noise_mod
from ppml_fast.ops._native import DTYPE_TAGS, num_threads
from ppml_fast.ops._reference import _box_muller
from ppml_fast.ops._secagg_reference import chacha20_blocks

KEY = [0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C, 0x13121110, 0x17161514, 0x1B1A1918,
       0x1F1E1D1C]
NONCE = [0x09000000, 0x4A000000, 0x00000000]


def _secure_kernel(n: int, offset: int, key=KEY, nonce=NONCE) -> np.ndarray:
    """The N(0, 1) samples the secure kernel adds to n zeros, from stream block ``offset``."""
    x = torch.zeros(n, dtype=torch.float64)
    _C.gaussian_noise(device=-1, stream=0, ptrs=[x.data_ptr()], numels=[n],
                      dtypes=[DTYPE_TAGS[torch.float64]], stddev=1.0, denominator=1.0,
                      divide=False, secure=True, seed=0, offset=offset,
                      key_words=list(key) + list(nonce), num_threads=num_threads())
    return x.numpy().copy()


def _secure_reference(n: int, offset: int) -> np.ndarray:
    """Block b = offset + i // 2: RFC 8439 block with counter b mod 2^32 and nonce word 0 =
    NONCE[0] + b // 2^32 (mod 2^32); eight Box-Muller normals -> two sums of four over 2."""
    blocks = (n + 1) // 2
    out = np.empty(2 * blocks)
    for j in range(blocks):
        b = offset + j
        nonce = [(NONCE[0] + (b >> 32)) % 2**32, NONCE[1], NONCE[2]]
        w = chacha20_blocks(np.array(KEY, dtype=np.uint32), np.array([b % 2**32]), nonce)[0]
        z0, z1 = _box_muller(w.reshape(4, 4))
        normals = np.stack([z0, z1], axis=1).reshape(-1)  # n[0..7] in kernel order
        out[2 * j] = ((normals[0] + normals[1]) + (normals[2] + normals[3])) * 0.5
        out[2 * j + 1] = ((normals[4] + normals[5]) + (normals[6] + normals[7])) * 0.5
    return out[:n]


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 3, 2**33 - 2, 2**63 - 8])
def test_secure_kernel_matches_the_reference_across_the_2_32_block_boundary(offset):
    # 6 blocks from 2^32 - 3 cross the boundary; the old kernel ignored the offset and used a
    # 32-bit counter, so it could not reach block 2^32 (nor draw more than 2^33 samples per call)
    got = _secure_kernel(12, offset)
    np.testing.assert_allclose(got, _secure_reference(12, offset), rtol=1e-12, atol=1e-12)


def test_block_2_32_is_not_block_0():
    # a wrapped 32-bit counter would draw block 0's numbers again at block 2^32
    low = _secure_kernel(4, 0)
    high = _secure_kernel(4, 2**32)
    assert not np.any(low == high)
    # block 2^32 + j is block j under the next nonce (a nonce per 2^32 blocks)
    nxt = _secure_kernel(4, 0, nonce=[NONCE[0] + 1, NONCE[1], NONCE[2]])
    np.testing.assert_array_equal(high, nxt)


def test_a_call_that_would_wrap_the_64_bit_counter_is_refused_by_the_kernel():
    x = torch.zeros(8, dtype=torch.float64)
    for secure in (False, True):
        with pytest.raises(ValueError, match="2\\^64"):
            _C.gaussian_noise(device=-1, stream=0, ptrs=[x.data_ptr()], numels=[8],
                              dtypes=[DTYPE_TAGS[torch.float64]], stddev=1.0, denominator=1.0,
                              divide=False, secure=secure, seed=1, offset=2**64 - 2,
                              key_words=list(KEY) + list(NONCE) if secure else [],
                              num_threads=1)
    assert bool((x == 0).all()), "a refused call touched the tensor"


@pytest.mark.parametrize("secure", [False, True])
def test_offsets_past_2_63_are_refused_before_any_tensor_is_touched(secure):
    x = torch.zeros(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        add_gaussian_noise_(x, 1.0, seed=1, offset=2**63 - 2, secure=secure)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        noisy_scale_(x, 1.0, 2.0, seed=1, offset=2**63 - 3, secure=secure)
    # the optimizer's direct path (run_noise) is checked too: it used to pass any offset on
    with pytest.raises(ValueError, match="2\\*\\*63"):
        noise_mod.run_noise("sums", [x], 1.0, 1.0, True, 1, 2**64 - 2, secure)
    assert bool((x == 0).all())
    # the last valid range is accepted and ends exactly at the limit
    assert add_gaussian_noise_(x, 1.0, seed=1, offset=2**63 - 4, secure=secure) == 2**63


def test_philox_noise_is_unchanged_by_the_counter_change():
    from ppml_fast.ops._reference import gaussian_noise_ref

    x = torch.zeros(9, dtype=torch.float64)
    add_gaussian_noise_(x, 1.0, seed=7, offset=2**32 - 2)
    np.testing.assert_allclose(x.numpy(), gaussian_noise_ref([9], 7, 2**32 - 2)[0], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.skipif(not (torch.cuda.is_available() and _C.cuda_available()),
                    reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("offset", [0, 2**32 - 3, 2**40 + 7])
def test_secure_cuda_kernel_matches_cpu_across_the_boundary(offset):
    # the secure sampler is the same PPML_HD code on both devices (built with --fmad=false)
    x = torch.zeros(4100, dtype=torch.float64, device="cuda")
    _C.gaussian_noise(device=x.device.index or 0, stream=int(torch.cuda.current_stream().cuda_stream),
                      ptrs=[x.data_ptr()], numels=[x.numel()], dtypes=[DTYPE_TAGS[torch.float64]],
                      stddev=1.0, denominator=1.0, divide=False, secure=True, seed=0, offset=offset,
                      key_words=KEY + NONCE, num_threads=1)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(x.cpu().numpy(), _secure_kernel(4100, offset))
    np.testing.assert_allclose(x[:12].cpu().numpy(), _secure_reference(12, offset), rtol=1e-12,
                               atol=1e-12)

"""Plain-numpy reference of ``secagg_mask_``: ChaCha20 (RFC 8439) vectorised over blocks, in
unsigned 32-bit integer arithmetic only (no float anywhere), so the native kernels must match it
bit for bit. Slow (a few MB/s); for tests and small vectors.

The stream (fixed by ``csrc/include/ppml/secagg.h``): the 32-byte seed is the ChaCha20 key (8
little-endian words), the nonce is zero, element i of the mask is word ``i % 16`` of the block
with counter ``i // 16``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_CONSTANTS = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], dtype=np.uint32)


def _rotl(v: np.ndarray, c: int) -> np.ndarray:
    return (v << np.uint32(c)) | (v >> np.uint32(32 - c))


def chacha20_blocks(key_words: np.ndarray, counters: np.ndarray,
                    nonce: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """ChaCha20 blocks (RFC 8439 section 2.3.1) for each 32-bit counter: shape (len, 16) uint32."""
    key_words = np.asarray(key_words, dtype=np.uint32)
    counters = np.asarray(counters, dtype=np.uint32)
    m = counters.shape[0]
    state = np.empty((16, m), dtype=np.uint32)
    state[0:4] = _CONSTANTS[:, None]
    state[4:12] = key_words[:, None]
    state[12] = counters
    state[13:16] = np.asarray(nonce, dtype=np.uint32)[:, None]
    x = state.copy()

    def qr(a: int, b: int, c: int, d: int) -> None:  # the quarter round, RFC 8439 section 2.1
        x[a] += x[b]
        x[d] = _rotl(x[d] ^ x[a], 16)
        x[c] += x[d]
        x[b] = _rotl(x[b] ^ x[c], 12)
        x[a] += x[b]
        x[d] = _rotl(x[d] ^ x[a], 8)
        x[c] += x[d]
        x[b] = _rotl(x[b] ^ x[c], 7)

    for _ in range(10):
        qr(0, 4, 8, 12)
        qr(1, 5, 9, 13)
        qr(2, 6, 10, 14)
        qr(3, 7, 11, 15)
        qr(0, 5, 10, 15)
        qr(1, 6, 11, 12)
        qr(2, 7, 8, 13)
        qr(3, 4, 9, 14)
    return (x + state).T.copy()


def secagg_keystream(seed: bytes, n: int) -> np.ndarray:
    """The first ``n`` words (uint32) of the mask stream of a 32-byte ``seed``."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
        raise ValueError(f"seed must be 32 bytes; got {seed!r}")
    key = np.frombuffer(bytes(seed), dtype="<u4").astype(np.uint32)
    blocks = (int(n) + 15) // 16
    words = chacha20_blocks(key, np.arange(blocks, dtype=np.uint64).astype(np.uint32))
    return words.reshape(-1)[: int(n)]


def secagg_mask_reference(x: np.ndarray, seeds: Sequence[bytes], signs: Sequence[int]) -> np.ndarray:
    """``x + sum_s sign_s * keystream(seed_s)`` mod 2^32, as a new uint32 array (``x``: any
    32-bit integer array, read as uint32)."""
    out = np.asarray(x).view(np.uint32).reshape(-1).copy()
    for seed, sign in zip(seeds, signs):
        ks = secagg_keystream(seed, out.size)
        if sign < 0:
            out -= ks
        else:
            out += ks
    return out

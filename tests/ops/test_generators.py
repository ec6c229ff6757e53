"""The generators and the maths under the noise: Philox4x32-10 and ChaCha20 known-answer
vectors, the numpy Philox reference against the native one, and the accuracy of the
libm-free log and sin/cos that Box-Muller uses (csrc/include/ppml/gaussian.h)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ppml_fast import _C
from ppml_fast.ops._reference import philox4x32_10

mpmath = pytest.importorskip("mpmath")

# Random123 kat_vectors (Salmon et al., SC 2011): philox4x32 with 10 rounds.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF,) * 2,
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr, key, expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(ctr, key, expected):
    assert tuple(_C.philox4x32_10(list(ctr), list(key))) == expected
    assert tuple(int(v) for v in philox4x32_10(np.array(ctr), key)) == expected


def test_philox_reference_equals_native_on_random_inputs():
    rng = np.random.default_rng(2024)
    ctrs = rng.integers(0, 2**32, size=(200, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, size=(200, 2), dtype=np.uint64)
    for ctr, key in zip(ctrs, keys):
        native = _C.philox4x32_10([int(c) for c in ctr], [int(k) for k in key])
        assert list(philox4x32_10(ctr, key)) == native
    # vectorised over a batch of counters with one key
    batch = philox4x32_10(ctrs, keys[0])
    assert batch.shape == (200, 4) and batch.dtype == np.uint32
    assert [int(v) for v in batch[17]] == _C.philox4x32_10([int(c) for c in ctrs[17]],
                                                         [int(k) for k in keys[0]])


# --- ChaCha20 --------------------------------------------------------------------------------

# RFC 8439, section 2.3.2: key 00 01 .. 1f, nonce 00 00 00 09 00 00 00 4a 00 00 00 00, block
# counter 1, as little-endian words; the expected words are "ChaCha state at the end of the
# ChaCha20 operation" (after adding the input state).
RFC_KEY = [int.from_bytes(bytes(range(4 * i, 4 * i + 4)), "little") for i in range(8)]
RFC_NONCE = [0x09000000, 0x4A000000, 0x00000000]
RFC_BLOCK = [
    0xE4E7F110, 0x15593BD1, 0x1FDD0F50, 0xC47120A3,
    0xC7F4D1C7, 0x0368C033, 0x9AAA2204, 0x4E6CD4C3,
    0x466482D2, 0x09AA9F07, 0x05D7C214, 0xA2028BD9,
    0xD19C12B5, 0xB94E16DE, 0xE883D0CB, 0x4E3C50A2,
]


def _chacha20_block_py(key, nonce, counter):
    """RFC 8439 section 2.3.1, written out in Python (an independent second implementation)."""
    mask = 0xFFFFFFFF

    def rotl(v, c):
        return ((v << c) | (v >> (32 - c))) & mask

    def qr(x, a, b, c, d):  # the quarter round, RFC 8439 section 2.1
        for p, q, r, shift in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
            x[p] = (x[p] + x[q]) & mask
            x[r] = rotl(x[r] ^ x[p], shift)

    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *key, counter, *nonce]
    x = list(state)
    columns_then_diagonals = [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                              (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)]
    for _ in range(10):
        for idx in columns_then_diagonals:
            qr(x, *idx)
    return [(a + b) & mask for a, b in zip(x, state)]


def test_chacha20_rfc8439_block():
    out = _C.chacha20_block(RFC_KEY, RFC_NONCE, 1)
    assert len(out) == 16
    assert [hex(w) for w in out] == [hex(w) for w in RFC_BLOCK]
    assert _chacha20_block_py(RFC_KEY, RFC_NONCE, 1) == RFC_BLOCK


def test_chacha20_equals_python_on_random_keys():
    rng = np.random.default_rng(7)
    for _ in range(20):
        key = [int(v) for v in rng.integers(0, 2**32, 8)]
        nonce = [int(v) for v in rng.integers(0, 2**32, 3)]
        counter = int(rng.integers(0, 2**32))
        assert _C.chacha20_block(key, nonce, counter) == _chacha20_block_py(key, nonce, counter)


# --- log and sin/cos without libm (references at 200 bits, set per test: others set their own) ---
def _ulps(got: float, exact) -> float:
    """|got - exact| in units of the last place of the correctly rounded result."""
    nearest = float(exact)
    return float(abs(mpmath.mpf(got) - exact)) / math.ulp(nearest) if nearest else abs(got)


@mpmath.workprec(200)
def test_log_positive_within_2_ulp():
    rng = np.random.default_rng(1)
    # the range Box-Muller uses, [2^-53, 1]: log-uniform points, both sides of the m = sqrt(1/2)
    # branch, and the end points
    xs = list(2.0 ** -rng.uniform(0, 53, 2000)) + list(rng.uniform(0.5, 1.0, 1000))
    xs += [2.0**-53, 2.0**-52 + 2.0**-53, 0.5, math.sqrt(0.5), math.nextafter(math.sqrt(0.5), 1),
           1.0 - 2.0**-53, 1.0 - 2.0**-52, 0.75, 1e-10]
    worst = max(_ulps(_C.log_positive(x), mpmath.log(mpmath.mpf(x))) for x in xs)
    assert worst <= 2.0, f"log_positive is off by {worst} ulp"
    assert _C.log_positive(1.0) == 0.0


@mpmath.workprec(200)
def test_sincos_turns_within_2_ulp():
    rng = np.random.default_rng(2)
    # angles a = k / 2^32 as Box-Muller produces them, plus the quarter-turn boundaries
    ks = list(rng.integers(0, 2**32, 3000)) + [0, 1, 2**29, 2**30 - 1, 2**30, 2**30 + 1, 2**31,
                                               3 * 2**30, 2**32 - 1, 2**29 * 3, 2**29 * 5]
    worst = 0.0
    for k in ks:
        a = int(k) * 2.0**-32
        s, c = _C.sincos_turns(a)
        angle = 2 * mpmath.pi * mpmath.mpf(a)
        exact_s, exact_c = mpmath.sin(angle), mpmath.cos(angle)
        # the reduction to a quarter turn is exact, so the error is relative everywhere; at
        # the quarter turns themselves the zero must come out exactly
        for got, exact in ((s, exact_s), (c, exact_c)):
            if abs(exact) < 1e-50:
                assert got == 0.0, (a, got)
            else:
                worst = max(worst, _ulps(got, exact))
    assert worst <= 2.0, f"sincos_turns is off by {worst} ulp"
    assert _C.sincos_turns(0.0) == (0.0, 1.0)
    assert _C.sincos_turns(0.25) == (1.0, 0.0) or _C.sincos_turns(0.25) == (1.0, -0.0)
    assert _C.sincos_turns(0.5)[1] == -1.0 and _C.sincos_turns(0.75)[0] == -1.0

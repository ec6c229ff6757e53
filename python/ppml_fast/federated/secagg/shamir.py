"""Shamir secret sharing (Shamir, "How to share a secret", CACM 1979) over the prime field
GF(2^521 - 1): a secret is the constant term of a random polynomial of degree t - 1, each share
its value at a holder's nonzero point x, and any t shares give the secret back by Lagrange
interpolation at 0, while t - 1 shares are independent of it.

The protocol shares 32-byte secrets (self-mask seeds and X25519 private keys): as integers below
2^256 they fit the field whole. Pure Python integers: a client shares two secrets per round, so
a round of n clients costs 2 n^2 t field multiplications (about a second for n = 100, t = 67).
"""

from __future__ import annotations

import numbers
from functools import lru_cache
from typing import Mapping, Sequence

from ._crypto import RandBytes
from .errors import SecAggError

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "reconstruct", "reconstruct_bytes", "split",
           "split_bytes"]

#: the Mersenne prime 2^521 - 1
PRIME = (1 << 521) - 1
#: size of a share on the wire (big-endian field element)
SHARE_BYTES = 66
#: size of the secrets the protocol shares
SECRET_BYTES = 32


def _check_threshold(threshold: object, holders: int) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral):
        raise TypeError(f"threshold must be an int; got {type(threshold).__name__}")
    if not 1 <= threshold <= holders:
        raise ValueError(f"threshold must be in [1, {holders}] (the number of holders); got {threshold}")
    return int(threshold)


def _check_points(xs: Sequence[int]) -> list[int]:
    pts = [int(x) for x in xs]
    for x in pts:
        if not 0 < x < PRIME:
            raise ValueError(f"share points must be in [1, 2^521 - 1); got {x}")
    if len(set(pts)) != len(pts):
        raise ValueError(f"share points must be distinct; got {pts}")
    return pts


def _field_element(randbytes: RandBytes) -> int:
    """A uniform element of GF(p) by rejection (521 random bits, redrawn when >= p)."""
    while True:
        v = int.from_bytes(bytes(randbytes(SHARE_BYTES)), "big") & PRIME
        if v < PRIME:
            return v


def split(secret: int, threshold: int, xs: Sequence[int], randbytes: RandBytes) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` (0 <= secret < p) for the points ``xs``, any
    ``threshold`` of which recover it."""
    pts = _check_points(xs)
    t = _check_threshold(threshold, len(pts))
    if not 0 <= secret < PRIME:
        raise ValueError(f"secret must be in [0, 2^521 - 1); got an integer of {secret.bit_length()} bits")
    coeffs = [secret] + [_field_element(randbytes) for _ in range(t - 1)]
    shares = {}
    for x in pts:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """l_i(0) = prod_{j != i} x_j / (x_j - x_i) mod p for the points xs."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from at least ``threshold`` shares ``{x: y}`` (the ``threshold`` smallest points
    are used, so that many reconstructions share one set of Lagrange coefficients).

    Raises:
        SecAggError: fewer than ``threshold`` shares.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a secret shared with threshold "
                          f"{threshold}")
    xs = tuple(sorted(shares)[:threshold])
    _check_points(xs)
    coeffs = _lagrange_at_zero(xs)
    return sum(c * (shares[x] % PRIME) for c, x in zip(coeffs, xs)) % PRIME


def split_bytes(secret: bytes, threshold: int, xs: Sequence[int],
                randbytes: RandBytes) -> dict[int, bytes]:
    """:func:`split` of a 32-byte secret; shares as 66-byte big-endian strings."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes; got {type(secret).__name__}")
    shares = split(int.from_bytes(secret, "big"), threshold, xs, randbytes)
    return {x: y.to_bytes(SHARE_BYTES, "big") for x, y in shares.items()}


def reconstruct_bytes(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Inverse of :func:`split_bytes`.

    Raises:
        SecAggError: too few shares, or shares that do not interpolate to a 32-byte secret
            (a share replaced by garbage is caught this way with probability 1 - 2^-265; a
            share shifted by a chosen small offset is not: Shamir alone has no integrity).
    """
    value = reconstruct({x: int.from_bytes(y, "big") for x, y in shares.items()}, threshold)
    if value >> (8 * SECRET_BYTES):
        raise SecAggError("the shares are inconsistent: they do not interpolate to a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")

"""What travels between the clients and the server, and the key derivations both sides share.

Key derivations (HKDF-SHA256 over an X25519 shared secret, Bonawitz et al., CCS 2017, section 4,
"KA.agree" followed by a PRG seed / an encryption key), each bound to the round and the pair so
that no seed or key is ever used twice:

- pair mask seed  s_uv = HKDF(X25519(s_sk_u, s_pk_v), info = "ppml_fast/secagg/v1/pair-mask"
                                                           | round | min(u, v) | max(u, v))
- share key       k_uv = HKDF(X25519(c_sk_u, c_pk_v), info = "ppml_fast/secagg/v1/share-key"
                                                           | round | min(u, v) | max(u, v))

Both are symmetric in (u, v), since X25519(sk_u, pk_v) = X25519(sk_v, pk_u).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ._crypto import X25519Key, hkdf
from .errors import SecAggError
from .shamir import SHARE_BYTES

__all__ = ["PublicKeys", "SharePlaintext", "UnmaskResponse", "pair_seed", "share_key"]

_PAIR_INFO = b"ppml_fast/secagg/v1/pair-mask"
_SHARE_INFO = b"ppml_fast/secagg/v1/share-key"


def pack_ids(*ids: int) -> bytes:
    """Ints in [0, 2^64) as 8-byte big-endian words."""
    return b"".join(int(i).to_bytes(8, "big") for i in ids)


def pair_seed(s_key: X25519Key, peer_s_pk: bytes, round_id: int, u: int, v: int) -> bytes:
    """The 32-byte ChaCha20 seed of the pairwise mask between u and v."""
    return hkdf(s_key.agree(peer_s_pk), _PAIR_INFO + pack_ids(round_id, min(u, v), max(u, v)))


def share_key(c_key: X25519Key, peer_c_pk: bytes, round_id: int, u: int, v: int) -> bytes:
    """The ChaCha20-Poly1305 key that carries shares between u and v."""
    return hkdf(c_key.agree(peer_c_pk), _SHARE_INFO + pack_ids(round_id, min(u, v), max(u, v)))


def pair_sign(u: int, v: int) -> int:
    """The sign with which client u adds the mask it shares with v: +1 when u < v, -1 when u > v
    (so the two copies cancel in the sum)."""
    return 1 if u < v else -1


@dataclass(frozen=True)
class PublicKeys:
    """Round 0 (AdvertiseKeys): a client's two X25519 public keys, one to encrypt shares (c),
    one for the pairwise masks (s). Two keys, because the server may learn s_sk of a dropped
    client and must never be able to decrypt the shares."""

    c_pk: bytes
    s_pk: bytes

    def __post_init__(self) -> None:
        for name in ("c_pk", "s_pk"):
            v = getattr(self, name)
            if not isinstance(v, bytes) or len(v) != 32:
                raise ValueError(f"{name} must be 32 bytes (an X25519 public key); got {v!r}")


@dataclass(frozen=True)
class SharePlaintext:
    """Round 1 (ShareKeys): what u encrypts for v: both ids, v's share of u's mask key s_sk_u,
    and v's share of u's self-mask seed b_u."""

    sender: int
    receiver: int
    key_share: bytes
    mask_share: bytes

    def encode(self) -> bytes:
        return pack_ids(self.sender, self.receiver) + self.key_share + self.mask_share

    @staticmethod
    def decode(data: bytes) -> "SharePlaintext":
        if len(data) != 16 + 2 * SHARE_BYTES:
            raise SecAggError(f"a share message has {len(data)} bytes, expected {16 + 2 * SHARE_BYTES}")
        return SharePlaintext(int.from_bytes(data[:8], "big"), int.from_bytes(data[8:16], "big"),
                              data[16:16 + SHARE_BYTES], data[16 + SHARE_BYTES:])


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 4 (Unmasking): a surviving client's shares, by the client they belong to: of the
    self-mask seed b_u for each surviving u, of the mask key s_sk_u for each dropped u — never
    both for one u (Bonawitz et al., section 4: that would reveal u's input)."""

    mask_shares: Mapping[int, bytes] = field(default_factory=dict)
    key_shares: Mapping[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = set(self.mask_shares) & set(self.key_shares)
        if both:
            raise SecAggError(f"an unmasking response holds both kinds of shares of clients {sorted(both)}")

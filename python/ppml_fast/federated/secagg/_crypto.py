"""The primitives of the protocol, from the ``cryptography`` package (imported lazily, so that
``import ppml_fast`` works without it): X25519 key agreement (RFC 7748), HKDF-SHA256 (RFC 5869)
and ChaCha20-Poly1305 (RFC 8439) to carry Shamir shares between clients through the server.

``randbytes(n)`` is where every secret comes from: ``os.urandom`` unless a caller passes its own
(tests and reproducible simulations only; a seeded generator makes every key predictable).
"""

from __future__ import annotations

from typing import Callable

from .errors import SecAggError

__all__ = ["RandBytes", "X25519Key", "decrypt", "encrypt", "hkdf", "keypair", "require_cryptography"]

RandBytes = Callable[[int], bytes]

_INSTALL_HINT = (
    "ppml_fast.federated.secagg needs the 'cryptography' package (X25519, HKDF, "
    "ChaCha20-Poly1305): pip install 'ppml_fast[secagg]'"
)


def require_cryptography():
    """The ``cryptography`` modules used here; ImportError naming the extra when missing."""
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import x25519
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return x25519, serialization, hashes, HKDF, ChaCha20Poly1305


class X25519Key:
    """An X25519 private key (RFC 7748) with its raw bytes (``sk``, what gets secret-shared) and
    public key (``pk``); parsed once, so that agreeing with many peers costs one exchange each."""

    __slots__ = ("sk", "pk", "_key", "_public_cls")

    def __init__(self, sk: bytes) -> None:
        x25519, serialization, _, _, _ = require_cryptography()
        if not isinstance(sk, bytes) or len(sk) != 32:
            raise ValueError("an X25519 private key must be 32 bytes")
        self.sk = sk
        self._key = x25519.X25519PrivateKey.from_private_bytes(sk)
        self._public_cls = x25519.X25519PublicKey
        self.pk = self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)

    def agree(self, peer_pk: bytes) -> bytes:
        """The shared secret with a peer's 32-byte public key."""
        return self._key.exchange(self._public_cls.from_public_bytes(peer_pk))

    def __repr__(self) -> str:  # never print the secret
        return f"X25519Key(pk={self.pk.hex()[:16]}...)"


def keypair(randbytes: RandBytes) -> X25519Key:
    """A fresh X25519 key from 32 bytes of ``randbytes``."""
    return X25519Key(bytes(randbytes(32)))


def hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``ikm`` with no salt and context ``info``."""
    _, _, hashes, HKDF, _ = require_cryptography()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def encrypt(key: bytes, plaintext: bytes, aad: bytes, randbytes: RandBytes) -> bytes:
    """ChaCha20-Poly1305 with a fresh 12-byte nonce, returned in front of the ciphertext."""
    _, _, _, _, ChaCha20Poly1305 = require_cryptography()
    nonce = bytes(randbytes(12))
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, message: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`encrypt`; SecAggError when the message fails authentication."""
    _, _, _, _, ChaCha20Poly1305 = require_cryptography()
    from cryptography.exceptions import InvalidTag

    try:
        return ChaCha20Poly1305(key).decrypt(message[:12], message[12:], aad)
    except InvalidTag as e:
        raise SecAggError("a message failed authentication (wrong key, ids or tampered)") from e

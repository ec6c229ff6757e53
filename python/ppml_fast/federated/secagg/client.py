"""The client side of secure aggregation with double masking (Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017, section 4 and Figure 4, the
honest-but-curious variant; SecAgg+'s neighbour graph from Bell et al., CCS 2020).

A client u, holding input x_u and weight w_u, sends the server

    y_u = Enc(x_u, w_u) + PRG(b_u) + sum_{v in N(u) ∩ U2} sign(u, v) PRG(s_uv)    (mod 2^32)

(Bonawitz et al., section 4, the masked input of round 2), where Enc is the fixed-point encoding
of :mod:`.quantize` (the last element carries w_u exactly), b_u a fresh self-mask seed, s_uv
the seed u agrees with neighbour v, sign(u, v) = +1 if u < v else -1, and PRG the ChaCha20
stream of :func:`ppml_fast.ops.secagg_mask_`. The pairwise masks cancel in the sum over clients
that all sent; the self mask stays until the server reconstructs b_u from t shares of the
survivors — which it can do only for clients that sent y_u, while for a dropped client it gets
s_sk_u instead (to remove that client's pairwise masks), never both.

Not implemented (the active-adversary parts): signatures on the keys (a PKI) and round 3's
consistency check. Against a server that lies about who dropped, a client answers one unmasking
request only (:meth:`SecAggClient.unmask` refuses a second), as in Bonawitz et al.'s Figure 4.
"""

from __future__ import annotations

import os
from typing import Collection, Mapping, Optional

import torch

from ppml_fast.ops.secagg import secagg_mask_

from . import shamir
from ._crypto import RandBytes, decrypt, encrypt, keypair, require_cryptography
from .errors import SecAggError
from .messages import (PublicKeys, SharePlaintext, UnmaskResponse, pack_ids, pair_seed, pair_sign,
                       share_key)
from .params import SecAggParams

__all__ = ["SecAggClient"]

_STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask", "done")


class SecAggClient:
    """One client's state for one round; call the four methods in order, once each.

    Args:
        cid: this client's id (one of ``params.clients``).
        params: the round's public parameters.
        randbytes: the source of every secret (keys, seeds, share polynomials, rounding);
            ``os.urandom`` unless a test or a reproducible simulation passes its own.
    """

    def __init__(self, cid: int, params: SecAggParams, *, randbytes: Optional[RandBytes] = None) -> None:
        require_cryptography()
        if not isinstance(params, SecAggParams):
            raise TypeError(f"params must be SecAggParams; got {type(params).__name__}")
        if cid not in params.graph:
            raise ValueError(f"cid must be one of the round's clients {list(params.clients)}; got {cid!r}")
        self.cid = int(cid)
        self.params = params
        self._rand = randbytes or os.urandom
        self._stage = 0
        self._c_key = keypair(self._rand)
        self._s_key = keypair(self._rand)
        self._peers: dict[int, PublicKeys] = {}
        self._inbox: dict[int, bytes] = {}
        self._own_shares: tuple[bytes, bytes] = (b"", b"")
        self._b: bytes = b""

    def _advance(self, stage: str) -> None:
        expected = _STAGES[self._stage]
        if stage != expected:
            raise SecAggError(f"client {self.cid}: {stage}() called out of order (next step: "
                              f"{expected}()); each step runs once per round")
        self._stage += 1

    # -- round 0 --------------------------------------------------------------------------------
    def advertise_keys(self) -> PublicKeys:
        """Round 0: this round's two public keys."""
        self._advance("advertise_keys")
        return PublicKeys(self._c_key.pk, self._s_key.pk)

    # -- round 1 --------------------------------------------------------------------------------
    def share_keys(self, public_keys: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Round 1: t-of-(holders) shares of s_sk and of a fresh b, one encrypted message per
        neighbour that advertised keys (``public_keys``: the server's relay of them).

        Raises:
            SecAggError: fewer than t holders left, or two clients advertising the same keys.
        """
        self._advance("share_keys")
        t, rid = self.params.threshold, self.params.round_id
        peers = {int(v): pk for v, pk in public_keys.items() if v in self.params.graph[self.cid]}
        for v, pk in peers.items():
            if not isinstance(pk, PublicKeys):
                raise TypeError(f"public_keys[{v}] must be PublicKeys; got {type(pk).__name__}")
        seen = [(pk.c_pk, pk.s_pk) for pk in peers.values()] + [(self._c_key.pk, self._s_key.pk)]
        if len({k for pair in seen for k in pair}) != 2 * len(seen):
            raise SecAggError(f"client {self.cid}: two advertised public keys are equal; aborting")
        if len(peers) + 1 < t:
            raise SecAggError(f"client {self.cid}: only {len(peers) + 1} holders for its shares, "
                              f"below the threshold t={t}; aborting the round")
        self._peers = peers
        self._b = bytes(self._rand(shamir.SECRET_BYTES))
        holders = sorted(peers) + [self.cid]
        xs = [h + 1 for h in holders]  # Shamir points: nonzero
        key_shares = shamir.split_bytes(self._s_key.sk, t, xs, self._rand)
        mask_shares = shamir.split_bytes(self._b, t, xs, self._rand)
        self._own_shares = (key_shares[self.cid + 1], mask_shares[self.cid + 1])
        out = {}
        for v, pk in peers.items():
            msg = SharePlaintext(self.cid, v, key_shares[v + 1], mask_shares[v + 1]).encode()
            key = share_key(self._c_key, pk.c_pk, rid, self.cid, v)
            out[v] = encrypt(key, msg, pack_ids(rid, self.cid, v), self._rand)
        return out

    # -- round 2 --------------------------------------------------------------------------------
    def masked_input(self, update: torch.Tensor, ciphertexts: Mapping[int, bytes], *,
                     weight: int = 1) -> torch.Tensor:
        """Round 2: the masked vector y_u (int32 bit patterns, length P + 1).

        Args:
            update: the input x_u, a 1-D floating tensor of length P.
            ciphertexts: the share messages addressed to this client, by sender (the server's
                relay: the senders are the neighbours still in the round, U2 ∩ N(u)).
            weight: w_u, an int in [0, max_weight] (values are encoded as w_u / max_weight * x_u).
        """
        self._advance("masked_input")
        p = self.params
        if not isinstance(update, torch.Tensor) or update.dim() != 1 or not update.is_floating_point():
            got = tuple(update.shape) if isinstance(update, torch.Tensor) else type(update).__name__
            raise ValueError(f"update must be a 1-D floating tensor; got {got}")
        if update.numel() != p.vector_length:
            raise ValueError(f"update must have vector_length={p.vector_length} elements; "
                             f"got {update.numel()}")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= p.max_weight:
            raise ValueError(f"weight must be an int in [0, max_weight={p.max_weight}]; got {weight!r}")
        senders = {int(v) for v in ciphertexts}
        unknown = senders - set(self._peers)
        if unknown:
            raise SecAggError(f"client {self.cid}: share messages from clients {sorted(unknown)} "
                              "that are not neighbours with advertised keys")
        if len(senders) + 1 < p.threshold:
            raise SecAggError(f"client {self.cid}: only {len(senders) + 1} clients left after "
                              f"sharing, below the threshold t={p.threshold}; aborting the round")
        self._inbox = dict(ciphertexts)
        codes = p.quantizer.quantize(update, seed=bytes(self._rand(32)), factor=weight / p.max_weight)
        y = torch.empty(p.vector_length + 1, dtype=torch.int32)
        y[:-1] = codes
        y[-1] = weight - (1 << 32) if weight >= 1 << 31 else weight  # the uint32 bits of w_u
        seeds = [self._b]
        signs = [1]
        for v in sorted(senders):
            seeds.append(pair_seed(self._s_key, self._peers[v].s_pk, p.round_id, self.cid, v))
            signs.append(pair_sign(self.cid, v))
        return secagg_mask_(y, seeds, signs)

    # -- round 4 --------------------------------------------------------------------------------
    def unmask(self, survivors: Collection[int]) -> UnmaskResponse:
        """Round 4: shares of b_u for every surviving sender u (and this client), shares of
        s_sk_u for every sender u that dropped before sending its masked input.

        Raises:
            SecAggError: a second request, this client not among ``survivors``, fewer survivors
                than t, or a share message that fails authentication or names the wrong ids.
        """
        self._advance("unmask")
        p = self.params
        alive = {int(v) for v in survivors}
        if self.cid not in alive:
            raise SecAggError(f"client {self.cid}: asked to unmask but not listed among the survivors")
        if not alive <= set(p.clients):
            raise SecAggError(f"client {self.cid}: survivors {sorted(alive - set(p.clients))} "
                              "are not clients of this round")
        if len(alive) < p.threshold:
            raise SecAggError(f"client {self.cid}: {len(alive)} survivors, below the threshold "
                              f"t={p.threshold}; refusing to reveal shares")
        mask_shares = {self.cid: self._own_shares[1]}
        key_shares: dict[int, bytes] = {}
        for u, ct in self._inbox.items():
            key = share_key(self._c_key, self._peers[u].c_pk, p.round_id, u, self.cid)
            try:
                msg = SharePlaintext.decode(decrypt(key, ct, pack_ids(p.round_id, u, self.cid)))
            except SecAggError as e:
                raise SecAggError(f"client {self.cid}: the share message from client {u} fails "
                                  "authentication") from e
            if (msg.sender, msg.receiver) != (u, self.cid):
                raise SecAggError(f"client {self.cid}: the share message relayed as from {u} names "
                                  f"sender {msg.sender} and receiver {msg.receiver}")
            if u in alive:
                mask_shares[u] = msg.mask_share
            else:
                key_shares[u] = msg.key_share
        return UnmaskResponse(mask_shares=mask_shares, key_shares=key_shares)

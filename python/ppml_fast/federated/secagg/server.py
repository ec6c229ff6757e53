"""The server side of secure aggregation (Bonawitz et al., CCS 2017, section 4 and Figure 4):
relays keys and encrypted shares, sums the masked inputs in Z_{2^32} as they arrive, and in the
unmasking round removes what does not cancel:

    z = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u)
        - sum_{u in U2 \\ U3} sum_{v in N(u) ∩ U3} sign(v, u) PRG(s_vu)           (mod 2^32)

(Bonawitz et al., Figure 4, round 4, server side): b_u reconstructed from t shares for every
survivor, s_sk_u for every client that dropped after sharing, from which the server recomputes
s_uv with each surviving neighbour's public key. All those masks are expanded in one call of
the native ``secagg_mask_`` kernel over the sum. The server holds only the running sum of the
masked vectors, never one of them after it has been added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ppml_fast.ops.secagg import secagg_mask_

from . import shamir
from ._crypto import X25519Key
from .errors import SecAggError
from .messages import PublicKeys, UnmaskResponse, pair_seed, pair_sign
from .params import SecAggParams

__all__ = ["SecAggResult", "SecAggServer"]


@dataclass(frozen=True)
class SecAggResult:
    """What the server learns from a round.

    Attributes:
        total: float64 (P,), the decoded weighted sum ``sum_{u in survivors} w_u clip(x_u)``,
            within ``error_bound`` of the exact sum in every coordinate.
        weight_sum: ``sum_{u in survivors} w_u``, exact.
        survivors: the clients whose inputs are in the sum (U3).
        dropped: clients that shared keys but sent no input; their masks were removed (U2 \\ U3).
        error_bound: per-coordinate bound on the quantisation error of ``total``.
    """

    total: torch.Tensor
    weight_sum: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float

    def mean(self) -> torch.Tensor:
        """``total / weight_sum`` (float64); ValueError when the weights sum to 0."""
        if self.weight_sum == 0:
            raise ValueError("the surviving clients' weights sum to 0: the mean is undefined")
        return self.total / self.weight_sum


class SecAggServer:
    """The server of one round; its methods are called in the protocol's order (round 0, 1, 2,
    then 4; round 3, the consistency check against an active server, is not implemented)."""

    def __init__(self, params: SecAggParams) -> None:
        if not isinstance(params, SecAggParams):
            raise TypeError(f"params must be SecAggParams; got {type(params).__name__}")
        self.params = params
        self._keys: dict[int, PublicKeys] = {}
        self._u2: frozenset[int] = frozenset()
        self._u3: set[int] = set()
        self._closed = False
        self._sum = np.zeros(params.vector_length + 1, dtype=np.uint32)

    def _abort_if_short(self, alive: int, what: str) -> None:
        t = self.params.threshold
        if alive < t:
            raise SecAggError(
                f"secure aggregation round {self.params.round_id}: {what} {alive} of "
                f"{len(self.params.clients)} clients, below the threshold t={t}: the masks cannot "
                "be removed and the round is aborted (nothing about any input is revealed)")

    # -- round 0 --------------------------------------------------------------------------------
    def collect_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, dict[int, PublicKeys]]:
        """U1 = the clients that advertised keys; returns, for each, its neighbours' keys."""
        for cid, pk in keys.items():
            if cid not in self.params.graph:
                raise SecAggError(f"keys from {cid!r}, which is not a client of this round")
            if not isinstance(pk, PublicKeys):
                raise TypeError(f"keys[{cid}] must be PublicKeys; got {type(pk).__name__}")
        self._keys = dict(keys)
        self._abort_if_short(len(self._keys), "keys advertised by")
        graph = self.params.graph
        return {u: {v: self._keys[v] for v in graph[u] if v in self._keys} for u in self._keys}

    # -- round 1 --------------------------------------------------------------------------------
    def route_shares(self, shares: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """U2 = the clients that sent shares; returns each one's inbox ``{sender: ciphertext}``."""
        u2 = frozenset(int(u) for u in shares if u in self._keys)
        self._abort_if_short(len(u2), "shares sent by")
        inbox: dict[int, dict[int, bytes]] = {v: {} for v in u2}
        for u in u2:
            for v, ct in shares[u].items():
                if v in u2 and v in self.params.graph[u]:
                    inbox[v][u] = ct
        self._u2 = u2
        return inbox

    # -- round 2 --------------------------------------------------------------------------------
    def add_masked_input(self, cid: int, masked: torch.Tensor) -> None:
        """Add client ``cid``'s masked vector to the running sum (mod 2^32)."""
        if self._closed:
            raise SecAggError(f"masked input from {cid} after the masked-input round closed")
        if cid not in self._u2:
            raise SecAggError(f"masked input from {cid!r}, which did not share keys this round")
        if cid in self._u3:
            raise SecAggError(f"a second masked input from client {cid}")
        n = self.params.vector_length + 1
        if not isinstance(masked, torch.Tensor) or masked.dtype != torch.int32 or masked.shape != (n,):
            raise ValueError(f"masked input of client {cid} must be an int32 tensor of shape ({n},); got "
                             + (f"{masked.dtype} {tuple(masked.shape)}" if isinstance(masked, torch.Tensor)
                                else type(masked).__name__))
        self._sum += masked.contiguous().numpy().view(np.uint32)  # wraps mod 2^32
        self._u3.add(int(cid))

    def close_masked_inputs(self) -> frozenset[int]:
        """End of round 2: U3, the survivors, sent to each of them for unmasking.

        Raises:
            SecAggError: fewer than t survivors, or a client of U2 with fewer than t surviving
                holders of its shares (SecAgg+: its neighbourhood, Bell et al. 2020, section 3).
                Checked before any share is asked for, so an aborted round reveals no share and
                can be retried with the survivors (:mod:`.strategy`).
        """
        self._abort_if_short(len(self._u3), "masked inputs sent by")
        t = self.params.threshold
        for u in sorted(self._u2):
            alive = len(self.params.holders(u) & self._u3)
            if alive < t:
                raise SecAggError(
                    f"secure aggregation round {self.params.round_id}: only {alive} holders of the "
                    f"shares of client {u} sent masked inputs, below the threshold t={t}: its "
                    f"{'self mask' if u in self._u3 else 'pairwise masks'} cannot be removed and the "
                    "round is aborted before unmasking (no share is revealed)")
        self._closed = True
        return frozenset(self._u3)

    # -- round 4 --------------------------------------------------------------------------------
    def _reconstruct(self, u: int, responses: Mapping[int, UnmaskResponse], kind: str) -> bytes:
        t = self.params.threshold
        shares = {}
        for v, r in responses.items():
            book = r.mask_shares if kind == "mask" else r.key_shares
            if u in book and v in self.params.holders(u):
                shares[v + 1] = book[u]
        if len(shares) < t:
            what = "self-mask seed" if kind == "mask" else "mask key of dropped client"
            raise SecAggError(
                f"secure aggregation round {self.params.round_id}: only {len(shares)} shares of the "
                f"{what} {u} arrived, below the threshold t={t}; the round is aborted")
        return shamir.reconstruct_bytes(shares, t)

    def unmask(self, responses: Mapping[int, UnmaskResponse]) -> SecAggResult:
        """Round 4: reconstruct, remove the remaining masks, decode.

        Raises:
            SecAggError: fewer than t responses, or too few shares of some secret.
        """
        if not self._closed:
            raise SecAggError("unmask before close_masked_inputs()")
        u4 = {v: r for v, r in responses.items() if v in self._u3}
        self._abort_if_short(len(u4), "unmasking responses from")
        p = self.params
        seeds: list[bytes] = []
        signs: list[int] = []
        for u in sorted(self._u3):
            seeds.append(self._reconstruct(u, u4, "mask"))
            signs.append(-1)
        dropped = sorted(self._u2 - self._u3)
        for u in dropped:
            s_key = X25519Key(self._reconstruct(u, u4, "key"))
            if s_key.pk != self._keys[u].s_pk:
                raise SecAggError(f"the reconstructed mask key of client {u} does not match its "
                                  "advertised public key (inconsistent shares)")
            for v in sorted(p.graph[u] & self._u3):
                seeds.append(pair_seed(s_key, self._keys[v].s_pk, p.round_id, u, v))
                signs.append(-pair_sign(v, u))  # v added sign(v, u) PRG(s_uv)
        z = torch.from_numpy(self._sum.copy()).view(torch.int32)
        secagg_mask_(z, seeds, signs)
        count = len(self._u3)
        weight_sum = int(z[-1].item()) & 0xFFFFFFFF
        total = p.quantizer.dequantize(z[:-1], count) * p.max_weight
        return SecAggResult(total=total, weight_sum=weight_sum, survivors=tuple(sorted(self._u3)),
                            dropped=tuple(dropped), error_bound=p.error_bound(count))

    @property
    def running_sum(self) -> np.ndarray:
        """A copy of the masked running sum (what the server holds before unmasking)."""
        return self._sum.copy()

"""The public parameters of one secure-aggregation round, known to the server and every client:
the round's clients and neighbour graph, the Shamir threshold, the vector length, the encoding
and the largest weight."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ._crypto import RandBytes
from .graph import Graph, neighbour_graph
from .quantize import Quantizer, max_bits

__all__ = ["SecAggParams", "default_threshold"]

_RING = 1 << 32


def default_threshold(holders: int) -> int:
    """floor(2h/3) + 1 of the h holders of a client's shares: reconstruction survives up to
    h - t dropouts, and two disjoint answering sets can never both reach t. Bonawitz et al.
    (CCS 2017, section 6) require t > 2n/3 against an active server; against an honest-but-curious
    one any t above the number of colluding clients would do. We default to the larger."""
    return 2 * holders // 3 + 1


def _int(name: str, v: object, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}; got {v}")
    return int(v)


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of a round (see :meth:`create`).

    Attributes:
        round_id: distinguishes rounds in every key derivation (seeds never repeat across rounds).
        clients: the ids of the clients selected for the round, ascending.
        graph: each client's neighbours (who it masks with and shares its secrets among).
        threshold: t, the shares needed to reconstruct a secret (of the holders N(u) + {u}).
        vector_length: P, the length of each input; the masked vectors have P + 1 elements,
            the last one carrying the client's integer weight exactly.
        quantizer: the encoding of the P values.
        max_weight: the largest weight a client may declare (weights are ints in [0, max_weight];
            values are scaled by weight / max_weight before encoding).
    """

    round_id: int
    clients: tuple[int, ...]
    graph: Graph
    threshold: int
    vector_length: int
    quantizer: Quantizer
    max_weight: int = 1

    @staticmethod
    def create(clients: Sequence[int], *, vector_length: int, clip_range: float,
               threshold: Optional[int] = None, neighbours: Optional[int] = None,
               bits: Optional[int] = None, max_weight: int = 1, round_id: int = 0,
               randbytes: Optional[RandBytes] = None) -> "SecAggParams":
        """Validated parameters; the server draws the graph (SecAgg+) with ``randbytes``.

        Args:
            clients: distinct client ids (ints >= 0), at least 2.
            vector_length: P >= 1.
            clip_range: r of the encoding: each value is clipped to [-r, r].
            threshold: t, with holders/2 < t <= holders, where holders = neighbours + 1 (all
                clients for the complete graph); None: :func:`default_threshold`.
            neighbours: None for the complete graph (Bonawitz et al.), or an even k >= 2 for
                SecAgg+ (Bell et al.).
            bits: bits per value, at most ``max_bits(len(clients))`` (the default), so that the
                sum of every client's code cannot wrap.
            max_weight: the largest client weight W; ``len(clients) * W`` must stay below 2^32.
            round_id: an int in [0, 2^64).
        """
        if not isinstance(clients, (list, tuple, range)):
            raise TypeError(f"clients must be a list of ints; got {type(clients).__name__}")
        ids = [_int(f"clients[{i}]", c, 0, (1 << 63) - 1) for i, c in enumerate(clients)]
        if len(ids) < 2:
            raise ValueError(f"clients must hold at least 2 ids (the sum of one input is that "
                             f"input); got {len(ids)}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"clients must be distinct; got {sorted(ids)}")
        ids.sort()
        p = _int("vector_length", vector_length, 1, (1 << 36) - 1)
        b_max = max_bits(len(ids))
        b = b_max if bits is None else _int("bits", bits, 1, b_max)
        quantizer = Quantizer(clip_range, b)
        w = _int("max_weight", max_weight, 1)
        if len(ids) * w >= _RING:
            raise ValueError(f"max_weight must be < 2^32 / {len(ids)} clients = "
                             f"{(_RING - 1) // len(ids)} (the weight sum must not wrap); got {w}")
        graph = neighbour_graph(ids, neighbours, randbytes or os.urandom)
        holders = min(len(v) for v in graph.values()) + 1
        t = default_threshold(holders) if threshold is None else _int("threshold", threshold, 1)
        if not holders / 2 < t <= holders:
            raise ValueError(f"threshold must be in ({holders / 2:g}, {holders}] for {holders} "
                             f"holders of each client's shares (more than half, so that two "
                             f"disjoint sets of clients can never both reconstruct); got {t}")
        rid = _int("round_id", round_id, 0, (1 << 64) - 1)
        return SecAggParams(rid, tuple(ids), graph, t, p, quantizer, w)

    def holders(self, cid: int) -> frozenset[int]:
        """The clients that hold shares of ``cid``'s secrets: its neighbours and itself."""
        return self.graph[cid] | {cid}

    def error_bound(self, count: int) -> float:
        """Per-coordinate bound on |decoded weighted sum - sum_k w_k clip(x_k)| for ``count``
        inputs (the quantizer's bound times max_weight, see :mod:`.quantize`)."""
        return self.max_weight * self.quantizer.error_bound(count)

"""Who masks with whom: the complete graph of Bonawitz et al. (CCS 2017), where every pair of
clients shares a mask, or the random k-regular graph of SecAgg+ (Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020, section 3): a Harary graph
H(k, n) — clients on a ring, each joined to its k/2 nearest on either side — over a uniformly
random relabelling of the clients. A client then masks with, and shares its secrets among, its k
neighbours only, so a round costs O(n k) mask expansions instead of O(n^2).

Bell et al. choose k = O(log n) for security against a fraction of corrupt clients and
dropouts; the right k depends on those fractions. :func:`.design.design` derives k and the
threshold from them and a target failure probability (what :class:`~.strategy.SecAggFedAvg`
does by default); a k passed by hand is used as given.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

from ._crypto import RandBytes

__all__ = ["Graph", "complete_graph", "harary_graph", "neighbour_graph"]

Graph = dict[int, frozenset[int]]


def complete_graph(ids: Sequence[int]) -> Graph:
    """Every client is every other client's neighbour."""
    s = frozenset(ids)
    return {u: s - {u} for u in ids}


def _uniform_below(n: int, randbytes: RandBytes) -> int:
    """Uniform integer in [0, n) by rejection on 64-bit draws."""
    limit = (1 << 64) - (1 << 64) % n
    while True:
        v = int.from_bytes(bytes(randbytes(8)), "big")
        if v < limit:
            return v % n


def harary_graph(ids: Sequence[int], k: int, randbytes: RandBytes) -> Graph:
    """The k-regular Harary graph over a random permutation of ``ids`` (k even, 2 <= k < n)."""
    n = len(ids)
    order = list(ids)
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = _uniform_below(i + 1, randbytes)
        order[i], order[j] = order[j], order[i]
    half = k // 2
    graph: Graph = {}
    for pos, u in enumerate(order):
        graph[u] = frozenset(order[(pos + d) % n] for d in range(-half, half + 1) if d != 0)
    return graph


def neighbour_graph(ids: Sequence[int], neighbours: Optional[int], randbytes: RandBytes) -> Graph:
    """The complete graph when ``neighbours`` is None or at least ``len(ids) - 1``; otherwise
    SecAgg+'s random ``neighbours``-regular graph (``neighbours`` even, >= 2)."""
    if neighbours is None:
        return complete_graph(ids)
    if isinstance(neighbours, bool) or not isinstance(neighbours, numbers.Integral):
        raise TypeError(f"neighbours must be an int or None; got {type(neighbours).__name__}")
    if neighbours < 2 or neighbours % 2:
        raise ValueError(f"neighbours must be an even int >= 2 (a k-regular Harary graph); got {neighbours}")
    if neighbours >= len(ids) - 1:
        return complete_graph(ids)
    return harary_graph(ids, int(neighbours), randbytes)

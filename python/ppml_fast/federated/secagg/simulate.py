"""One secure-aggregation round for simulated clients in one process: :class:`SecAggRound`
runs the rounds (advertise keys, share keys, masked input, unmasking) between
:class:`~.client.SecAggClient` objects and a :class:`~.server.SecAggServer`, passing only the
protocol's messages between them, with optional dropouts at each stage; :func:`secure_sum` is
the one-call form for a list of vectors.
"""

from __future__ import annotations

import os
from typing import Collection, Mapping, Optional, Sequence, Union

import torch

from ._crypto import RandBytes
from .client import SecAggClient
from .params import SecAggParams
from .server import SecAggResult, SecAggServer

__all__ = ["SecAggRound", "secure_sum"]

Inputs = Union[Mapping[int, torch.Tensor], Sequence[torch.Tensor]]


def _id_set(name: str, ids: Collection[int], clients: Collection[int]) -> frozenset[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Collection):
        raise TypeError(f"{name} must be a collection of client ids; got {type(ids).__name__}")
    out = frozenset(ids)
    unknown = out - set(clients)
    if unknown:
        raise ValueError(f"{name} names clients {sorted(unknown)} that are not in the round "
                         f"({sorted(clients)})")
    return out


class SecAggRound:
    """Runs one round of the protocol over the clients of ``params``.

    Args:
        params: the round's public parameters (:meth:`SecAggParams.create`).
        randbytes: the source of every client's secrets (default ``os.urandom``; pass a seeded
            one only for tests and reproducible simulations).
    """

    def __init__(self, params: SecAggParams, *, randbytes: Optional[RandBytes] = None) -> None:
        if not isinstance(params, SecAggParams):
            raise TypeError(f"params must be SecAggParams; got {type(params).__name__}")
        self.params = params
        self.randbytes = randbytes or os.urandom

    def run(self, inputs: Inputs, *, weights: Optional[Mapping[int, int]] = None,
            drop_before_sharing: Collection[int] = (), drop_before_masking: Collection[int] = (),
            drop_before_unmasking: Collection[int] = ()) -> SecAggResult:
        """The server's result of one round.

        Args:
            inputs: each client's 1-D float vector of length ``vector_length``, by id (a list is
                read as ids 0..K-1). Clients that drop before masking need none.
            weights: each client's int weight in [0, max_weight] (default 1 each).
            drop_before_sharing: clients that advertise keys and then go silent.
            drop_before_masking: clients that share keys but never send their masked input
                (their pairwise masks are removed through their reconstructed keys).
            drop_before_unmasking: survivors that send their input but not their shares.

        Raises:
            SecAggError: fewer than ``threshold`` clients left at any stage.
        """
        p = self.params
        ids = p.clients
        if isinstance(inputs, (list, tuple)):
            inputs = dict(enumerate(inputs))
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a mapping of client id to tensor or a list; got "
                            f"{type(inputs).__name__}")
        weights = {} if weights is None else dict(weights)
        d_share = _id_set("drop_before_sharing", drop_before_sharing, ids)
        d_mask = _id_set("drop_before_masking", drop_before_masking, ids)
        d_unmask = _id_set("drop_before_unmasking", drop_before_unmasking, ids)
        maskers = [c for c in ids if c not in d_share and c not in d_mask]
        missing = [c for c in maskers if c not in inputs]
        if missing:
            raise ValueError(f"inputs lacks the vectors of clients {missing}, which send masked inputs")
        unknown = set(inputs) - set(ids)
        if unknown:
            raise ValueError(f"inputs has vectors of clients {sorted(unknown)} that are not in the round")

        server = SecAggServer(p)
        clients = {c: SecAggClient(c, p, randbytes=self.randbytes) for c in ids}
        routed = server.collect_keys({c: clients[c].advertise_keys() for c in ids})
        shares = {c: clients[c].share_keys(routed[c]) for c in routed if c not in d_share}
        inbox = server.route_shares(shares)
        for c in sorted(inbox):
            if c in d_mask:
                continue
            y = clients[c].masked_input(inputs[c], inbox[c], weight=weights.get(c, 1))
            server.add_masked_input(c, y)
            del y  # the server keeps only the running sum
        survivors = server.close_masked_inputs()
        responses = {c: clients[c].unmask(survivors) for c in sorted(survivors) if c not in d_unmask}
        return server.unmask(responses)


def secure_sum(updates: Sequence[torch.Tensor], *, clip_range: float,
               weights: Optional[Sequence[int]] = None, max_weight: int = 1,
               threshold: Optional[int] = None, neighbours: Optional[int] = None,
               bits: Optional[int] = None, round_id: int = 0,
               randbytes: Optional[RandBytes] = None,
               drop_before_masking: Collection[int] = ()) -> SecAggResult:
    """The weighted sum of ``updates`` (K flat vectors, clients 0..K-1) through one simulated
    round of secure aggregation; the arguments are those of :meth:`SecAggParams.create` and
    :meth:`SecAggRound.run`."""
    if not isinstance(updates, (list, tuple)) or not updates:
        raise ValueError(f"updates must be a non-empty list of 1-D tensors; got {type(updates).__name__}")
    size = updates[0].numel() if isinstance(updates[0], torch.Tensor) else None
    if size is None:
        raise TypeError(f"updates[0] must be a torch.Tensor; got {type(updates[0]).__name__}")
    params = SecAggParams.create(list(range(len(updates))), vector_length=size, clip_range=clip_range,
                                 threshold=threshold, neighbours=neighbours, bits=bits,
                                 max_weight=max_weight, round_id=round_id, randbytes=randbytes)
    w = None if weights is None else dict(enumerate(weights))
    return SecAggRound(params, randbytes=randbytes).run(list(updates), weights=w,
                                                        drop_before_masking=drop_before_masking)

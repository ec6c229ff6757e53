"""Flower Message-API strategies (flwr >= 1.21 ``ServerApp`` + ``strategy.start``) whose
aggregation runs on ppml_fast's native ``weighted_aggregate`` op.

- :class:`FedAvg`: ``flwr.serverapp.strategy.FedAvg`` with ``aggregate_train`` computing the
  weighted mean natively; sampling, configuration, evaluation and metrics are Flower's.
- :class:`DPFedAvg` (in :mod:`ppml_fast.integrations.flower_dp`): user-level DP-FedAvg.

Use it where Flower's quickstart uses its FedAvg::

    from ppml_fast.integrations.flower import FedAvg
    strategy = FedAvg(fraction_evaluate=0.5)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=3)

Differences from Flower 1.42's FedAvg: the weights (``weighted_by_key``, "num-examples") must be
finite, >= 0 and not all zero (Flower divides by their sum), and replies whose ArrayRecords differ
in keys or shapes raise ``ValueError`` naming the node (Flower broadcasts or fails in numpy).
Integer arrays are averaged as float64, as Flower's ``aggregate_arrayrecords`` does.

Needs Flower: ``pip install 'ppml_fast[flower]'``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Optional

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg as _FlowerFedAvg
except ImportError as exc:  # flwr is an optional dependency
    raise ImportError(
        "ppml_fast.integrations.flower_message needs Flower's Message API (flwr >= 1.21); install "
        f"it with pip install 'ppml_fast[flower]' (import failed: {exc})"
    ) from exc

from ppml_fast.integrations._ndarrays import aggregate_ndarrays

__all__ = ["FedAvg", "check_shapes", "reply_arrays", "to_arrayrecord"]


def reply_arrays(content: RecordDict, keys: Optional[list[str]], node: object) -> tuple[list[str], list[np.ndarray]]:
    """The (keys, numpy arrays) of a reply's single ArrayRecord; with ``keys`` given, the reply
    must hold exactly those keys (``node`` names the sender in the error)."""
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"reply from node {node} must hold exactly one ArrayRecord; got {len(records)}")
    record = records[0]
    got = list(record.keys())
    if keys is not None and got != keys:
        raise ValueError(f"reply from node {node} holds arrays {got}; expected {keys} "
                         "(the keys of the first reply / the global model)")
    return got, [record[k].numpy() for k in got]


def to_arrayrecord(keys: list[str], arrays: list[np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` under ``keys`` (numpy stype, as Flower's aggregation)."""
    return ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)})


def check_shapes(arrays: list[np.ndarray], like: list[np.ndarray], keys: list[str], node: object,
                 like_name: object) -> None:
    """Every array of ``arrays`` has the shape of its counterpart in ``like``."""
    for k, a, b in zip(keys, arrays, like):
        if a.shape != b.shape:
            raise ValueError(f"reply from node {node}: array {k!r} has shape {a.shape}; "
                             f"{like_name} sent shape {b.shape}")


def reply_weight(content: RecordDict, key: str, node: object) -> float:
    """The weight a reply reports under ``key`` in its single MetricRecord (finite, >= 0)."""
    metrics = next(iter(content.metric_records.values()))
    w = metrics.get(key)
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
        raise ValueError(f"reply from node {node}: MetricRecord[{key!r}] must be a finite number "
                         f">= 0; got {w!r}")
    return float(w)


class FedAvg(_FlowerFedAvg):
    """Flower's Message-API FedAvg with the weighted mean computed by
    :func:`ppml_fast.ops.weighted_aggregate` (one op call per array over all replies).

    Arguments are Flower's (``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``,
    ``min_available_nodes``, ``weighted_by_key``, ``arrayrecord_key``, ``configrecord_key``,
    ``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``).
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Weighted mean of the replies' ArrayRecords (weights: ``weighted_by_key``), natively;
        the metrics through ``train_metrics_aggr_fn`` as in Flower."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        keys: Optional[list[str]] = None
        clients, weights = [], []
        for msg in valid:
            node = msg.metadata.src_node_id
            keys, arrays = reply_arrays(msg.content, keys, node)
            if clients:
                check_shapes(arrays, clients[0], keys, node, valid[0].metadata.src_node_id)
            clients.append(arrays)
            weights.append(reply_weight(msg.content, self.weighted_by_key, node))
        if sum(weights) == 0:
            raise ValueError(f"MetricRecord[{self.weighted_by_key!r}] is 0 for every reply; FedAvg "
                             "divides by their sum")
        mean = aggregate_ndarrays(clients, weights)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return to_arrayrecord(keys, mean), metrics

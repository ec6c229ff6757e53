"""Federated learning: simulated clients that own their data, Flower-style strategies on flat
parameter vectors, and seeded partitioners that split one dataset into per-client datasets
(IID, Dirichlet label skew, McMahan shards, quantity skew)."""

from .client import Client
from .parameters import ParameterLayout
from .partition import dirichlet_partition, iid_partition, quantity_skew_partition, shard_partition
from .strategy import FedAvg, Strategy
from .types import ClientProxy, EvalResult, FitResult

__all__ = [
    "Client", "ClientProxy", "EvalResult", "FedAvg", "FitResult", "ParameterLayout", "Strategy",
    "dirichlet_partition", "iid_partition", "quantity_skew_partition", "shard_partition",
]

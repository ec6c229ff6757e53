"""Federated learning: simulated clients that own their data, and seeded partitioners that split
one dataset into per-client datasets (IID, Dirichlet label skew, McMahan shards, quantity skew)."""

from .partition import dirichlet_partition, iid_partition, quantity_skew_partition, shard_partition

__all__ = ["dirichlet_partition", "iid_partition", "quantity_skew_partition", "shard_partition"]

"""Federated strategies (Flower's vocabulary) on flat parameter vectors."""

from .base import Strategy, sample_clients, weighted_mean_update
from .fedavg import FedAvg

__all__ = ["FedAvg", "Strategy", "sample_clients", "weighted_mean_update"]

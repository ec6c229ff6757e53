"""Federated learning: simulated clients that own their data, Flower-style strategies on flat
parameter vectors, and seeded partitioners that split one dataset into per-client datasets
(IID, Dirichlet label skew, McMahan shards, quantity skew); ``run_simulation`` runs the rounds on
a sequential, vectorized (``torch.func.vmap``) or Ray backend and returns a ``History``; user-level
DP (``DPFedAvgFixed``/``DPFedAvgAdaptive``/``DPFTRLFedAvg``), local DP-SGD (``LocalDP``) and secure aggregation
(``SecAggFedAvg``) wrap or configure any of it."""

from .backends import RayBackend, SequentialBackend, VectorizedBackend
from .client import Client
from .dp import DPFedAvgAdaptive, DPFedAvgFixed, DPFTRLFedAvg, LocalDP
from .history import History
from .parameters import ParameterLayout
from .partition import dirichlet_partition, iid_partition, quantity_skew_partition, shard_partition
from .secagg import SecAggFedAvg
from .strategy import (Bulyan, FaultTolerantFedAvg, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedOpt, FedProx,
                       FedTrimmedAvg, FedYogi, Krum, Strategy)
from .simulation import Simulation, run_simulation
from .types import ClientProxy, EvalResult, FitResult

__all__ = [
    "Bulyan", "Client", "ClientProxy", "FaultTolerantFedAvg", "DPFedAvgAdaptive", "DPFedAvgFixed", "DPFTRLFedAvg", "LocalDP",
    "EvalResult", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedMedian",
    "FedOpt", "FedProx", "FedTrimmedAvg", "FedYogi", "Krum", "FitResult", "History", "ParameterLayout",
    "RayBackend", "SecAggFedAvg", "SequentialBackend", "Simulation", "Strategy", "VectorizedBackend",
    "dirichlet_partition", "iid_partition", "quantity_skew_partition", "run_simulation",
    "shard_partition",
]

"""Federated strategies (Flower's vocabulary) on flat parameter vectors."""

from .base import Strategy, sample_clients, weighted_mean_update
from .bulyan import Bulyan
from .fault_tolerant import FaultTolerantFedAvg
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedmedian import FedMedian
from .fedopt import FedOpt
from .fedprox import FedProx
from .fedtrimmedavg import FedTrimmedAvg
from .fedyogi import FedYogi
from .krum import Krum
from .report import AggregationReport
from .wrapper import StrategyWrapper

__all__ = ["AggregationReport", "Bulyan", "FaultTolerantFedAvg", "FedAdagrad", "FedAdam", "FedAvg",
           "FedAvgM", "FedMedian", "FedOpt", "FedProx", "FedTrimmedAvg", "FedYogi", "Krum", "Strategy",
           "StrategyWrapper", "sample_clients", "weighted_mean_update"]

"""Differential privacy for federated learning.

- :class:`DPFedAvgFixed` — user-level DP-FedAvg, fixed clipping norm (McMahan et al. 2018)
- :class:`DPFedAvgAdaptive` — user-level DP-FedAvg, adaptive clipping (Andrew et al. 2021)
- :class:`DPFTRLFedAvg` — user-level DP-FTRL: tree / banded-MF correlated noise, clients picked
  with min separation instead of Poisson sampling (Kairouz et al. 2021; Choquette-Choo et al. 2023)
- :class:`LocalDP` — local DP-SGD inside each client (``config["local_dp"]``)
"""

from .adaptive import DPFedAvgAdaptive
from .fixed import DPFedAvgFixed
from .ftrl import DPFTRLFedAvg
from .local import LocalDP, LocalDPState

__all__ = ["DPFTRLFedAvg", "DPFedAvgAdaptive", "DPFedAvgFixed", "LocalDP", "LocalDPState"]

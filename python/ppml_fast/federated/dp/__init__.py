"""Differential privacy for federated learning.

- :class:`DPFedAvgFixed` — user-level DP-FedAvg, fixed clipping norm (McMahan et al. 2018)
- :class:`DPFedAvgAdaptive` — user-level DP-FedAvg, adaptive clipping (Andrew et al. 2021)
- :class:`LocalDP` — local DP-SGD inside each client (``config["local_dp"]``)
"""

from .adaptive import DPFedAvgAdaptive
from .fixed import DPFedAvgFixed
from .local import LocalDP, LocalDPState

__all__ = ["DPFedAvgAdaptive", "DPFedAvgFixed", "LocalDP", "LocalDPState"]

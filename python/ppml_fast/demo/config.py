"""The demo's settings: one frozen dataclass, validated, with the defaults of ``ppml-fast demo``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

__all__ = ["MODES", "ROBUST_STRATEGIES", "STRATEGIES", "DemoConfig"]

#: privacy modes: user-level DP-FedAvg (server clips and noises client updates), local DP-SGD
#: inside each client (sample-level DP per device), or no privacy
MODES = ("dp-fedavg", "local-dp", "none")

#: the server strategies of ``--strategy``: the mean-type ones work in every mode
MEAN_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
#: robust aggregation: with local-dp or none only. DP-FedAvg clips each update and noises one
#: weighted mean; a median or Krum of the clipped updates would have no noise of its own
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")
STRATEGIES = MEAN_STRATEGIES + ROBUST_STRATEGIES


@dataclass(frozen=True)
class DemoConfig:
    clients: int = 100
    rounds: int = 30
    clients_per_round: Optional[int] = None  # None: all clients (DP-FedAvg samples each with q = this / clients)
    mode: str = "dp-fedavg"
    # None: calibrated from target_epsilon (dp-fedavg: one sigma; local-dp: each client its own)
    noise_multiplier: Optional[float] = None
    # dp-fedavg: calibrates sigma; local-dp: each client's cap, also with noise_multiplier given
    target_epsilon: Optional[float] = 8.0
    clip_norm: float = 1.0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx's proximal term (Li et al. 2020, eq. 2); other strategies ignore it
    backend: str = "vectorized"
    alpha: float = 0.5  # Dirichlet concentration of the label skew
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.3
    delta: Optional[float] = None  # None: min(1e-5, 1 / (10 * clients))
    accountant: str = "pld"  # tight (Opacus defaults to its PRV); "rdp": an upper bound
    sweep: tuple[float, ...] = (0.5, 1.0, 2.0)  # noise levels, as multiples of the main run's sigma
    seed: int = 0
    seeds: int = 1  # the sweep and the baseline are repeated with seeds seed .. seed + seeds - 1
    output: str = "./ppml-demo-out"
    quick: bool = False

    def __post_init__(self) -> None:
        def int_at_least(name: str, lo: int, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")

        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0; got {v!r}")

        int_at_least("clients", 2)
        int_at_least("rounds", 1)
        int_at_least("clients_per_round", 1, allow_none=True)
        int_at_least("local_epochs", 1)
        int_at_least("batch_size", 1)
        int_at_least("seed", 0)
        int_at_least("seeds", 1)
        if isinstance(self.proximal_mu, bool) or not isinstance(self.proximal_mu, numbers.Real) \
                or not math.isfinite(self.proximal_mu) or self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be a finite number >= 0; got {self.proximal_mu!r}")
        for name in ("clip_norm", "alpha", "lr"):
            positive(name)
        positive("noise_multiplier", allow_none=True)
        positive("target_epsilon", allow_none=True)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if self.mode == "dp-fedavg" and self.strategy in ROBUST_STRATEGIES:
            raise ValueError(
                f"strategy {self.strategy} works with --mode local-dp or --mode none, not dp-fedavg: "
                "DP-FedAvg noises one mean of the clipped updates, and a robust statistic of them "
                "would carry no noise of its own")
        if self.mode == "local-dp" and self.target_epsilon is None:
            raise ValueError("local-dp needs target_epsilon (each client's cap, also with a given "
                             "noise_multiplier)")
        if self.delta is not None and not (isinstance(self.delta, numbers.Real) and 0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1); got {self.delta!r}")
        if self.accountant not in ("rdp", "pld"):
            raise ValueError(f"accountant must be 'rdp' or 'pld'; got {self.accountant!r}")
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(f"clients_per_round must be <= clients ({self.clients}); got {self.clients_per_round}")
        if not self.sweep or any(not (isinstance(s, numbers.Real) and s > 0) for s in self.sweep):
            raise ValueError(f"sweep must hold numbers > 0; got {self.sweep!r}")
        if self.mode == "dp-fedavg" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("dp-fedavg needs noise_multiplier or target_epsilon")

    @property
    def per_round(self) -> int:
        return self.clients if self.clients_per_round is None else self.clients_per_round

    @property
    def target_delta(self) -> float:
        return self.delta if self.delta is not None else min(1e-5, 1.0 / (10 * self.clients))

    def replace(self, **changes) -> "DemoConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def quick_version(cls, **overrides) -> "DemoConfig":
        """The ``--quick`` defaults: 40 clients, 10 rounds, two sweep points."""
        base = dict(clients=40, rounds=10, sweep=(0.5, 2.0), quick=True)
        base.update(overrides)
        return cls(**base)

"""DP-FedAvg with adaptive clipping: the clipping norm C follows a target quantile of the
update norms, privately (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping", NeurIPS, arXiv 1905.03871, Algorithm 1 with the geometric
update; Flower's ``DPFedAvgAdaptive`` / ``DifferentialPrivacyServerSideAdaptiveClipping`` for
the names, TensorFlow Federated's ``adaptive_clip_noise_params`` for the defaults).

Each round, on top of :class:`~ppml_fast.federated.dp.fixed.DPFedAvgFixed`:

- each sampled client i contributes the indicator b_i = [||Δ_i|| <= C], centred to b_i - 1/2 so
  that one user changes the sum by at most 1/2 (Andrew et al. §3; TF Privacy's
  ``QuantileEstimatorQuery``); the server releases
  b̄ = (Σ_i (b_i - 1/2) + N(0, σ_b^2)) / (qN) + 1/2, the noised fraction of unclipped updates;
- C <- C · exp(-η_C (b̄ - γ)) (geometric update), used from the next round on;
- the update's noise multiplier is lowered so that both releases together cost exactly what one
  Gaussian mechanism with the requested ``noise_multiplier`` z costs (Andrew et al., Theorem 1):
  the pair has L2 sensitivity sqrt(1/σ_Δ^2 + 1/(2σ_b)^2) relative to its noise, so
  σ_Δ = (z^-2 - (2σ_b)^-2)^(-1/2), which needs 2σ_b > z. The accountant therefore composes
  PoissonSampledEvent(q, GaussianEvent(z)) per round, the same event as fixed clipping.

γ = ``target_clipped_quantile`` is the fraction of updates that C should leave unclipped (the
quantile of the norms that C tracks; Flower's name, the meaning of Andrew et al.'s γ).
σ_b = ``clipped_count_stddev`` defaults to qN / 20 (Andrew et al. §3 and TFF's default).

Simulation: the server computes the indicators from the update norms it sees (the norms the
native ``weighted_aggregate`` op returns); on real devices each client would compute its own
b_i and send it with the update. The count noise comes from the same noise stream as the
update noise (its own reserved offset range; the key as in
:class:`~ppml_fast.federated.dp.fixed.DPFedAvgFixed`) or from ChaCha20 in ``secure_mode``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ppml_fast.ops import add_gaussian_noise_

from ..strategy.base import Strategy
from ..strategy._hparams import check_positive as _positive
from .fixed import DPFedAvgFixed

__all__ = ["DPFedAvgAdaptive", "update_noise_multiplier"]


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """σ_Δ = (z^-2 - (2 σ_b)^-2)^(-1/2) (Andrew et al. 2021, Theorem 1): the update's noise
    multiplier that, together with count noise σ_b, costs what noise multiplier z costs."""
    z, sb = float(noise_multiplier), float(clipped_count_stddev)
    if not 2 * sb > z:
        raise ValueError(
            f"clipped_count_stddev must be > noise_multiplier / 2 = {z / 2:g} (Andrew et al. 2021, "
            f"Theorem 1); got {sb:g} (the default is 0.05 x the expected clients per round): "
            "raise clipped_count_stddev or clients_per_round, or lower noise_multiplier")
    return (z ** -2 - (2 * sb) ** -2) ** -0.5


class DPFedAvgAdaptive(DPFedAvgFixed):
    """User-level DP around ``strategy`` with adaptive clipping (module docstring).

    Args:
        strategy: the inner, mean-type strategy.
        noise_multiplier: z, the total noise multiplier that the accounting uses (> 0).
        initial_clip_norm: C at round 1 (> 0).
        target_clipped_quantile: γ in [0, 1], the fraction of updates C should leave unclipped.
        clip_norm_lr: η_C (> 0), the step of log C per unit of (b̄ - γ).
        clipped_count_stddev: σ_b (> 0), noise std of the count; None: qN / 20 each round.
        sampling_rate, accountant, secure_mode, seed, journal: as in :class:`DPFedAvgFixed`.
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, initial_clip_norm: float = 0.1,
                 target_clipped_quantile: float = 0.5, clip_norm_lr: float = 0.2,
                 clipped_count_stddev: Optional[float] = None, sampling_rate: Optional[float] = None,
                 accountant: str = "pld", secure_mode: bool = False, seed: Optional[int] = None,
                 journal=None) -> None:
        super().__init__(strategy, noise_multiplier=noise_multiplier, clip_norm=_positive(
            "initial_clip_norm", initial_clip_norm), sampling_rate=sampling_rate,
            accountant=accountant, secure_mode=secure_mode, seed=seed)
        g = target_clipped_quantile
        if isinstance(g, bool) or not isinstance(g, numbers.Real):
            raise TypeError(f"target_clipped_quantile must be a real number; got {type(g).__name__}")
        if not 0.0 <= float(g) <= 1.0:
            raise ValueError(f"target_clipped_quantile must be in [0, 1]; got {g!r}")
        self.target_clipped_quantile = float(g)
        self.clip_norm_lr = _positive("clip_norm_lr", clip_norm_lr)
        if clipped_count_stddev is not None:
            clipped_count_stddev = _positive("clipped_count_stddev", clipped_count_stddev)
            update_noise_multiplier(self.noise_multiplier, clipped_count_stddev)  # 2σ_b > z
        self.clipped_count_stddev_arg = clipped_count_stddev
        self.initial_clip_norm = self.clip_norm
        self._attach_journal(journal)  # last: after every check of the arguments

    def count_stddev(self) -> float:
        """σ_b of the current round (given, or qN / 20)."""
        if self.clipped_count_stddev_arg is not None:
            return self.clipped_count_stddev_arg
        if self.expected_clients is None:
            raise ValueError("the default clipped_count_stddev (qN / 20) needs a configured round")
        return self.expected_clients / 20.0

    def update_noise_multiplier(self) -> float:
        return update_noise_multiplier(self.noise_multiplier, self.count_stddev())

    def _check_round(self, num_clients: int, population: int) -> None:
        sb = self.clipped_count_stddev_arg
        expected = min(num_clients, population)
        update_noise_multiplier(self.noise_multiplier, sb if sb is not None else expected / 20.0)

    def _after_aggregate(self, norms: torch.Tensor, clip_norm: float) -> dict[str, float]:
        centred = torch.tensor([float((norms <= clip_norm).sum()) - 0.5 * norms.numel()], dtype=torch.float64)
        key, start = self._noise_range([centred], step=self.rounds - 1)  # the round just released
        add_gaussian_noise_(centred, self.count_stddev(), seed=key, offset=start,
                            secure=self.secure_mode)
        unclipped = float(centred) / self.expected_clients + 0.5
        self.clip_norm = clip_norm * math.exp(-self.clip_norm_lr * (unclipped - self.target_clipped_quantile))
        return {"dp_unclipped_fraction": unclipped, "dp_next_clip_norm": self.clip_norm}

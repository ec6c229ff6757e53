"""Noise schedules for DPOptimizer, with Opacus's names: each ``step()`` sets the optimizer's
noise multiplier; the optimizer accounts every DP step with the multiplier it used, so a
schedule is accounted step by step (a heterogeneous history).

Cost: the RDP accountant computes one curve per distinct (sample rate, sigma) pair (~6 ms,
cached): stepping a schedule once per epoch is cheap; once per DP step over 10^5 steps is not.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

from ppml_fast.privacy.optimizer import DPOptimizer


class NoiseScheduler:
    """Base class: ``get_noise_multiplier()`` from ``self.last_epoch`` (the number of
    ``step()`` calls so far) and the optimizer's initial multiplier."""

    def __init__(self, optimizer: DPOptimizer) -> None:
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"optimizer must be a DPOptimizer; got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.initial_noise_multiplier = optimizer.noise_multiplier
        self.last_epoch = 0

    def get_noise_multiplier(self) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.last_epoch += 1
        sigma = float(self.get_noise_multiplier())
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"the schedule gave noise multiplier {sigma!r} at epoch {self.last_epoch}; "
                             "expected a finite number >= 0")
        self.optimizer.noise_multiplier = sigma

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "initial_noise_multiplier": self.initial_noise_multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.initial_noise_multiplier = float(state["initial_noise_multiplier"])


def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
    return float(v)


class ExponentialNoise(NoiseScheduler):
    """sigma_t = sigma_0 * gamma^t."""

    def __init__(self, optimizer: DPOptimizer, *, gamma: float) -> None:
        self.gamma = _positive("gamma", gamma)
        super().__init__(optimizer)

    def get_noise_multiplier(self) -> float:
        return self.initial_noise_multiplier * self.gamma ** self.last_epoch


class StepNoise(NoiseScheduler):
    """sigma_t = sigma_0 * gamma^(t // step_size)."""

    def __init__(self, optimizer: DPOptimizer, *, step_size: int, gamma: float) -> None:
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) or step_size < 1:
            raise ValueError(f"step_size must be an int >= 1; got {step_size!r}")
        self.step_size, self.gamma = int(step_size), _positive("gamma", gamma)
        super().__init__(optimizer)

    def get_noise_multiplier(self) -> float:
        return self.initial_noise_multiplier * self.gamma ** (self.last_epoch // self.step_size)


class LambdaNoise(NoiseScheduler):
    """sigma_t = sigma_0 * noise_lambda(t)."""

    def __init__(self, optimizer: DPOptimizer, *, noise_lambda: Callable[[int], float]) -> None:
        if not callable(noise_lambda):
            raise TypeError(f"noise_lambda must be callable; got {type(noise_lambda).__name__}")
        self.noise_lambda = noise_lambda
        super().__init__(optimizer)

    def get_noise_multiplier(self) -> float:
        return self.initial_noise_multiplier * self.noise_lambda(self.last_epoch)

"""PrivacyArguments: how :class:`~ppml_fast.integrations.huggingface.DPTrainer` trains privately
(the target epsilon and delta, the clipping norm, the engine's options), kept apart from the
Trainer's ``TrainingArguments``; every field is checked when it is made, naming the field.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from ppml_fast.accounting import calibration


def _number(name: str, v, *, low: float = 0.0, strict: bool = True, optional: bool = True):
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
            or (v <= low if strict else v < low):
        raise ValueError(f"PrivacyArguments.{name} must be a finite number {'>' if strict else '>='} "
                         f"{low:g}{' or None' if optional else ''}; got {v!r}")
    return float(v)


@dataclass
class PrivacyArguments:
    """How :class:`DPTrainer` trains privately (kept apart from ``TrainingArguments``).

    Args:
        target_epsilon: epsilon after the whole run (the Trainer's ``max_steps`` optimizer
            steps); the noise multiplier is the smallest that reaches it (``epsilon_tolerance``).
        target_delta: delta of every epsilon reported and calibrated (required).
        max_grad_norm: C, the per-record clipping norm (one number; a list with
            ``clipping="per_layer"``, one per trainable parameter).
        noise_multiplier: sigma (noise std / C) instead of ``target_epsilon`` (exactly one).
        clipping: "flat", "per_layer" or "automatic" (the engine's).
        grad_sample_mode: "ghost" or "materialize" (the engine's).
        accountant: "rdp" or "pld"; None: the engine's default.
        max_epsilon: the budget stop; None means ``target_epsilon`` (no stop when only
            ``noise_multiplier`` is given).
        noise_seed: seeds the noise (reproducible, and not private against whoever knows it).
        sampling_seed: seeds the Poisson sampler (idem); None: OS entropy.
        secure_mode: noise from ChaCha20 and sampling from the OS CSPRNG (no seeds then).
        nonfinite: "raise" or "drop" (records whose gradient is NaN/inf), as the engine's.
        epsilon_tolerance: calibration returns sigma with epsilon in [target - tol, target].
    """

    target_epsilon: Optional[float] = None
    target_delta: Optional[float] = None
    max_grad_norm: float | list = 1.0
    noise_multiplier: Optional[float] = None
    clipping: str = "flat"
    grad_sample_mode: str = "ghost"
    accountant: Optional[str] = None
    max_epsilon: Optional[float] = None
    noise_seed: Optional[int] = None
    sampling_seed: Optional[int] = None
    secure_mode: bool = False
    nonfinite: str = "raise"
    epsilon_tolerance: float = 0.01

    def __post_init__(self) -> None:
        _number("target_epsilon", self.target_epsilon)
        _number("max_epsilon", self.max_epsilon)
        _number("noise_multiplier", self.noise_multiplier, strict=False)
        _number("epsilon_tolerance", self.epsilon_tolerance, optional=False)
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("PrivacyArguments: pass exactly one of target_epsilon and noise_multiplier; "
                             f"got target_epsilon={self.target_epsilon!r}, "
                             f"noise_multiplier={self.noise_multiplier!r}")
        delta = _number("target_delta", self.target_delta)
        if delta is None or not delta < 1:
            raise ValueError(f"PrivacyArguments.target_delta must be in (0, 1) (every reported epsilon "
                             f"is at this delta); got {self.target_delta!r}")
        if self.noise_multiplier == 0 and self.max_epsilon is not None:
            raise ValueError("PrivacyArguments: noise_multiplier=0 spends an infinite epsilon at "
                             f"every step, so max_epsilon={self.max_epsilon!r} can never be met")
        if self.accountant is not None and self.accountant not in calibration.ACCOUNTANTS:
            raise ValueError(f"PrivacyArguments.accountant must be one of "
                             f"{sorted(calibration.ACCOUNTANTS)} or None; got {self.accountant!r}")
        for name in ("noise_seed", "sampling_seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
                raise ValueError(f"PrivacyArguments.{name} must be an int >= 0 or None; got {v!r}")
        if not isinstance(self.secure_mode, bool):
            raise TypeError(f"PrivacyArguments.secure_mode must be a bool; got {self.secure_mode!r}")
        if self.secure_mode and (self.noise_seed is not None or self.sampling_seed is not None):
            raise ValueError("PrivacyArguments: secure_mode draws noise and samples from the OS "
                             "CSPRNG; noise_seed and sampling_seed must be None")

    @property
    def budget(self) -> Optional[float]:
        """The epsilon at which training stops: ``max_epsilon``, else ``target_epsilon``."""
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon

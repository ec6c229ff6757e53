"""The audit on the digits task (sklearn's bundled 8x8 digits, :func:`ppml_fast.datasets.digits`)
with a small MLP: what ``ppml-fast audit`` runs; seconds on a CPU."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ppml_fast.audit import _checks
from ppml_fast.audit.dp_sgd import DPSGDConfig, audit_dp_sgd
from ppml_fast.audit.result import AuditResult


def digits_mlp(hidden: int = 64) -> nn.Module:
    """64 pixels -> ``hidden`` ReLU units -> 10 classes."""
    hidden = _checks.count("hidden", hidden, minimum=1)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def audit_digits(
    *,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    canaries: int = 1000,
    canary_kind: str = "dirac",
    observe: str = "gradients",
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1.0,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    runs: Optional[int] = None,
    accountant: str = "rdp",
    hidden: int = 64,
    dp_optimizer_class: Optional[type] = None,
) -> AuditResult:
    """:func:`~ppml_fast.audit.dp_sgd.audit_dp_sgd` on the digits training split (1,438 images)
    with :func:`digits_mlp`, SGD and cross entropy."""
    from ppml_fast.datasets import digits
    from ppml_fast.privacy.optimizer import DPOptimizer

    hidden = _checks.count("hidden", hidden, minimum=1)
    config = DPSGDConfig(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         batch_size=batch_size, epochs=epochs, lr=lr, delta=delta, accountant=accountant)
    train, _ = digits(seed=0)
    return audit_dp_sgd(lambda: digits_mlp(hidden), train, config, canaries=canaries,
                        canary_kind=canary_kind, observe=observe, runs=runs, confidence=confidence,
                        seed=seed, dp_optimizer_class=dp_optimizer_class or DPOptimizer, num_classes=10)

"""Auditing a raw noise mechanism with many trials: run it on two neighbouring inputs (0 and
the sensitivity), score each output, and bound epsilon by the Clopper–Pearson test of
:mod:`ppml_fast.audit.distinguish` — to compare with the epsilon its analysis claims.

``mechanism`` receives a float64 tensor of ``trials`` inputs and returns one output per input;
each element must get its own independent noise (element-wise mechanisms such as the Gaussian
mechanism do), so one call is ``trials`` independent runs of the scalar mechanism. The score
is the output itself (higher: "in", i.e. the input was the sensitivity, not 0): the optimal
statistic for additive noise with a monotone likelihood ratio (Gaussian, Laplace).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from scipy import optimize

from ppml_fast.accounting.analytic_gaussian import gaussian_delta
from ppml_fast.audit import _checks
from ppml_fast.audit.distinguish import Threshold, distinguishing_test
from ppml_fast.audit.result import AuditResult
from ppml_fast.mechanisms import NoiseSource, gaussian_mechanism


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """The exact epsilon of one Gaussian release with noise std ``noise_multiplier`` times the
    sensitivity, at ``delta``: the root of Balle & Wang (ICML 2018) Theorem 8's delta(epsilon),
    which falls as epsilon grows; 0 where delta(0) <= delta already."""
    sigma = _checks.positive("noise_multiplier", noise_multiplier)
    delta = _checks.open_unit("delta", delta)
    if gaussian_delta(sigma, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(sigma, hi) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gaussian_delta(sigma, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def audit_mechanism(
    mechanism: Callable[[torch.Tensor], torch.Tensor],
    *,
    epsilon_claimed: float,
    delta: float,
    trials: int = 200_000,
    sensitivity: float = 1.0,
    confidence: float = 0.95,
    threshold: Threshold = "split",
    seed: int = 0,
) -> AuditResult:
    """Runs ``mechanism`` ``trials`` times on input 0 and ``trials`` times on ``sensitivity``
    and returns the Clopper–Pearson epsilon lower bound next to ``epsilon_claimed``.

    Args:
        mechanism: float64 tensor (trials,) -> tensor (trials,), independent noise per element.
        epsilon_claimed: what the analysis claims at ``delta`` (inf allowed).
        delta: the delta of the claim, in [0, 1).
        trials: runs per input (>= 2).
        sensitivity: the neighbouring input (the other one is 0).
        confidence, threshold, seed: of :func:`~ppml_fast.audit.distinguish.distinguishing_test`.
    """
    if not callable(mechanism):
        raise TypeError(f"mechanism must be callable; got {type(mechanism).__name__}")
    claimed = _checks.real("epsilon_claimed", epsilon_claimed)
    if claimed < 0:
        raise ValueError(f"epsilon_claimed must be >= 0 (inf allowed); got {epsilon_claimed!r}")
    delta = _checks.delta("delta", delta)
    trials = _checks.count("trials", trials, minimum=2)
    sensitivity = _checks.positive("sensitivity", sensitivity)
    confidence = _checks.open_unit("confidence", confidence)
    seed = _checks.seed("seed", seed)
    outputs = []
    for value in (0.0, sensitivity):
        x = torch.full((trials,), value, dtype=torch.float64)
        y = mechanism(x)
        if not isinstance(y, torch.Tensor) or y.shape != (trials,):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"mechanism must return a tensor of shape ({trials},); got {got}")
        outputs.append(y.detach().double().cpu().numpy())
    test = distinguishing_test(outputs[1], outputs[0], delta=delta, confidence=confidence,
                               threshold=threshold, seed=seed)
    return AuditResult(
        epsilon_lower_bound=test.epsilon_lower_bound, epsilon_claimed=claimed,
        confidence=confidence, delta=delta, method="clopper_pearson",
        counts={"tp": test.tp, "fp": test.fp, "tn": test.tn, "fn": test.fn},
        details={"trials_per_input": trials, "sensitivity": sensitivity, "threshold": test.threshold,
                 "threshold_strategy": test.strategy, "tests": test.tests})


def audit_gaussian_mechanism(
    noise_multiplier: float,
    *,
    trials: int = 200_000,
    seed: int = 0,
    sensitivity: float = 1.0,
    delta: float = 1e-5,
    confidence: float = 0.95,
    secure: bool = False,
    threshold: Threshold = "split",
) -> AuditResult:
    """Audits :func:`ppml_fast.mechanisms.gaussian_mechanism` (the native noise op) against its
    exact epsilon (:func:`gaussian_epsilon`). ``seed`` keys the Philox noise and the split;
    ``secure=True`` audits the ChaCha20 sampler instead (not reproducible; ``seed`` then keys
    the split only: a secure noise source cannot be seeded)."""
    sigma = _checks.positive("noise_multiplier", noise_multiplier)
    delta = _checks.open_unit("delta", delta)
    seed = _checks.seed("seed", seed)
    rng = NoiseSource(None if secure else seed, secure=secure)

    def mechanism(x: torch.Tensor) -> torch.Tensor:
        out, _ = gaussian_mechanism(x, sensitivity=sensitivity, noise_multiplier=sigma, rng=rng)
        return out

    result = audit_mechanism(mechanism, epsilon_claimed=gaussian_epsilon(sigma, delta), delta=delta,
                             trials=trials, sensitivity=sensitivity, confidence=confidence,
                             threshold=threshold, seed=seed)
    return dataclasses.replace(result, details={**result.details, "mechanism": "gaussian",
                                                "noise_multiplier": sigma, "secure": secure})

"""Calibration: the noise multiplier for a privacy budget, and the steps a budget affords.

Both search the accountant's epsilon, which is monotone: it falls as sigma grows and grows with
the number of steps (tests/accounting check this with hypothesis). Results err on the private
side: the returned sigma (or number of steps) never spends more than the target epsilon.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

from ppml_fast.accounting import _checks, rdp_math
from ppml_fast.accounting.events import GaussianEvent, PoissonSampledEvent
from ppml_fast.accounting.pld import PLDAccountant
from ppml_fast.accounting.rdp import RDPAccountant

ACCOUNTANTS = {"rdp": RDPAccountant, "pld": PLDAccountant}
_MAX_SIGMA = 1e4


def _check_common(target_epsilon, target_delta, sample_rate, accountant):
    target_epsilon = _checks.positive("target_epsilon", target_epsilon)
    target_delta = _checks.open_unit("target_delta", target_delta)
    sample_rate = _checks.positive("sample_rate", sample_rate)
    if not sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}; got {accountant!r}")
    return target_epsilon, target_delta, sample_rate


def _steps_from(steps: Optional[int], epochs: Optional[float], sample_rate: float) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError("pass exactly one of steps and epochs")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps must be an int >= 1; got {steps!r}")
        return int(steps)
    epochs = _checks.positive("epochs", epochs)
    return max(1, math.ceil(epochs / sample_rate))  # an epoch is 1 / q expected steps


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps (the DP-SGD event) at ``delta``."""
    noise_multiplier = _checks.positive("noise_multiplier", noise_multiplier)
    _, delta, sample_rate = _check_common(1.0, delta, sample_rate, accountant)
    steps = _steps_from(steps, None, sample_rate)
    acc = ACCOUNTANTS[accountant]()
    acc.compose(PoissonSampledEvent(sample_rate, GaussianEvent(noise_multiplier)), steps)
    return acc.get_epsilon(delta)


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: Optional[int] = None,
    epochs: Optional[float] = None,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier sigma (to within the tolerance) whose epsilon is at most
    ``target_epsilon``: returns sigma with target - tolerance <= epsilon(sigma) <= target, or
    the sigma of an epsilon below that window when no smaller sigma reaches it.

    Raises ValueError when even sigma = 1e4 spends more than the target.
    """
    target_epsilon, target_delta, sample_rate = _check_common(
        target_epsilon, target_delta, sample_rate, accountant
    )
    n = _steps_from(steps, epochs, sample_rate)
    tol = _checks.positive("epsilon_tolerance", epsilon_tolerance)

    def eps(sigma: float) -> float:
        return epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=n,
                       delta=target_delta, accountant=accountant)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > _MAX_SIGMA:
            raise ValueError(
                f"target_epsilon={target_epsilon} is out of reach: even noise_multiplier="
                f"{_MAX_SIGMA:g} spends more at delta={target_delta}, sample_rate={sample_rate}, "
                f"steps={n}"
            )
    lo = 0.0
    for _ in range(200):
        if target_epsilon - eps(hi) <= tol or hi - lo < 1e-9 * hi:
            break
        mid = (lo + hi) / 2 if lo > 0 else hi / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def get_steps(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    noise_multiplier: float,
    accountant: str = "rdp",
    max_steps: int = 10**9,
) -> int:
    """The largest number of steps whose epsilon is at most ``target_epsilon`` (0 if not even
    one step fits)."""
    target_epsilon, target_delta, sample_rate = _check_common(
        target_epsilon, target_delta, sample_rate, accountant
    )
    noise_multiplier = _checks.positive("noise_multiplier", noise_multiplier)
    event = PoissonSampledEvent(sample_rate, GaussianEvent(noise_multiplier))
    if accountant == "rdp":
        one = RDPAccountant().compose(event)
        rdp_one = one.rdp  # epsilon(T) = conversion of T * rdp_one: no recomposition per probe

        def fits(t: int) -> bool:
            return rdp_math.epsilon_from_rdp(one.orders, t * rdp_one, target_delta) <= target_epsilon
    else:
        def fits(t: int) -> bool:
            acc = ACCOUNTANTS[accountant]().compose(event, t)
            return acc.get_epsilon(target_delta) <= target_epsilon

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= max_steps and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_steps + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo

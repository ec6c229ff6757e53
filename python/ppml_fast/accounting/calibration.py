"""Calibration: the noise multiplier for a privacy budget, and the steps a budget affords.

Both search the accountant's epsilon, which is monotone: it falls as sigma grows and grows with
the number of steps (tests/accounting check this with hypothesis). Results err on the private
side: the returned sigma (or number of steps) never spends more than the target epsilon.

The default accountant is "pld" (privacy loss distributions: the tight one, within 1% of
Opacus's default PRV accountant); "rdp" stays available (an upper bound, 4-69% looser in
epsilon). A PLD search starts from the RDP answer, which is on the private side of it:
the PLD accountant reports min(PLD, RDP), so a sigma (number of steps) that RDP allows, PLD
allows too. The search interpolates log epsilon against log sigma (epsilon against steps),
safeguarded by bisection, so a PLD calibration costs a handful of PLD queries.
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
DEFAULT_ACCOUNTANT = "pld"
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
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
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
    accountant: str = DEFAULT_ACCOUNTANT,
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier sigma (to within the tolerance) whose epsilon is at most
    ``target_epsilon``: returns sigma with target - tol <= epsilon(sigma) <= target, where
    tol = min(epsilon_tolerance, target_epsilon / 100), or
    the sigma of an epsilon below that window when no smaller sigma reaches it.

    Raises ValueError when even sigma = 1e4 spends more than the target, and when
    ``target_delta`` is at least 1 - (1 - q)^steps (epsilon is then 0 without any noise).
    """
    target_epsilon, target_delta, sample_rate = _check_common(
        target_epsilon, target_delta, sample_rate, accountant
    )
    n = _steps_from(steps, epochs, sample_rate)
    # a record takes part in at least one of the n steps with probability 1 - (1 - q)^n, the
    # total variation between the runs with and without it whatever the noise: at a delta that
    # large epsilon is 0 for every sigma, even none, so there is no smallest one to search for
    # (the search would shrink sigma to 1e-61 over 200 PLD queries, minutes)
    used = 1.0 if sample_rate == 1 else -math.expm1(n * math.log1p(-sample_rate))
    if target_delta >= used:
        raise ValueError(
            f"target_delta={target_delta:g} is at least {used:.6g}, the probability that a record "
            f"is sampled at all in {n} steps at sample_rate={sample_rate:g}: epsilon is 0 at that "
            "delta with any noise multiplier, even without noise, so no noise multiplier is "
            "determined by it; such a delta protects nothing (take delta well below "
            "1 / the number of records)")
    # an absolute tolerance alone is met at once by a target at or below it (target 0.01,
    # tolerance 0.01 accepted the first doubling, sigma 128, where 90 suffices): cap it at 1%
    # of the target, so that the answer is within 1% of the smallest sigma's epsilon
    tol = min(_checks.positive("epsilon_tolerance", epsilon_tolerance), 0.01 * target_epsilon)

    def eps(sigma: float) -> float:
        return epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=n,
                       delta=target_delta, accountant=accountant)

    if accountant == "rdp":
        hi = 1.0
        while eps(hi) > target_epsilon:
            hi *= 2.0
            if hi > _MAX_SIGMA:
                raise ValueError(
                    f"target_epsilon={target_epsilon} is out of reach: even noise_multiplier="
                    f"{_MAX_SIGMA:g} spends more at delta={target_delta}, sample_rate={sample_rate}, "
                    f"steps={n}"
                )
    else:  # RDP's sigma is on the private side of PLD's (PLD reports min(PLD, RDP))
        hi = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                  sample_rate=sample_rate, steps=n, accountant="rdp",
                                  epsilon_tolerance=tol)
    e_hi = eps(hi)
    lo, e_lo = 0.0, math.inf  # lo: a sigma known to overspend (0: none yet)
    shrink = 0.75  # without one, step down by 0.75 (PLD's sigma is 4.5-26% below RDP's), then halve
    for _ in range(200):
        if target_epsilon - e_hi <= tol or hi - lo < 1e-9 * hi:
            break
        if lo == 0.0:
            mid = shrink * hi
        else:  # interpolate log eps against log sigma towards the window's middle, safeguarded
            want = math.log(target_epsilon - tol / 2)
            x0, x1, y0, y1 = math.log(lo), math.log(hi), math.log(e_lo), math.log(max(e_hi, 1e-300))
            x = x1 if y0 == y1 else x0 + (want - y0) * (x1 - x0) / (y1 - y0)
            span = x1 - x0
            mid = math.exp(min(max(x, x0 + 0.05 * span), x1 - 0.05 * span))
        e_mid = eps(mid)
        if e_mid > target_epsilon:
            lo, e_lo = mid, e_mid
        else:
            hi, e_hi, shrink = mid, e_mid, 0.5
    return hi


def get_steps(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    noise_multiplier: float,
    accountant: str = DEFAULT_ACCOUNTANT,
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
        terms = one._terms()

        def eps_at(t: int) -> float:
            return rdp_math.epsilon_from_rdp(one.orders, t * rdp_one, target_delta, terms=terms)
    else:
        def eps_at(t: int) -> float:
            return ACCOUNTANTS[accountant]().compose(event, t).get_epsilon(target_delta)

    if accountant == "rdp":
        lo = 1
        if eps_at(1) > target_epsilon:
            return 0
    else:  # what RDP affords, PLD affords (it reports min(PLD, RDP))
        lo = get_steps(target_epsilon=target_epsilon, target_delta=target_delta,
                       sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                       accountant="rdp", max_steps=max_steps)
        if lo == 0:
            if eps_at(1) > target_epsilon:
                return 0
            lo = 1
    e_lo = eps_at(lo)
    hi, e_hi = lo, e_lo
    while e_hi <= target_epsilon:  # grow: x2 for RDP; x1.25 from the RDP answer for PLD
        if hi > max_steps:
            return max_steps
        lo, e_lo = hi, e_hi
        hi = min(max(hi + 1, int(hi * (2.0 if accountant == "rdp" else 1.25))), max_steps + 1)
        e_hi = eps_at(hi) if hi <= max_steps else math.inf
    while hi - lo > 1:  # eps_at(lo) <= target < eps_at(hi): interpolate, safeguarded
        if math.isfinite(e_hi) and e_hi > e_lo:
            t = lo + (target_epsilon - e_lo) * (hi - lo) / (e_hi - e_lo)
        else:
            t = (lo + hi) / 2
        gap = hi - lo
        mid = int(min(max(t, lo + max(1, 0.05 * gap)), hi - max(1, 0.05 * gap)))
        mid = min(max(mid, lo + 1), hi - 1)
        e_mid = eps_at(mid)
        if e_mid <= target_epsilon:
            lo, e_lo = mid, e_mid
        else:
            hi, e_hi = mid, e_mid
    return lo

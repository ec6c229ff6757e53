"""Issue 15, item 9: Laplace noise had a bound (|noise| <= 73.4 scale units: (Z1^2 + Z2^2 - Z3^2
- Z4^2) / 2 of Box-Muller normals with |Z| <= 8.57), so the pure ε the LaplaceEvent claims did
not hold. The sampler now has the full tail (ppml_fast.laplace_sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppml_fast.laplace_sampling import TAIL_STEP, unbounded_exponential, unbounded_laplace
from ppml_fast.mechanisms import NoiseSource, laplace_mechanism, report_noisy_max

Z_MAX = math.sqrt(2 * 53 * math.log(2))  # the Box-Muller radius bound of the native sampler


class ExtremeSource(NoiseSource):
    """A source whose normals stay within the native sampler's bound but sit at its edge: the
    first element of each of the first ``extreme_calls`` draws is -Z_MAX, everything else 0."""

    def __init__(self, extreme_calls: int) -> None:
        super().__init__(0)
        self.left = extreme_calls

    def normal(self, shape, dtype=torch.float64):
        out = torch.zeros(shape, dtype=dtype)
        if self.left > 0 and out.numel():
            out.view(-1)[0] = -Z_MAX
            self.left -= 1
        return out


def test_laplace_noise_passes_the_old_bound_of_73_4_scale_units():
    # the old sampler returned (73.4 + 0 - 0 - 0) / 2 = 36.7 here, and never more than 73.4
    noisy, _ = laplace_mechanism(0.0, sensitivity=1.0, scale=1.0, rng=ExtremeSource(6))
    assert noisy > 73.4 * 1.0
    # the first draw and five redraws land at the edge (each adds TAIL_STEP), the seventh at 0:
    # E1 = 6 T + ln 2 (-ln Phi(0)), E2 = ln 2
    assert noisy == pytest.approx(6 * TAIL_STEP, rel=1e-12)
    e = unbounded_exponential(ExtremeSource(6).normal, (3,))
    assert float(e[0]) == pytest.approx(6 * TAIL_STEP + math.log(2), rel=1e-12)
    assert float(e[1]) == pytest.approx(math.log(2), rel=1e-12)


def test_scaled_noise_reaches_far_tails_with_the_sensitivity():
    noisy, event = laplace_mechanism(np.zeros(2), sensitivity=0.5, scale=4.0, rng=ExtremeSource(10))
    assert event.scale == 4.0
    assert noisy[0] > 73.4 * 2.0  # scale x sensitivity = 2


def _laplace_cdf(x: np.ndarray) -> np.ndarray:
    return np.where(x < 0, 0.5 * np.exp(np.minimum(x, 0)), 1 - 0.5 * np.exp(-np.maximum(x, 0)))


def test_laplace_samples_follow_the_laplace_distribution():
    n = 200_000
    noisy, _ = laplace_mechanism(np.zeros(n), sensitivity=1.0, scale=1.0, rng=NoiseSource(21))
    x = np.sort(noisy)
    emp = np.arange(1, n + 1) / n
    ks = float(np.max(np.abs(emp - _laplace_cdf(x))))
    assert ks < 1.63 / math.sqrt(n)  # the 1% critical value of the KS statistic
    # tail frequencies, against the exact P(|L| > t) = e^-t (5 standard deviations)
    for t in (3.0, 6.0, 9.0):
        p = math.exp(-t)
        count = int((np.abs(x) > t).sum())
        assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (t, count, n * p)


def test_exponential_tail_beyond_the_step_is_exp1_again():
    # conditional on E >= T the sampler adds T to a fresh Exp(1): check P(E > T + 1 | E > T)
    # through the second stage directly (a first-stage draw above T has probability e^-20)
    draws = [0]

    def normal(shape):
        draws[0] += 1
        if draws[0] == 1:  # everything lands in the tail on the first draw
            return torch.full(shape, -Z_MAX, dtype=torch.float64)
        return NoiseSource(draws[0]).normal(shape)

    e = unbounded_exponential(normal, (100_000,))
    assert bool((e >= TAIL_STEP).all())
    rest = (e - TAIL_STEP).numpy()
    assert abs(rest.mean() - 1.0) < 5 / math.sqrt(rest.size)
    assert abs(float((rest > 1.0).mean()) - math.exp(-1)) < 5 * math.sqrt(0.25 / rest.size)


def test_report_noisy_max_with_laplace_uses_the_unbounded_sampler():
    idx, event = report_noisy_max(np.array([[0.0, 0.0]]), sensitivity=1.0, laplace_scale=1.0,
                                  rng=ExtremeSource(5))
    assert int(idx[0]) == 0  # element 0's noise is 5 T = 100, element 1's is ln 2 - ln 2 = 0


def test_unbounded_laplace_shapes():
    src = NoiseSource(4)
    assert unbounded_laplace(src.normal, ()).shape == ()
    assert unbounded_laplace(src.normal, (3, 2)).shape == (3, 2)
    assert unbounded_laplace(src.normal, (0,)).shape == (0,)

"""Review s9: almost noiseless histories (epsilon ~1e8) in the PLD accountant, the calibration
and ``ppml-fast epsilon`` / ``noise-multiplier``: numbers or clear errors, never an overflow.

The PLD grid of such a history is coarsened to fit ``max_grid_points`` until its step d is
hundreds of loss units, where e^d overflows a float; pld_math forms the connect-the-dots masses
from e^-d there (the same masses in exact arithmetic)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from ppml_fast.accounting import (
    GaussianEvent,
    LaplaceEvent,
    PLDAccountant,
    PoissonSampledEvent,
    RDPAccountant,
    calibration,
    pld_math,
)
from ppml_fast.cli import main as cli_main
from ppml_fast.privacy import PrivacyEngine

NOISELESS = PoissonSampledEvent(0.1, GaussianEvent(1e-3))  # one step's loss ~ 1 / (2 sigma^2) = 5e5


def _stencil_direct(v: np.ndarray, step: float) -> np.ndarray:
    """Doroshenko et al. 2022, Algorithm 1, interior masses as written (in long double)."""
    v = np.asarray(v, dtype=np.longdouble)
    diff = np.diff(v)
    e = np.exp(np.longdouble(step))
    return np.asarray((diff[1:] - e * diff[:-1]) / (e - 1), dtype=float)


@pytest.mark.parametrize("step", [1e-4, 0.3, 50.0, 699.0, 700.5, 709.0])
def test_stencil_is_the_direct_formula_on_both_sides_of_the_switch(step):
    v = np.array([1.0, 0.7, 0.4, 0.39, 0.1, 1e-3, 0.0])
    np.testing.assert_allclose(pld_math._stencil(v, step), _stencil_direct(v, step), rtol=1e-12, atol=1e-300)
    want = float(1 / (np.exp(np.longdouble(step)) - 1))
    assert pld_math._inv_expm1(step) == pytest.approx(want, rel=1e-13)


def test_stencil_where_e_to_the_step_overflows():
    """d = 800: 1 / (e^d - 1) = e^-d (to double precision) and the e^d term is the previous
    difference over (1 - e^-d)."""
    v = np.array([1.0, 0.5, 0.2, 0.0])
    got = pld_math._stencil(v, 800.0)
    diff = np.diff(v)
    np.testing.assert_allclose(got, diff[1:] * math.exp(-800.0) - diff[:-1], rtol=1e-15)
    assert np.all(np.isfinite(got))


def test_almost_noiseless_epsilon_is_the_sampled_count_times_one_steps_loss():
    """sigma 1e-3, q 0.1, 10^4 steps: ~1000 sampled steps of loss ~5e5 each; at delta 1e-5 the
    binomial's upper tail (~1130) bounds the count, so epsilon ~ 1130 x 5e5 (an upper bound;
    RDP's is 5.1e9). Finite, and not below what the sampled count forces."""
    acc = PLDAccountant().compose(NOISELESS, 10_000)
    eps = acc.get_epsilon(1e-5)
    assert math.isfinite(eps) and 1000 * 5e5 < eps < RDPAccountant().compose(NOISELESS, 10_000).get_epsilon(1e-5)
    pld_only = PLDAccountant().compose(NOISELESS, 10_000)
    pld_only._rdp_cache = False  # the PLD alone, not min(PLD, RDP)
    assert pld_only.get_epsilon(1e-5) == eps
    assert pld_only._composed()[0].step > 700  # the case where e^step overflows
    assert 0.0 < acc.get_delta(1e8) <= 1.0


def test_almost_noiseless_laplace_and_engine_paths():
    """The same grid maths behind a sampled Laplace history, and behind
    PrivacyEngine.get_epsilon (default accountant 'pld', as DPTrainer's epsilon log)."""
    lap = PLDAccountant().compose(PoissonSampledEvent(0.1, LaplaceEvent(1e-8)), 1000)
    assert 1e10 < lap.get_epsilon(1e-5) < math.inf
    engine = PrivacyEngine()
    assert engine.accountant_name == "pld"
    engine.accountant.compose(NOISELESS, 10_000)
    assert engine.get_epsilon(1e-5) == PLDAccountant().compose(NOISELESS, 10_000).get_epsilon(1e-5)


def test_an_overflow_in_the_grid_maths_gives_the_trivial_bound(monkeypatch):
    """The safety net: should the PLD maths overflow, epsilon is +inf (delta 1), a valid upper
    bound, and the reported value is the RDP bound where RDP supports the history."""
    def boom(*a, **k):
        raise OverflowError("math range error")

    monkeypatch.setattr(pld_math, "compose", boom)
    gauss = PLDAccountant().compose(PoissonSampledEvent(0.01, GaussianEvent(1.0)), 100)
    rdp = RDPAccountant().compose(PoissonSampledEvent(0.01, GaussianEvent(1.0)), 100)
    assert gauss.get_epsilon(1e-5) == rdp.get_epsilon(1e-5)
    assert gauss.get_delta(1.0) == rdp.get_delta(1.0)
    lap = PLDAccountant().compose(PoissonSampledEvent(0.01, LaplaceEvent(1.0)), 100)  # no RDP
    assert lap.get_epsilon(1e-5) == math.inf and lap.get_delta(1.0) == 1.0


def test_cli_epsilon_prints_a_number(capsys):
    rc = cli_main(["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "0.001", "--steps", "10000",
                   "--delta", "1e-5"])
    out = capsys.readouterr()
    assert rc == 0 and "epsilon = 5.6" in out.out and "Traceback" not in out.err


def test_noise_multiplier_for_a_delta_that_protects_nothing_is_refused_at_once(capsys):
    """delta >= 1 - (1 - q)^T (the chance a record is used at all): epsilon is 0 without any
    noise, so no smallest sigma exists; the search shrank sigma to 1e-61 over 200 PLD queries
    (minutes, then an overflow). Refused at once, saying why."""
    start = time.perf_counter()
    rc = cli_main(["noise-multiplier", "--target-epsilon", "1", "--delta", "0.5", "--sample-rate", "0.01",
                   "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "sampled at all" in err and time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="sampled at all"):
        calibration.get_noise_multiplier(target_epsilon=1.0, target_delta=0.02, sample_rate=0.01, steps=2)
    # just below that probability the search is well posed and ends
    sigma = calibration.get_noise_multiplier(target_epsilon=1.0, target_delta=0.009, sample_rate=0.01, steps=1)
    assert 0.0 < sigma and calibration.epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=1,
                                               delta=0.009) <= 1.0

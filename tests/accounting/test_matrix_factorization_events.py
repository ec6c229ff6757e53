"""Accounting events of matrix-factorization strategies: the per-step events compose to exactly the
Gaussian mechanism with sensitivity sqrt(S_t) (our PLD and RDP accountants, and dp_accounting's),
and amplified BandMF under cyclic Poisson sampling gives jax_privacy's ``amplified_bandmf_event``."""

from __future__ import annotations

import logging
import math

import dp_accounting as dpa
import numpy as np
import pytest

from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent, RDPAccountant
from ppml_fast.accounting import matrix_factorization as mf
from ppml_fast.accounting.events import SelfComposedEvent
from ppml_fast.accounting.matrix_factorization import Participation

T = 64
SIGMA = 1.3
DELTA = 1e-5


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PPML_FAST_CACHE", str(tmp_path))  # optimise_banded's disk cache


@pytest.fixture(autouse=True, scope="module")
def _quiet_dp_accounting():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


STRATEGIES = {
    "identity": lambda: mf.identity(T),
    "tree": lambda: mf.tree(T),
    "bandmf4": lambda: mf.optimize_banded(T, 4),
    "mixed_sign": lambda: mf.banded([1.0, 0.8, -0.6, 0.3], T),
}
SCHEMAS = {
    "single": Participation("single"),
    "epoch8": Participation("every_epoch", steps_per_epoch=8),
    "epoch2": Participation("every_epoch", steps_per_epoch=2),
    "shuffled8": Participation("shuffled", steps_per_epoch=8),
    "minsep8_k5": Participation("min_separated", min_separation=8, max_participations=5),
}


def _events(s, p, n=T):
    return [s.step_event(t, SIGMA, p) for t in range(n)]


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_step_events_compose_to_one_gaussian(name, schema):
    s, p = STRATEGIES[name](), SCHEMAS[schema]
    evs = _events(s, p)
    assert evs[0] is not None  # step 0 always releases something
    for n in (1, 7, T):  # the history after n steps = Gaussian with sensitivity sqrt(S_{n-1})
        S = s.sensitivity_sq_prefix(n - 1, p)
        inv = sum(1.0 / e.noise_multiplier ** 2 for e in evs[:n] if e is not None)
        assert inv == pytest.approx(S / SIGMA**2, rel=1e-12)
        one = GaussianEvent(SIGMA / math.sqrt(S))
        assert s.event(SIGMA, p, steps=n) == one
        for acc in (PLDAccountant, RDPAccountant):
            a, b = acc(), acc().compose(one)
            for e in evs[:n]:
                if e is not None:
                    a.compose(e)
            assert a.get_epsilon(DELTA) == pytest.approx(b.get_epsilon(DELTA), rel=1e-9)
    for t, e in enumerate(evs):  # None exactly where S does not grow
        grew = s.sensitivity_sq_prefix(t, p) > s.sensitivity_sq_prefix(t - 1, p)
        assert (e is not None) == grew


@pytest.mark.parametrize("name, schema", [("tree", "single"), ("bandmf4", "epoch8")])
def test_step_events_against_dp_accounting(name, schema):
    """dp_accounting 0.6 composes the same per-step Gaussians to the same epsilon as one Gaussian
    with sensitivity sqrt(S_{T-1}) (RDP: additive, exact), and its PLD agrees with ours."""
    s, p = STRATEGIES[name](), SCHEMAS[schema]
    evs = [e for e in _events(s, p) if e is not None]
    S = s.sensitivity_sq_prefix(T - 1, p)
    per_step = dpa.ComposedDpEvent([dpa.GaussianDpEvent(e.noise_multiplier) for e in evs])
    whole = dpa.GaussianDpEvent(SIGMA / math.sqrt(S))
    rdp_steps = dpa.rdp.RdpAccountant().compose(per_step).get_epsilon(DELTA)
    rdp_whole = dpa.rdp.RdpAccountant().compose(whole).get_epsilon(DELTA)
    assert rdp_steps == pytest.approx(rdp_whole, rel=1e-9)
    ours_rdp = RDPAccountant().compose(s.event(SIGMA, p)).get_epsilon(DELTA)
    assert ours_rdp == pytest.approx(rdp_whole, rel=0.02)  # different order grids
    ours = PLDAccountant().compose(s.event(SIGMA, p)).get_epsilon(DELTA)  # exact (Balle & Wang)
    theirs = dpa.pld.PLDAccountant().compose(whole).get_epsilon(DELTA)
    assert ours <= theirs * (1 + 1e-6) and ours == pytest.approx(theirs, rel=1e-3)


@pytest.mark.parametrize("steps, bands, coef", [(64, 8, None), (60, 8, None), (30, 2, [2.0, 1.0])])
def test_cyclic_poisson_is_jax_privacy_amplified_bandmf(steps, bands, coef):
    """Thm. 4 of arXiv 2306.08153 as jax_privacy states it (``accounting.amplified_bandmf_event``:
    ceil(iterations / num_bands) rounds of DP-SGD with the noise multiplier over zeta)."""
    s = mf.optimize_banded(steps, bands) if coef is None else mf.banded(coef, steps)
    q = 0.1
    p = Participation("cyclic_poisson", min_separation=bands, sample_rate=q)
    zeta = s.max_column_norm()
    assert zeta == pytest.approx(1.0 if coef is None else math.sqrt(5.0), rel=1e-12)
    evs = [s.step_event(t, SIGMA, p) for t in range(steps)]
    for t, e in enumerate(evs):
        if t % bands:
            assert e is None
        else:
            assert e == PoissonSampledEvent(q, GaussianEvent(SIGMA / zeta))
    rounds = math.ceil(steps / bands)
    assert sum(e is not None for e in evs) == rounds
    assert s.event(SIGMA, p) == SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(SIGMA / zeta)), rounds)
    ours = PLDAccountant()
    for e in evs:
        if e is not None:
            ours.compose(e)
    jp = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(SIGMA / zeta)), rounds)
    theirs = dpa.pld.PLDAccountant().compose(jp).get_epsilon(DELTA)
    assert ours.get_epsilon(DELTA) == pytest.approx(theirs, rel=1e-5)
    # amplification helps: far below the unamplified Gaussian of the same pattern
    unamp = GaussianEvent(SIGMA / math.sqrt(s.sensitivity_sq_prefix(steps - 1, p)))
    assert ours.get_epsilon(DELTA) < PLDAccountant().compose(unamp).get_epsilon(DELTA)


def test_cyclic_poisson_identity_is_dp_sgd():
    s = mf.identity(10)
    p = Participation("cyclic_poisson", min_separation=1, sample_rate=0.01)
    assert all(s.step_event(t, 2.0, p) == PoissonSampledEvent(0.01, GaussianEvent(2.0)) for t in range(10))


def test_epsilon_grows_with_steps():
    s, p = mf.tree(T), SCHEMAS["epoch8"]
    eps = [PLDAccountant().compose(s.event(SIGMA, p, steps=n)).get_epsilon(DELTA) for n in range(1, T + 1)]
    assert np.all(np.diff(eps) >= 0) and eps[-1] > eps[0]


def test_tiny_increment_is_rounded_up_not_refused():
    """An increment below GaussianEvent's range (noise multiplier > 1e100) becomes 1e100: a
    larger privacy loss than the true one, never an error mid-run."""
    s = mf.banded([1e-120], 4)
    e = s.step_event(0, 1.0, Participation("single"))
    assert e == GaussianEvent(1e100)

"""Benchmark cases of the accountants (issue 3, item 9) against Google's dp-accounting and
Opacus, in the same run: the DP-SGD setting of ../shared/ANCHORS.md, q = 0.01, sigma = 1.0,
T = 10^5 steps, delta = 1e-5.

- ``rdp``: epsilon from a fresh accountant (the RDP curve computed, not cached) — target 10 ms;
- ``pld``: epsilon from a fresh PLD accountant — target 1 s; dp-accounting's PLD at its
  1e-4 grid and Opacus's PRV accountant are the baselines (the PRV one takes seconds: costly);
- ``calibrate``: ``get_noise_multiplier`` for epsilon = 3 over those 10^5 steps (RDP, epsilon
  tolerance 0.01 for both) — target 0.5 s.
The absolute targets are in the case names; the table's ratios are baseline / ppml_fast.
A baseline that is not installed shows up as an error row and the run goes on (``pip install
".[bench]"`` installs both).
"""

from __future__ import annotations

from ppml_fast.benchmarks.cases import Case, Impl, Inputs

Q, SIGMA, STEPS, DELTA = 0.01, 1.0, 100_000, 1e-5
TARGET_EPSILON = 3.0
SIZES = {"full": STEPS, "tiny": 1_000}


# -- RDP ------------------------------------------------------------------------------------------
def _rdp_ppml(x: Inputs):
    from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent, RDPAccountant

    event = PoissonSampledEvent(Q, GaussianEvent(SIGMA))
    return lambda: RDPAccountant().compose(event, x["steps"]).get_epsilon(DELTA)


def _dpa_event(steps: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(SIGMA)), steps
    )


def _rdp_dp_accounting(x: Inputs):
    from dp_accounting.rdp import RdpAccountant

    event = _dpa_event(x["steps"])
    return lambda: RdpAccountant().compose(event).get_epsilon(DELTA)


def _opacus_accountant(cls_name: str, steps: int):
    from opacus import accountants

    acc = getattr(accountants, cls_name)()
    acc.history = [(SIGMA, Q, steps)]
    return acc


def _rdp_opacus(x: Inputs):
    steps = x["steps"]
    return lambda: _opacus_accountant("RDPAccountant", steps).get_epsilon(DELTA)


# -- PLD ------------------------------------------------------------------------------------------
def _pld_ppml(x: Inputs):
    from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent
    from ppml_fast.accounting.pld import PLDAccountant

    event = PoissonSampledEvent(Q, GaussianEvent(SIGMA))
    return lambda: PLDAccountant().compose(event, x["steps"]).get_epsilon(DELTA)


def _pld_dp_accounting(x: Inputs):
    from dp_accounting.pld import PLDAccountant

    event = _dpa_event(x["steps"])
    return lambda: PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(DELTA)


def _prv_opacus(x: Inputs):
    steps = x["steps"]
    return lambda: _opacus_accountant("PRVAccountant", steps).get_epsilon(DELTA)


# -- calibration ----------------------------------------------------------------------------------
def _calibrate_ppml(x: Inputs):
    from ppml_fast.accounting import get_noise_multiplier

    steps = x["steps"]
    return lambda: get_noise_multiplier(target_epsilon=TARGET_EPSILON, target_delta=DELTA,
                                        sample_rate=Q, steps=steps, epsilon_tolerance=0.01,
                                        accountant="rdp")  # as the Opacus baseline (default: pld)


def _calibrate_opacus(x: Inputs):
    from opacus.accountants.utils import get_noise_multiplier

    steps = x["steps"]
    return lambda: get_noise_multiplier(target_epsilon=TARGET_EPSILON, target_delta=DELTA,
                                        sample_rate=Q, steps=steps, accountant="rdp",
                                        epsilon_tolerance=0.01)


def accounting_cases(sizes: str = "full") -> list[Case]:
    """The accountants' cases (``"tiny"``: 1,000 steps, for tests of the harness)."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {', '.join(map(repr, SIZES))}; got {sizes!r}")
    steps = SIZES[sizes]
    setup = lambda: {"steps": steps}  # noqa: E731
    t = f"T={steps:,}"
    return [
        Case("accounting-rdp", f"RDP epsilon, q={Q} sigma={SIGMA} {t} (target <= 10 ms)", setup, (
            Impl("ppml", "ppml_fast RDPAccountant", _rdp_ppml, role="ppml_fast"),
            Impl("dp_accounting", "dp-accounting RdpAccountant", _rdp_dp_accounting),
            Impl("opacus", "Opacus RDPAccountant", _rdp_opacus),
        )),
        Case("accounting-pld", f"PLD epsilon, q={Q} sigma={SIGMA} {t} (target <= 1 s)", setup, (
            Impl("ppml", "ppml_fast PLDAccountant", _pld_ppml, role="ppml_fast"),
            Impl("dp_accounting", "dp-accounting PLD, grid 1e-4", _pld_dp_accounting),
            Impl("opacus_prv", "Opacus PRVAccountant", _prv_opacus, costly=True),
        )),
        Case("accounting-calibrate", f"get_noise_multiplier eps={TARGET_EPSILON} {t} (target <= 0.5 s)",
             setup, (
            Impl("ppml", "ppml_fast get_noise_multiplier (RDP)", _calibrate_ppml, role="ppml_fast"),
            Impl("opacus", "Opacus get_noise_multiplier (RDP)", _calibrate_opacus),
        )),
    ]

"""Privacy accounting: events, and accountants that turn them into (epsilon, delta).

Pure maths: imports nothing from the rest of ppml_fast (DESIGN.md). Available today: the
events, the RDP accountant and calibration (noise multiplier for a budget, steps a budget
affords); PLD accounting builds on the same interface.
"""

from ppml_fast.accounting.events import (
    ComposedEvent,
    Event,
    GaussianEvent,
    LaplaceEvent,
    PoissonSampledEvent,
    RandomizedResponseEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    UnsupportedEventError,
)
from ppml_fast.accounting.analytic_gaussian import analytic_gaussian_sigma, gaussian_delta
from ppml_fast.accounting.calibration import epsilon, get_noise_multiplier, get_steps
from ppml_fast.accounting.rdp import RDPAccountant

__all__ = [
    "ComposedEvent",
    "Event",
    "GaussianEvent",
    "LaplaceEvent",
    "PoissonSampledEvent",
    "RandomizedResponseEvent",
    "SampledWithoutReplacementEvent",
    "RDPAccountant",
    "SelfComposedEvent",
    "UnsupportedEventError",
    "analytic_gaussian_sigma",
    "epsilon",
    "gaussian_delta",
    "get_noise_multiplier",
    "get_steps",
]

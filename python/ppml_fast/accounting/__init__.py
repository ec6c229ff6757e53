"""Privacy accounting: events, and accountants that turn them into (epsilon, delta).

Pure maths: imports nothing from the rest of ppml_fast (DESIGN.md): immutable events, the RDP
and PLD accountants, calibration (noise multiplier for a budget, steps a budget affords), the
analytic Gaussian mechanism, events for non-Poisson batch sampling (shuffled fixed-size batches,
balls-in-bins, truncated Poisson: sampling_events.py), event (de)serialisation and the PrivacyLedger (budgets per data set,
persisted to JSON), and the strategies of correlated-noise (matrix-factorization) mechanisms with
their sensitivity and per-step events (``ppml_fast.accounting.matrix_factorization``).
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
from ppml_fast.accounting.errors import PrivacyBudgetExceeded, PrivacyError
from ppml_fast.accounting.ledger import PrivacyLedger
from ppml_fast.accounting.sampling_events import (
    BallsInBinsEvent,
    ShuffledBatchesEvent,
    TruncatedPoissonEvent,
)
from ppml_fast.accounting.serialization import event_from_dict, event_to_dict
from ppml_fast.accounting.analytic_gaussian import analytic_gaussian_sigma, gaussian_delta
from ppml_fast.accounting.calibration import epsilon, get_noise_multiplier, get_steps
from ppml_fast.accounting.pld import PLDAccountant
from ppml_fast.accounting.rdp import MixedAdjacencyError, RDPAccountant
from ppml_fast.accounting import matrix_factorization
from ppml_fast.accounting.matrix_factorization import (
    BandedStrategy,
    NoiseStrategy,
    Participation,
    TreeStrategy,
    optimize_banded,
)

__all__ = [
    "BallsInBinsEvent",
    "BandedStrategy",
    "ComposedEvent",
    "Event",
    "GaussianEvent",
    "LaplaceEvent",
    "MixedAdjacencyError",
    "NoiseStrategy",
    "Participation",
    "PLDAccountant",
    "PoissonSampledEvent",
    "PrivacyBudgetExceeded",
    "PrivacyError",
    "PrivacyLedger",
    "RDPAccountant",
    "RandomizedResponseEvent",
    "SampledWithoutReplacementEvent",
    "SelfComposedEvent",
    "ShuffledBatchesEvent",
    "TruncatedPoissonEvent",
    "TreeStrategy",
    "UnsupportedEventError",
    "analytic_gaussian_sigma",
    "epsilon",
    "event_from_dict",
    "event_to_dict",
    "gaussian_delta",
    "get_noise_multiplier",
    "get_steps",
    "matrix_factorization",
    "optimize_banded",
]

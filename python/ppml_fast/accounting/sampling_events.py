"""Events for the batch sampling that DP training runs when it is not Poisson sampling: shuffled
(or fixed-order) fixed-size batches, balls-in-bins, and truncated Poisson sampling; and how the
accountants read them (``steps``, ``adjacencies``: the dispatch pld.py and rdp.py call).

Why: Poisson-sampled epsilons are routinely reported for shuffled batches, and they can
understate the privacy loss (Chua, Ghazi, Kamath, Kumar, Manurangsi, Sinha, Zhang 2024, "How
Private are DP-SGD Implementations?", arXiv 2403.17673; Chua et al. 2024, "Scalable DP-SGD:
Shuffling vs. Poisson Subsampling", arXiv 2411.04205; Annamalai, Balle, De Cristofaro, Hayes
2024, "To Shuffle or not to Shuffle: Auditing DP-SGD with Shuffling", arXiv 2411.10614). No
tight amplification bound for shuffling is known to be usable in an accountant (JAX Privacy's
docs/batch_selection.md lists shuffling as "no accounting support"), so the shuffled and
balls-in-bins events use the honest bound without amplification: each record is in at most one
step per epoch, so per epoch the worst-case record meets one Gaussian mechanism. This is what
JAX Privacy's examples/balls_in_bins_accounting.py uses as its upper bound ("DP-SGD is just a
Gaussian mechanism with sensitivity ceil(iterations / epoch_length) ** 0.5").
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Container

from ppml_fast.accounting import _checks, events
from ppml_fast.accounting.events import (
    ComposedEvent,
    Event,
    GaussianEvent,
    LaplaceEvent,
    SelfComposedEvent,
    UnsupportedEventError,
)

ADJACENCIES = ("zero-out", "substitution")
TRUNCATED_KIND = "truncated_poisson_gaussian"  # (p_truncate, q, sigma) in the accountants' keys


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def _inner(event: object) -> None:
    if not isinstance(event, (GaussianEvent, LaplaceEvent)):
        raise TypeError(f"event must be a GaussianEvent or LaplaceEvent (the noise of one step); "
                        f"got {type(event).__name__} {event!r}")


def epochs_touched(steps: int, steps_per_epoch: int) -> int:
    """How many epochs ``steps`` consecutive steps from an epoch's start touch: ceil(steps / K).
    A partial epoch counts whole: its worst-case record may be in one of the steps that ran."""
    return -(-steps // steps_per_epoch)


@dataclass(frozen=True)
class ShuffledBatchesEvent(Event):
    """``steps`` consecutive steps, from the start of an epoch, of ``event`` on fixed-size
    batches: each epoch a permutation of the records (uniformly random, or any fixed order)
    cut into ``steps_per_epoch`` batches (torch ``RandomSampler`` / ``SequentialSampler`` with
    ``BatchSampler``, with or without ``drop_last``).

    Accounting (no amplification; honest upper bound): a record is in at most one step of each
    epoch, so over the epochs the steps touch, E = ceil(steps / steps_per_epoch) (a partial
    epoch counts whole: the worst-case record may be in a step that ran), it meets E
    applications of ``event`` and nothing else. The event is accounted as
    SelfComposedEvent(event, E): for a Gaussian, exactly the Gaussian mechanism with noise
    sigma / sqrt(E) (Balle & Wang 2018, Theorem 8, composed in closed form; Dong, Roth, Su 2022,
    Corollary 3.3 for Gaussian composition).

    Adjacency. The noise of ``event`` is relative to the sensitivity under ``adjacency``:
    - "zero-out" (default): one record replaced by a record whose gradient is zero, n fixed
      (dp_accounting's REPLACE_SPECIAL; JAX Privacy's "zero-out"). A clipped sum moves by at
      most C, so DP-SGD with noise std sigma C is GaussianEvent(sigma). Its epsilon reads like an
      add/remove epsilon (a Poisson-sampled one under add/remove is the same number under
      zero-out), so it is the one to compare with Poisson-sampled runs.
    - "substitution": one record replaced by any record (dp_accounting's REPLACE_ONE). A sum
      moves by up to 2C, so DP-SGD with noise std sigma C is GaussianEvent(sigma / 2), as for
      :class:`~ppml_fast.accounting.SampledWithoutReplacementEvent`; its epsilon is up to
      twice the zero-out one. Use :meth:`dp_sgd` to get the division right.
    Add/remove is not offered: adding a record to a shuffled run changes the number of batches
    and which batch every other record lands in, and no bound for that is used here.
    """

    event: Event
    steps_per_epoch: int
    steps: int = 1
    adjacency: str = "zero-out"

    def __post_init__(self) -> None:
        _inner(self.event)
        object.__setattr__(self, "steps_per_epoch", _int("steps_per_epoch", self.steps_per_epoch, 1))
        object.__setattr__(self, "steps", _int("steps", self.steps, 0))
        if self.adjacency not in ADJACENCIES:
            raise ValueError(f"adjacency must be one of {ADJACENCIES}; got {self.adjacency!r}")

    @classmethod
    def dp_sgd(cls, noise_multiplier: float, steps_per_epoch: int, steps: int = 1,
               adjacency: str = "zero-out") -> "ShuffledBatchesEvent":
        """DP-SGD with noise std ``noise_multiplier`` x C on clipped sums (C the clipping norm):
        GaussianEvent(noise_multiplier) under zero-out, GaussianEvent(noise_multiplier / 2)
        under substitution (the sensitivity of a sum is 2C there)."""
        sigma = _checks.positive("noise_multiplier", noise_multiplier)
        if adjacency == "substitution":
            sigma /= 2.0
        return cls(GaussianEvent(sigma), steps_per_epoch, steps, adjacency)

    @property
    def participations(self) -> int:
        """E, the number of times the worst-case record meets ``event``."""
        return epochs_touched(self.steps, self.steps_per_epoch)


@dataclass(frozen=True)
class BallsInBinsEvent(Event):
    """``steps`` consecutive steps, from the start of an epoch, of ``event`` where each epoch
    every record is put in one of ``steps_per_epoch`` batches chosen uniformly at random,
    independently (balls-in-bins; Chua, Ghazi, Harrison, Leeman, Kamath, Kumar, Manurangsi,
    Sinha, Zhang 2025, "Balls-and-Bins Sampling for DP-SGD", arXiv 2412.16802; JAX Privacy's
    ``BallsInBinsSampling``).

    Accounting: the deterministic one-participation-per-epoch bound, always valid here (each
    record is in exactly one batch per epoch): SelfComposedEvent(event, ceil(steps /
    steps_per_epoch)), as :class:`ShuffledBatchesEvent`. Balls-in-bins amplifies (Chua et al.
    2025 give near-Poisson epsilons), but their accountant is Monte Carlo (a high-probability
    estimate, not an upper bound) and neither dp_accounting 0.6 nor JAX Privacy has a PLD/RDP
    accountant for it; this bound is the sound one. Adjacency: add/remove (an added record goes
    to a batch of its own draw and moves no other), the noise relative to a sum's add/remove
    sensitivity C: DP-SGD with noise std sigma C is GaussianEvent(sigma).
    """

    event: Event
    steps_per_epoch: int
    steps: int = 1

    def __post_init__(self) -> None:
        _inner(self.event)
        object.__setattr__(self, "steps_per_epoch", _int("steps_per_epoch", self.steps_per_epoch, 1))
        object.__setattr__(self, "steps", _int("steps", self.steps, 0))

    @property
    def participations(self) -> int:
        """The number of times the worst-case record meets ``event``."""
        return epochs_touched(self.steps, self.steps_per_epoch)


@dataclass(frozen=True)
class TruncatedPoissonEvent(Event):
    """One step of the Gaussian mechanism (noise std ``noise_multiplier`` x C on a clipped sum)
    on a Poisson sample (each of the ``dataset_size`` records with probability
    ``sampling_probability``) cut to at most ``max_batch_size`` records by keeping a uniformly
    random subset when it is larger (padding smaller batches changes no sum). dp_accounting
    0.6's ``TruncatedSubsampledGaussianDpEvent``, JAX Privacy's ``truncated_dpsgd_event``.
    Adjacency: add/remove (``dataset_size`` is either neighbour's size).

    Accounting (an upper bound; neither it nor dp_accounting's dominates: on a 216-point grid ours was
    lower in 20 cases, by up to 27 %, higher elsewhere; tests compare). Let S be the sample
    of the other records: at most ``dataset_size`` of them, so |S| ~ Bin(<= n, q), and
    p = P[Bin(n, q) >= B] (B = ``max_batch_size``; ``truncation_probability``). Reveal whether
    |S| >= B (same law on both neighbours). If |S| < B, adding record x never truncates: the
    Poisson-subsampled Gaussian, sensitivity C. If |S| >= B, couple the two truncations (draw
    the B-subset U of S + {x}; if x is in U, the other side keeps U - {x} plus one uniform y of
    S - U): the sums differ by g(x) - g(y), norm <= 2C, only when x is sampled, which is the
    Poisson-subsampled Gaussian with sensitivity 2C (noise sigma / 2). With the label revealed
    the pair is the mixture of the two (the decomposition of Ganesh 2025, "Tighter Privacy
    Analysis for Truncated Poisson Sampling", arXiv 2508.15089, Sec. 3, which dp_accounting 0.6
    implements in ``from_truncated_subsampled_gaussian_mechanism`` with a smaller conditional
    sampling rate and substitution in the second branch), so its hockey-stick curve is
        delta(eps) = (1 - p) delta_{q, sigma}(eps) + p delta_{q, sigma / 2}(eps)
    for each direction, and its Rényi divergence
        exp((a - 1) eps(a)) = (1 - p) exp((a - 1) eps_{q,sigma}(a)) + p exp((a - 1) eps_{q,sigma/2}(a))
    (the revealed-label mixture; both are in sampling_math.py).
    """

    dataset_size: int
    sampling_probability: float
    max_batch_size: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset_size", _int("dataset_size", self.dataset_size, 1))
        object.__setattr__(self, "max_batch_size", _int("max_batch_size", self.max_batch_size, 1))
        q = _checks.real("sampling_probability", self.sampling_probability)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"sampling_probability must be in [0, 1]; got {self.sampling_probability!r}")
        object.__setattr__(self, "sampling_probability", q)
        GaussianEvent(self.noise_multiplier)  # the same checks as a Gaussian's
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))

    @property
    def truncation_probability(self) -> float:
        """p = P[Bin(dataset_size, q) >= max_batch_size], rounded up (an upper bound)."""
        from scipy import stats

        p = float(stats.binom.sf(self.max_batch_size - 1, self.dataset_size, self.sampling_probability))
        return min(1.0, p * (1 + 1e-12) + 1e-300) if p > 0 else 0.0


SAMPLING_EVENTS = (ShuffledBatchesEvent, BallsInBinsEvent, TruncatedPoissonEvent)


def steps(event: Event, count: int, kinds: Container[str], accountant: str) -> list[tuple[tuple, int]]:
    """``events.steps`` for histories that may hold the events above: shuffled and balls-in-bins
    steps become ``participations`` repetitions of their inner event; a truncated-Poisson step
    the key (TRUNCATED_KIND, p, q, sigma) when ``kinds`` has it (else UnsupportedEventError)."""
    if isinstance(event, SelfComposedEvent):
        return steps(event.event, count * event.count, kinds, accountant)
    if isinstance(event, ComposedEvent):
        return [s for e in event.events for s in steps(e, count, kinds, accountant)]
    if isinstance(event, (ShuffledBatchesEvent, BallsInBinsEvent)):
        return events.steps(event.event, count * event.participations, kinds, accountant)
    if isinstance(event, TruncatedPoissonEvent):
        if TRUNCATED_KIND not in kinds:
            raise UnsupportedEventError(f"{accountant} does not support {type(event).__name__}: {event!r}")
        q, p = event.sampling_probability, event.truncation_probability
        if q == 0.0:
            return []  # nobody's record is used
        if p == 0.0:  # never truncated: the Poisson-subsampled Gaussian itself
            return [(("gaussian", q, event.noise_multiplier), count)]
        return [((TRUNCATED_KIND, p, q, event.noise_multiplier), count)]
    return events.steps(event, count, kinds, accountant)


def supported(event: Event, kinds: Container[str]) -> bool:
    """Whether every step of ``event`` is of a kind in ``kinds``."""
    try:
        steps(event, 1, kinds, "")
    except UnsupportedEventError:
        return False
    return True


def adjacencies(event: Event) -> list[str]:
    """``events.adjacencies`` for histories that may hold the events above: substitution for a
    shuffled event under substitution, add/remove for truncated Poisson; zero-out shuffled and
    balls-in-bins events add none (their noise is relative to the sensitivity C of zero-out and
    add/remove alike, like an unsampled Gaussian's)."""
    if isinstance(event, SelfComposedEvent):
        return adjacencies(event.event)
    if isinstance(event, ComposedEvent):
        return [a for e in event.events for a in adjacencies(e)]
    if isinstance(event, ShuffledBatchesEvent):
        return ["substitution"] if event.adjacency == "substitution" else []
    if isinstance(event, BallsInBinsEvent):
        return []
    if isinstance(event, TruncatedPoissonEvent):
        return ["add/remove"]
    return events.adjacencies(event)

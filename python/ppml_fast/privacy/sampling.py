"""Which batch sampling a DP training run really does, and the accounting event of each step.

``PrivacyEngine.make_private(poisson_sampling=True)`` (the default) samples with
:class:`~ppml_fast.privacy.data.DPDataLoader` and each step is
``PoissonSampledEvent(q, GaussianEvent(sigma))``. With ``poisson_sampling=False`` the user's
loader runs as it is, and :func:`analyse` reads from it what it does:

- ``RandomSampler`` without replacement (``shuffle=True``) or ``SequentialSampler`` (fixed
  order), batched by torch's ``BatchSampler`` (with or without ``drop_last``), or a
  ``DistributedSampler``: each epoch every record is in at most one batch. Accounted with
  :class:`~ppml_fast.accounting.ShuffledBatchesEvent`: no amplification, one Gaussian
  mechanism per epoch for the worst-case record (zero-out adjacency: noise sigma relative to C).
  A ``DistributedSampler`` that pads (``drop_last=False`` and a dataset not divisible by the
  ranks) repeats records in an epoch: the per-epoch Gaussian then has sensitivity 2C.
- ``RandomSampler(replacement=True)``, ``WeightedRandomSampler`` or more samples than records:
  a record can be in one batch several times: refused (no finite bound from the sampler alone).
- any other sampler or batch sampler: a participation is charged at every step (assuming only
  that no record is twice in one batch), with a warning.

:class:`EpochAccounting` gives the per-step events: a step charges the epochs it begins, counted
as new passes over the loader (each ``iter(loader)`` draws a new permutation, so a loop broken off
mid-epoch starts a new epoch; counted by wrapping the ``BatchSampler``'s sampler in place, with a
wrapper that yields the same indices) and at least one per K steps. A step that may hold a record
twice, or a noise multiplier lowered mid-epoch, is charged more (:class:`EpochAccounting` says
how); all of it errs high. With ``distributed=True`` and no ``DistributedSampler`` every rank
sees every record: sensitivity world_size x C.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Optional

from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from ppml_fast.accounting import GaussianEvent, SelfComposedEvent, ShuffledBatchesEvent

POISSON_ANALYSIS = (
    "Poisson sampling (DPDataLoader, rate q = {q:.6g}): each step is PoissonSampledEvent(q, "
    "Gaussian(sigma)), add/remove adjacency (Mironov, Talwar, Zhang 2019; PLD: Koskela et al. 2020)")


@dataclass(frozen=True)
class SamplingPlan:
    """What the loader does and how its steps are accounted.

    kind: "shuffle", "fixed_order" or "per_step" (an unknown sampler: every step charged).
    steps_per_epoch: K (len(data_loader)); records_per_epoch: records its steps consume in an
    epoch; noise_scale: the charged Gaussian's sigma is sigma x noise_scale (1; 1/2 when an epoch
    can hold a record twice; 1/2 more under substitution); analysis: the sentence reported.
    """

    kind: str
    steps_per_epoch: int
    records_per_epoch: int
    noise_scale: float
    adjacency: str
    analysis: str

    def participations(self, steps: int) -> int:
        """Gaussians charged to ``steps`` steps of one unbroken pass from an epoch's start."""
        return -(-steps // self.steps_per_epoch)


def analyse(data_loader: DataLoader, *, adjacency: str = "zero-out",
            distributed: bool = False) -> SamplingPlan:
    """The :class:`SamplingPlan` of ``data_loader`` run as it is (``poisson_sampling=False``);
    ValueError for samplers that can put a record in a batch twice. ``distributed``: every rank
    steps on its own copy of this loader; without a ``DistributedSampler`` each rank sees every
    record, so a record can be in a (global) step once per rank: sensitivity world_size x C."""
    plan = _analyse(data_loader, adjacency)
    world = _world_size() if distributed else 1
    if world > 1 and not _distributed_sampler(data_loader):
        plan = dataclasses.replace(
            plan, noise_scale=plan.noise_scale / world,
            analysis=plan.analysis + f"; {world} ranks without a DistributedSampler: each rank "
                     f"sees every record, charged as sensitivity {world} x that")
    return plan


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _distributed_sampler(data_loader: DataLoader) -> bool:
    bs = data_loader.batch_sampler
    sampler = getattr(bs, "sampler", None) if type(bs) is BatchSampler else None
    sampler = sampler.sampler if isinstance(sampler, _EpochCounter) else sampler
    return type(sampler) is DistributedSampler


def _analyse(data_loader: DataLoader, adjacency: str) -> SamplingPlan:
    if adjacency not in ("zero-out", "substitution"):
        raise ValueError(f"adjacency must be 'zero-out' or 'substitution'; got {adjacency!r}")
    k = len(data_loader)
    if k < 1:
        raise ValueError("data_loader must yield at least one batch per epoch")
    batch_sampler = data_loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", None) if type(batch_sampler) is BatchSampler else None
    if isinstance(sampler, _EpochCounter):  # a loader made private before: its own sampler
        sampler = sampler.sampler
    sub = 0.5 if adjacency == "substitution" else 1.0
    head = (f"poisson_sampling=False, {k} steps per epoch: each record is in at most one step "
            "of each epoch; ")
    tail = (f"accounted without amplification as one Gaussian per epoch touched (a partial epoch "
            f"counts whole), ShuffledBatchesEvent, {adjacency} adjacency (noise sigma x "
            f"{sub:g} relative to the {'2C' if sub < 1 else 'C'} a record moves a clipped sum); "
            "no Poisson amplification is claimed (Chua et al. 2024, arXiv 2403.17673, 2411.04205)")
    if type(sampler) in (RandomSampler, SequentialSampler, DistributedSampler):
        n = len(sampler)
        if isinstance(sampler, RandomSampler) and (sampler.replacement or n > len(sampler.data_source)):
            raise ValueError(
                "data_loader's RandomSampler draws with replacement (or more samples than records): "
                "a record can be in one batch several times, and no bound follows from the sampler; "
                "use shuffle=True without replacement, or poisson_sampling=True")
        per_epoch = k * batch_sampler.batch_size if batch_sampler.drop_last else n
        scale = sub
        kind = "fixed_order" if type(sampler) is SequentialSampler else "shuffle"
        what = {"shuffle": "a fresh random permutation cut into batches",
                "fixed_order": "the same order every epoch (SequentialSampler)"}[kind]
        if type(sampler) is DistributedSampler:
            kind, what = "shuffle", "a DistributedSampler shard"
            total = len(sampler.dataset)
            if not sampler.drop_last and total % sampler.num_replicas:
                scale /= 2  # padding repeats up to num_replicas - 1 records in an epoch
                what += " (padded: a record can be in an epoch twice, charged as sensitivity 2C)"
        return SamplingPlan(kind, k, per_epoch, scale, adjacency, head[:-2] + f" ({what}); " + tail)
    if type(batch_sampler) is BatchSampler and type(sampler).__name__ == "WeightedRandomSampler":
        raise ValueError("data_loader's WeightedRandomSampler draws with replacement: a record can be "
                         "in one batch several times; use shuffle=True, or poisson_sampling=True")
    name = type(sampler if sampler is not None else batch_sampler).__name__
    analysis = (f"poisson_sampling=False with a {name} (unknown sampling): every step charged as a "
                f"Gaussian mechanism of noise sigma x {sub:g} ({adjacency} adjacency), assuming no "
                "record is twice in one batch; no amplification")
    return SamplingPlan("per_step", 1, 1, sub, adjacency, analysis)


def warn_not_poisson(plan: SamplingPlan) -> None:
    """The warning of ``poisson_sampling=False``: the epsilon is the honest one for the loader's
    batches, far above a Poisson-sampled one at the same noise."""
    extra = (" The sampler is unknown: every step is charged (assumes no record is twice in one "
             "batch); use DataLoader(..., shuffle=True or False)." if plan.kind == "per_step" else "")
    warnings.warn(
        "poisson_sampling=False: epsilon is accounted for the loader's own batches without "
        "Poisson amplification (one Gaussian per epoch, ShuffledBatchesEvent), far above a "
        "Poisson-sampled epsilon at the same noise (Chua et al. 2024, arXiv 2411.04205); use "
        "poisson_sampling=True for amplification." + extra, UserWarning, stacklevel=3)


def describe(plan: Optional[SamplingPlan], sample_rate: Optional[float], correlated=None) -> str:
    """The ``PrivacyEngine.accounting_analysis`` sentence."""
    if correlated is not None:
        return getattr(correlated, "analysis", None) or (
            f"correlated noise ({type(correlated).__name__}): privacy/correlated_plan.py")
    if plan is not None:
        return plan.analysis
    return POISSON_ANALYSIS.format(q=sample_rate)


def calibrate(plan: SamplingPlan, *, steps: int, target_epsilon: float, target_delta: float,
              accountant: str, epsilon_tolerance: float = 0.01) -> float:
    """The smallest noise multiplier sigma whose epsilon after ``steps`` steps of one unbroken
    run under ``plan`` is at most ``target_epsilon``: the E = ``plan.participations(steps)``
    charged Gaussians of noise sigma x noise_scale compose to one Gaussian of noise
    sigma x noise_scale / sqrt(E), so sigma = calibrated Gaussian(E steps) / noise_scale."""
    from ppml_fast.accounting import calibration

    base = calibration.get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=1.0,
        steps=plan.participations(steps), accountant=accountant, epsilon_tolerance=epsilon_tolerance)
    return base / plan.noise_scale


class _EpochCounter:
    """A sampler that yields the wrapped one's indices and counts the passes that yielded any
    (``epochs``) and the indices of the current pass (``yielded``)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.epochs = 0
        self.yielded = 0

    def __iter__(self):
        started = False
        for i in self.sampler:
            if not started:
                started = True
                self.epochs += 1
                self.yielded = 0
            self.yielded += 1
            yield i

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str):  # set_epoch, data_source, generator, ...
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


@dataclass
class _State:
    charged: int = 0  # epochs charged since the start (or the last reset)
    steps: int = 0
    passes: int = 0  # the counter's passes when the last step was taken
    pass_records: int = 0  # records stepped on in the current pass (at most those it yielded)
    min_sigma: float = math.inf  # the smallest charged sigma of the latest charged epoch


class EpochAccounting:
    """Per-step events of a run whose loader follows ``plan``; the optimizer's ``_event`` asks
    :meth:`event`, its step hook calls :meth:`stepped`.

    At each step, with sigma' = sigma x ``plan.noise_scale``:
    - epochs begun = max(passes over the loader that yielded an index, ceil(steps / K)) (each
      pass is a new permutation; K steps per epoch is the floor if the loader is iterated some
      other way); each epoch not yet charged is charged one Gaussian(sigma');
    - if the step holds more records of the current pass than the pass has yielded (it holds
      records of an earlier pass, or a batch twice), or, with DataLoader workers (which fetch
      ahead), a new pass began and it holds more than one batch: a record may be in it twice,
      so its charges are Gaussian(sigma' / 2) (sensitivity 2C; at least one such charge);
    - a noise multiplier lowered mid-epoch charges that epoch again at the lower noise.
    Over-charging is possible (a pass abandoned after prefetching counts), under-charging is not,
    except by loops that fetch batches by hand ahead of a pass boundary with workers and step on
    records of two passes at once (counted as two Gaussians, not one of sensitivity 2C).
    """

    def __init__(self, plan: SamplingPlan, data_loader: Optional[DataLoader] = None) -> None:
        self.plan = plan
        self.counter: Optional[_EpochCounter] = None
        self.batch_size = getattr(data_loader, "batch_size", None) or 1
        self.workers = getattr(data_loader, "num_workers", 0)
        bs = getattr(data_loader, "batch_sampler", None)
        if plan.kind != "per_step" and type(bs) is BatchSampler:
            if not isinstance(bs.sampler, _EpochCounter):
                bs.sampler = _EpochCounter(bs.sampler)
            self.counter = bs.sampler
        self._state = self._fresh()
        self._pending: Optional[tuple[int, _State]] = None
        self._history: Optional[tuple] = None  # the accountant's history after our last step

    def _fresh(self) -> _State:
        """The state at the start: a pass under way counts as not charged."""
        passes = self.counter.epochs if self.counter is not None else 0
        return _State(passes=max(passes - 1, 0))

    def event(self, opt) -> SelfComposedEvent:
        """The event of the step ``opt`` is taking: ``n`` new participations, each
        ``ShuffledBatchesEvent(Gaussian(charged sigma), K, steps=1)`` (n = 0: the step is in an
        epoch already charged at a noise no larger). Nothing changes until :meth:`stepped`."""
        state = self._state
        if self._history is not None and _fingerprint(opt.accountant) != self._history:
            state = self._fresh()  # the accountant was replaced or reloaded: charge anew
        plan = self.plan
        sigma = opt.noise_multiplier * plan.noise_scale
        pending = sum(b.size for b in opt.module.recorder.batches if b.backpropagated)
        r = max(int(opt._samples + pending), 0)
        passes = self.counter.epochs if self.counter is not None else 0
        begun = passes - state.passes  # passes begun since the last step
        new = max(plan.participations(state.steps + 1), state.charged + begun) - state.charged
        before = 0 if begun else state.pass_records
        drawn = self.counter.yielded if self.counter is not None else math.inf
        twice = before + r > drawn or (begun > 0 and self.workers > 0 and r > self.batch_size)
        charge = sigma / 2 if twice else sigma
        if twice:
            new = max(new, 1)
        after = _State(state.charged + new, state.steps + 1, passes,
                       int(min(before + r, drawn)), state.min_sigma)
        if new:
            after.min_sigma = charge
        elif charge < state.min_sigma:  # noise lowered mid-epoch: charge this epoch again
            new, after.min_sigma = 1, charge
        self._pending = (opt.steps, after)
        step = ShuffledBatchesEvent(GaussianEvent(charge), plan.steps_per_epoch, 1, plan.adjacency)
        return SelfComposedEvent(step, new)

    def stepped(self, opt) -> None:
        """Step hook: the step whose event was composed is done; its state becomes current."""
        if self._pending is not None and self._pending[0] == opt.steps - 1:
            self._state = self._pending[1]
        self._pending = None
        self._history = _fingerprint(opt.accountant)


def _fingerprint(accountant) -> tuple:
    """What identifies the accountant's history (its object and entries)."""
    return (id(accountant), tuple(map(tuple, getattr(accountant, "events", ()) or ())))


def attach(optimizer, plan: SamplingPlan, data_loader: DataLoader) -> EpochAccounting:
    """Makes ``optimizer``'s steps account as ``plan`` says (``optimizer.sampling``), replacing
    a plan attached before (``make_private(poisson_sampling=False)`` attaches the zero-out one;
    attach ``analyse(loader, adjacency="substitution")`` before the first step for substitution)."""
    old = getattr(optimizer, "sampling", None)
    if old is not None and old.stepped in optimizer.step_hooks:
        optimizer.step_hooks.remove(old.stepped)
    tracker = EpochAccounting(plan, data_loader)
    optimizer.sampling = tracker
    optimizer.step_hooks.append(tracker.stepped)
    return tracker

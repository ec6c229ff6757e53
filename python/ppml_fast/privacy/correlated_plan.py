"""Planning a correlated-noise run for ``PrivacyEngine.make_private(noise_mechanism="tree" |
"banded_mf")``: the strategy matrix, the participation schema that the data loader really
gives, and the loader the optimizer steps on.

Participation (which records can be in which steps; the sensitivity is a maximum over the
schema's patterns, Choquette-Choo et al. 2023, arXiv 2211.06530, section 2 / Definition 2):

- ``poisson_sampling=False`` with a loader in fixed order (``SequentialSampler``, shuffle off)
  over a dataset whose index i is the same record every epoch by construction (a
  ``TensorDataset``, or a ``Subset`` / ``ConcatDataset`` of such: :func:`index_stable`):
  record j is in the same batch position every epoch, i.e. in steps i, i + k, i + 2k, ...
  (k = len(loader)): "every_epoch" with ``steps_per_epoch`` k (i unknown: a max over i). Over
  any other dataset (which may reorder its records between epochs) the "shuffled" schema below.
- ``poisson_sampling=False`` with ``shuffle=True`` (``RandomSampler`` without replacement):
  each epoch is a new permutation, so a record's steps are one per epoch at arbitrary places —
  the last step of one epoch and the first of the next are 1 apart. The fixed-order schema
  does **not** hold: "shuffled" with ``steps_per_epoch`` k (every pattern with at most one step
  in each epoch [e k, (e + 1) k), the worst case over all of them; no amplification by
  shuffling is claimed). Banded C needs k >= b - 1 there.
- both rely on the loop taking one batch per step, epoch after epoch, which
  :mod:`ppml_fast.privacy.fixed_batches` enforces.
- any other sampler (with replacement, weighted, custom batch samplers): refused — how often a
  record appears is unknown.
- ``poisson_sampling=True``: only "banded_mf", with cyclic Poisson sampling over b parts
  (:mod:`ppml_fast.privacy.cyclic_poisson`, amplified BandMF); tree aggregation has no
  amplification result and is refused there.

Adjacency: zero-out (one record's gradient replaced by zero; Kairouz et al. 2021, arXiv
2103.00039, section 2; the matrix-factorization papers' convention): one participation moves a
row by at most the clipping norm C. Under substitution it moves by 2C: halve the noise
multiplier you compare with. The denominator of the average is the fixed batch size.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

from torch.utils.data import (ConcatDataset, DataLoader, RandomSampler, SequentialSampler, Subset,
                              TensorDataset)

from ppml_fast.privacy.correlated_noise import CorrelatedNoise

MECHANISMS = ("gaussian", "tree", "banded_mf")


def _count(name: str, v, low: int = 1) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be None or an int >= {low}; got {v!r}")
    return int(v)


def check_args(noise_mechanism, bands, epochs, steps) -> None:
    """Validates the correlated-noise arguments of ``make_private`` (also for "gaussian")."""
    if noise_mechanism not in MECHANISMS:
        raise ValueError(f"noise_mechanism must be one of {MECHANISMS}; got {noise_mechanism!r}")
    bands, epochs, steps = _count("bands", bands), _count("epochs", epochs), _count("steps", steps)
    if noise_mechanism == "gaussian":
        if bands is not None or epochs is not None or steps is not None:
            raise ValueError("bands, epochs and steps plan a correlated-noise run (noise_mechanism="
                             "'tree' or 'banded_mf'); with 'gaussian' pass none of them (a budget "
                             f"is max_epsilon=); got bands={bands!r}, epochs={epochs!r}, steps={steps!r}")
        return
    if (epochs is None) == (steps is None):
        raise ValueError(f"noise_mechanism={noise_mechanism!r} needs the planned number of steps: "
                         f"pass exactly one of epochs= or steps=; got epochs={epochs!r}, steps={steps!r}")
    if noise_mechanism == "tree" and bands is not None:
        raise ValueError("bands is for noise_mechanism='banded_mf'; tree aggregation has none")
    if noise_mechanism == "banded_mf" and bands is None:
        raise ValueError("noise_mechanism='banded_mf' needs bands= (an int >= 1, the number of "
                         "bands b of the strategy matrix)")


def plan(*, noise_mechanism: str, bands: Optional[int], epochs: Optional[int], steps: Optional[int],
         data_loader: DataLoader, poisson_sampling: bool, distributed: bool, noise_multiplier: float,
         generator=None, secure: bool = False):
    """(CorrelatedNoise, loader, sample_rate, expected batch size) for a correlated-noise run."""
    from ppml_fast.accounting import matrix_factorization as mf

    check_args(noise_mechanism, bands, epochs, steps)
    if distributed:
        raise ValueError(f"noise_mechanism={noise_mechanism!r} with distributed=True is not "
                         "supported (the correlated noise is kept by one process)")
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real) \
            or not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0 with noise_mechanism="
                         f"{noise_mechanism!r}; got {noise_multiplier!r}")
    per_epoch = len(data_loader)
    if per_epoch == 0:
        raise ValueError("data_loader has no batches")
    total = int(steps) if steps is not None else int(epochs) * per_epoch
    if bands is not None and bands > total:
        raise ValueError(f"bands={bands} exceeds the {total} planned steps")
    if poisson_sampling:
        if noise_mechanism == "tree":
            raise ValueError(
                "noise_mechanism='tree' with poisson_sampling=True: tree aggregation has no privacy "
                "amplification by sampling (Kairouz et al. 2021), so Poisson sampling would only "
                "be accounted as if every record were in every step; pass poisson_sampling=False, "
                "or noise_mechanism='banded_mf' (cyclic Poisson sampling, amplified BandMF)")
        from ppml_fast.privacy.cyclic_poisson import CyclicPoissonDataLoader

        loader = CyclicPoissonDataLoader.from_data_loader(data_loader, parts=int(bands),
                                                          generator=generator, secure=secure)
        participation = mf.Participation("cyclic_poisson", min_separation=int(bands),
                                         sample_rate=loader.sample_rate)
        sample_rate, expected = loader.sample_rate, loader.expected_batch_size
    else:
        if data_loader.batch_size is None:
            raise ValueError("data_loader must have a batch_size when poisson_sampling=False")
        participation = participation_of(data_loader, total)
        from ppml_fast.privacy.fixed_batches import FixedBatchesDataLoader

        loader = FixedBatchesDataLoader.from_data_loader(data_loader)  # the order, step by step
        sample_rate, expected = 1 / per_epoch, float(data_loader.batch_size)
    strategy = mf.tree(total) if noise_mechanism == "tree" else mf.optimize_banded(total, int(bands))
    try:  # the strategy's sensitivity under this schema, computed (and cached) once now
        strategy.sensitivity_sq_prefix(total - 1, participation)
    except ValueError as e:
        raise ValueError(f"noise_mechanism={noise_mechanism!r} cannot be accounted for this data "
                         f"loader ({participation}): {e}. Use fewer bands (at most the batches per "
                         "epoch + 1), poisson_sampling=True (cyclic Poisson, banded_mf) or "
                         "noise_mechanism='tree'") from e
    return CorrelatedNoise(strategy, participation), loader, sample_rate, expected


def index_stable(dataset) -> bool:
    """Whether index i of ``dataset`` is the same record in every epoch by construction: a
    ``TensorDataset`` (or a ``Subset`` / ``ConcatDataset`` of such). Any other dataset may map
    indices to records differently each epoch (its own per-epoch shuffle, re-drawn length
    buckets), which makes a fixed-order loader a shuffled run; such loaders are accounted with
    the "shuffled" schema, a valid bound for every order (conservative: it can be ~2x the
    fixed-order sensitivity). Tensors changed in place between epochs are not detected."""
    if isinstance(dataset, TensorDataset):
        return True
    if isinstance(dataset, Subset):
        return index_stable(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return all(index_stable(d) for d in dataset.datasets)
    return False


def participation_of(data_loader: DataLoader, steps: int):
    """The participation schema of ``data_loader``'s fixed-size batches over ``steps`` steps
    (module docstring); ValueError for a sampler whose repetitions are unknown."""
    from ppml_fast.accounting import matrix_factorization as mf

    per_epoch, sampler = len(data_loader), data_loader.sampler
    n = len(data_loader.dataset)  # type: ignore[arg-type]
    if type(sampler) is SequentialSampler and index_stable(data_loader.dataset):
        return mf.Participation("every_epoch", steps_per_epoch=per_epoch)
    if type(sampler) is SequentialSampler:  # fixed indices, but the dataset may reorder records
        return mf.Participation("shuffled", steps_per_epoch=per_epoch)
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples <= n:
        return mf.Participation("shuffled", steps_per_epoch=per_epoch)
    raise ValueError(
        f"data_loader's sampler ({type(sampler).__name__}) is neither a SequentialSampler (fixed "
        "order) nor a RandomSampler without replacement (shuffle=True): how often a record can "
        "appear is unknown, so the correlated noise's sensitivity cannot be bounded; use "
        "DataLoader(..., shuffle=True or False) with a batch_size")


def calibrate(correlated: CorrelatedNoise, *, target_epsilon: float, target_delta: float,
              accountant: str, epsilon_tolerance: float = 0.01) -> float:
    """The smallest noise multiplier sigma (within the tolerance of
    ``calibration.get_noise_multiplier``) whose epsilon after the whole plan of ``correlated``
    is at most ``target_epsilon``, for the events the optimizer will compose:

    - non-amplified schemas: the per-step events compose to one Gaussian mechanism of noise
      sigma / sqrt(S_{T-1}) (Choquette-Choo et al. 2023, arXiv 2211.06530, section 2), so
      sigma = sqrt(S_{T-1}) x the one-step Gaussian's calibrated sigma;
    - cyclic Poisson: ceil(T / b) rounds of PoissonSampled(q, Gaussian(sigma / zeta))
      (arXiv 2306.08153, Theorem 4), so sigma = zeta x DP-SGD's sigma for q and ceil(T / b) steps.
    """
    from ppml_fast.accounting import calibration

    strategy, part, total = correlated.strategy, correlated.participation, correlated.steps
    kw = dict(target_epsilon=target_epsilon, target_delta=target_delta, accountant=accountant,
              epsilon_tolerance=epsilon_tolerance)
    if part.kind == "cyclic_poisson":
        rounds = -(-total // part.min_separation)
        base = calibration.get_noise_multiplier(sample_rate=part.sample_rate, steps=rounds, **kw)
        return base * strategy.max_column_norm()
    base = calibration.get_noise_multiplier(sample_rate=1.0, steps=1, **kw)
    return base * math.sqrt(strategy.sensitivity_sq_prefix(total - 1, part))

"""Participation schemas for matrix-factorization (correlated-noise) mechanisms: in which steps one
record (or, federated, one user) may contribute, which is what the sensitivity of a strategy
matrix C depends on (Choquette-Choo et al. 2023, "Multi-epoch matrix factorization", arXiv
2211.06530, Sec. 2; "(Amplified) Banded Matrix Factorization", NeurIPS 2023, arXiv 2306.08153,
Sec. 2 and 4).

Steps are 0-based throughout. Sensitivities are per unit clipping norm under add/remove adjacency
(one record's clipped gradients g_t, ||g_t|| <= 1, present or absent); under replace-one adjacency
the L2 sensitivity doubles.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from ppml_fast.accounting import _checks

KINDS = ("single", "every_epoch", "shuffled", "min_separated", "cyclic_poisson")


def _int_at_least(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Participation:
    """Which steps one record may take part in.

    kinds:
      - ``"single"``: each record in at most one step (no other argument).
      - ``"every_epoch"``: a fixed order, the record in steps i, i + p, i + 2p, ... with
        p = ``steps_per_epoch``; i is unknown, so sensitivities are the max over i
        ((k, b)-participation of arXiv 2211.06530, Sec. 2).
      - ``"shuffled"``: each epoch [e p, (e + 1) p), p = ``steps_per_epoch``, is a fresh
        shuffle: the record in at most one step of each epoch, anywhere in it (a pattern may have
        two steps 1 apart, across an epoch boundary).
      - ``"min_separated"``: any set of steps at least ``min_separation`` apart (|i - j| >= b),
        at most ``max_participations`` of them (None: as many as fit) (b-min-separated
        participation, arXiv 2306.08153, Sec. 2).
      - ``"cyclic_poisson"``: amplified BandMF (arXiv 2306.08153, Alg. 2): the records are split
        into b = ``min_separation`` parts by a rule that does not look at the data (e.g. each
        record to an independent uniformly random part, as jax_privacy's INDEPENDENT partition for
        add/remove adjacency); step t Poisson-samples each record of part t mod b with
        probability ``sample_rate``.
    """

    kind: str
    steps_per_epoch: Optional[int] = None
    min_separation: Optional[int] = None
    max_participations: Optional[int] = None
    sample_rate: Optional[float] = None

    def __init__(self, kind: str, *, steps_per_epoch: Optional[int] = None,
                 min_separation: Optional[int] = None, max_participations: Optional[int] = None,
                 sample_rate: Optional[float] = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}; got {kind!r}")
        given = {"steps_per_epoch": steps_per_epoch, "min_separation": min_separation,
                 "max_participations": max_participations, "sample_rate": sample_rate}
        allowed = {
            "single": (),
            "every_epoch": ("steps_per_epoch",),
            "shuffled": ("steps_per_epoch",),
            "min_separated": ("min_separation", "max_participations"),
            "cyclic_poisson": ("min_separation", "sample_rate"),
        }[kind]
        extra = [k for k, v in given.items() if v is not None and k not in allowed]
        if extra:
            raise ValueError(f"participation kind {kind!r} takes only {list(allowed) or 'no arguments'}; "
                             f"got {', '.join(f'{k}={given[k]!r}' for k in extra)}")
        if kind in ("every_epoch", "shuffled"):
            if steps_per_epoch is None:
                raise ValueError(f"participation kind {kind!r} needs steps_per_epoch (an int >= 1)")
            steps_per_epoch = _int_at_least("steps_per_epoch", steps_per_epoch, 1)
        if kind in ("min_separated", "cyclic_poisson"):
            if min_separation is None:
                raise ValueError(f"participation kind {kind!r} needs min_separation (an int >= 1)")
            min_separation = _int_at_least("min_separation", min_separation, 1)
        if max_participations is not None:
            max_participations = _int_at_least("max_participations", max_participations, 1)
        if kind == "cyclic_poisson":
            if sample_rate is None:
                raise ValueError("participation kind 'cyclic_poisson' needs sample_rate (in (0, 1])")
            sample_rate = _checks.real("sample_rate", sample_rate)
            if not 0.0 < sample_rate <= 1.0:
                raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "steps_per_epoch", steps_per_epoch)
        object.__setattr__(self, "min_separation", min_separation)
        object.__setattr__(self, "max_participations", max_participations)
        object.__setattr__(self, "sample_rate", sample_rate)

    def period(self, steps: int) -> Optional[int]:
        """For the schemas whose patterns are {i, i + p, i + 2p, ...} (every record's worst case):
        p; "single" is p = steps (one step per pattern), "cyclic_poisson" is p = b (its worst case
        without amplification: sampled at every step of its part). None for "min_separated" and
        "shuffled"."""
        if self.kind == "single":
            return steps
        if self.kind == "every_epoch":
            return min(self.steps_per_epoch, steps)
        if self.kind == "cyclic_poisson":
            return min(self.min_separation, steps)
        return None

    def participations(self, steps: int) -> int:
        """The most steps (of ``steps``) one record may take part in."""
        if self.kind == "single":
            return 1
        p = self.period(steps)
        if p is not None:
            return math.ceil(steps / p)
        if self.kind == "shuffled":
            return math.ceil(steps / self.steps_per_epoch)
        k = math.ceil(steps / self.min_separation)
        return k if self.max_participations is None else min(k, self.max_participations)

"""Cyclic Poisson sampling for amplified banded matrix factorization (Choquette-Choo, Ganesh,
McKenna, McMahan, Rush, Thakurta, Xu 2023, "(Amplified) Banded Matrix Factorization", NeurIPS,
arXiv 2306.08153, section 4 / Algorithm 2): the data set is cut once into b parts and step t
Poisson-samples part t mod b with rate q. Each record's part is drawn independently and
uniformly at the loader's construction (jax_privacy's INDEPENDENT partition): adding or
removing a record moves no other record to another part, as add/remove adjacency needs (a rule
by index, j mod b, would shift every later record's part when one is inserted).

Every record can join a step only every b steps, so with a b-banded strategy C its
participations touch disjoint row blocks of C, and the run is accounted as ceil(T / b)
Poisson-sampled Gaussians with sigma / zeta (zeta: C's largest column norm; Theorem 4 of the
paper; the events come from ``NoiseStrategy.step_event`` with participation "cyclic_poisson").
That only holds if step t really uses a batch of part t mod b: :class:`CyclicSteps` refuses,
before anything changes, a step whose batch came from another part (a batch skipped or fetched
ahead, a loader restarted after a resume without :meth:`CyclicPoissonDataLoader.align`).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler

from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.privacy.data import DPDataLoader
from ppml_fast.secure_random import bernoulli_mask, uniform53


class CyclicPoissonBatchSampler(Sampler[list[int]]):
    """``num_batches`` batches per epoch; the i-th batch ever drawn (counted across epochs, from
    ``next_part``) holds each record of part i mod ``parts`` with probability ``sample_rate``,
    independently. Parts: one uniform draw per record, once. ``secure``: the parts and the
    inclusions from the OS CSPRNG (a ``generator`` is then an error)."""

    def __init__(self, num_samples: int, sample_rate: float, num_batches: int, parts: int,
                 generator: Optional[torch.Generator] = None, *, secure: bool = False) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= num_samples:
            raise ValueError(f"parts must be an int in [1, {num_samples}] (the data set's size); got {parts!r}")
        if secure and generator is not None:
            raise ValueError("generator was passed with secure=True: secure-mode sampling draws "
                             "from the OS CSPRNG and cannot be seeded; pass generator=None")
        self.num_samples, self.sample_rate, self.num_batches = num_samples, sample_rate, num_batches
        self.parts, self.generator, self.secure = parts, generator, bool(secure)
        self.next_part = 0  # global index of the next batch: its part is next_part % parts
        if secure:
            u = uniform53(num_samples)
        else:
            u = torch.rand(num_samples, generator=generator, dtype=torch.float64)
        self.part_of = (u * parts).long().clamp_(max=parts - 1)  # record -> its part
        self._members = [torch.nonzero(self.part_of == p).flatten() for p in range(parts)]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        self.epoch_sizes, self.epoch_parts = [], []
        for _ in range(self.num_batches):
            part = self.next_part % self.parts
            self.next_part += 1
            members = self._members[part]
            if self.secure:
                mask = bernoulli_mask(len(members), self.sample_rate)
            else:
                mask = torch.rand(len(members), generator=self.generator) < self.sample_rate
            batch = members[mask].tolist()
            self.epoch_sizes.append(len(batch))
            self.epoch_parts.append(part)
            yield batch


class CyclicPoissonDataLoader(DPDataLoader):
    """A :class:`DPDataLoader` whose batch i Poisson-samples part i mod ``parts`` at
    ``sample_rate`` (module docstring); ``expected_batch_size`` is ``sample_rate * N / parts``
    (the fixed denominator of the average: a part's expected size is N / parts)."""

    def __init__(self, dataset, *, sample_rate: float, parts: int, num_batches: Optional[int] = None,
                 **kwargs) -> None:
        self.parts = parts
        super().__init__(dataset, sample_rate=sample_rate, num_batches=num_batches, **kwargs)

    def _batch_sampler(self, num_samples, num_batches, generator):
        return CyclicPoissonBatchSampler(num_samples, self.sample_rate, num_batches, self.parts,
                                         generator, secure=self.secure)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.dataset) / self.parts  # type: ignore[arg-type]

    @property
    def last_part(self) -> Optional[int]:
        """The part of the batch handed out last (None before the first)."""
        return self.__dict__.get("_last_part")

    def align(self, step: int) -> None:
        """The next batch drawn samples part ``step`` mod ``parts`` (after a resume at ``step``;
        batches already fetched ahead by workers keep their parts and are refused)."""
        self.batch_sampler.next_part = int(step)

    def __iter__(self):
        sampler = self.batch_sampler
        for i, batch in enumerate(super().__iter__()):
            parts = getattr(sampler, "epoch_parts", None)
            self.__dict__["_last_part"] = parts[i] if parts is not None and i < len(parts) else None
            yield batch

    @classmethod
    def from_data_loader(cls, data_loader, *, parts: int, generator=None,
                         secure: bool = False) -> "CyclicPoissonDataLoader":
        """Cyclic Poisson sampling with ``data_loader``'s batches per epoch and expected batch
        size: q = parts / len(data_loader) within each part (at most 1)."""
        n = len(data_loader)
        if n == 0:
            raise ValueError("data_loader has no batches")
        if parts > n:
            raise ValueError(f"bands={parts} exceeds the {n} batches of data_loader: cyclic Poisson "
                             f"sampling over {parts} parts needs a part's sampling rate "
                             f"{parts}/{n} <= 1; use fewer bands or smaller batches")
        return cls(data_loader.dataset, sample_rate=parts / n, parts=parts, num_batches=n,
                   collate_fn=data_loader.collate_fn, generator=generator, secure=secure,
                   num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory)


class CyclicSteps:
    """Refuses a DP step whose batch is not the one cyclic Poisson sampling assigns to it: step
    t must use exactly one new batch of ``loader``, of part t mod parts."""

    def __init__(self, loader: CyclicPoissonDataLoader) -> None:
        self.loader = loader
        self._drawn = loader.batches_yielded

    def check(self, step: int, segment_start: int = 0, records: Optional[int] = None) -> None:
        from ppml_fast.privacy.fixed_batches import _check_records

        new = self.loader.batches_yielded - self._drawn
        part, want = self.loader.last_part, step % self.loader.parts
        if new != 1 or part != want:
            raise PrivacyError(
                f"step {step}: cyclic Poisson sampling (amplified banded MF) needs this step to use "
                f"one new batch of part {want} (step mod {self.loader.parts}); {new} batch(es) were "
                f"drawn since the last step, the last of part {part}: draw exactly one batch per "
                "step, in order (after a resume, loader.align(optimizer.steps)); nothing was changed")
        sizes = self.loader.yielded_sizes(1)
        _check_records(step, records, sizes[0] if sizes and sizes[0] >= 0 else None)

    def stepped(self) -> None:
        self._drawn = self.loader.batches_yielded

    def aligned(self, step: int, segment_start: int) -> bool:
        """A resumed run re-aligns the loader (:meth:`CyclicPoissonDataLoader.align`)."""
        return True

"""Data for DP-SGD: Poisson sampling (each record joins each batch independently with
probability q — the sampling the accountants assume) and virtual batches (one logical batch in
memory-bounded physical chunks, what Opacus's BatchMemoryManager does).
"""

from __future__ import annotations

import numbers
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate


class PoissonBatchSampler(Sampler[list[int]]):
    """``num_batches`` batches per epoch; each index is in each batch with probability
    ``sample_rate``, independently (batches may be empty)."""

    def __init__(self, num_samples: int, sample_rate: float, num_batches: int,
                 generator: Optional[torch.Generator] = None) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        self.num_samples, self.sample_rate, self.num_batches = num_samples, sample_rate, num_batches
        self.generator = generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


def _empty_like(sample) -> object:
    """A batch of zero records shaped like ``sample`` (a collated single record)."""
    if isinstance(sample, torch.Tensor):
        return sample.new_empty((0, *sample.shape[1:]))
    if isinstance(sample, (list, tuple)):
        return type(sample)(_empty_like(s) for s in sample)
    if isinstance(sample, dict):
        return {k: _empty_like(v) for k, v in sample.items()}
    return sample


class _CollateWithEmpty:
    def __init__(self, dataset: Dataset, collate_fn) -> None:
        self.dataset, self.collate_fn = dataset, collate_fn

    def __call__(self, batch):
        if len(batch):
            return self.collate_fn(batch)
        return _empty_like(self.collate_fn([self.dataset[0]]))


class DPDataLoader(DataLoader):
    """A DataLoader with Poisson sampling: ``len(data_loader)`` batches per epoch, expected
    batch size ``sample_rate * len(dataset)``."""

    def __init__(self, dataset: Dataset, *, sample_rate: float, num_batches: Optional[int] = None,
                 collate_fn=None, generator: Optional[torch.Generator] = None, **kwargs) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("dataset must not be empty")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        num_batches = num_batches if num_batches is not None else max(1, round(1 / sample_rate))
        self.sample_rate = float(sample_rate)
        super().__init__(
            dataset,
            batch_sampler=PoissonBatchSampler(n, self.sample_rate, num_batches, generator),
            collate_fn=_CollateWithEmpty(dataset, collate_fn or default_collate),
            generator=generator,
            **kwargs,
        )

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.dataset)  # type: ignore[arg-type]

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator=None) -> "DPDataLoader":
        """Poisson sampling with the rate of ``data_loader``'s batches: q = 1 / len(data_loader)."""
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch DataLoader; got {type(data_loader).__name__}")
        num_batches = len(data_loader)
        if num_batches == 0:
            raise ValueError("data_loader has no batches")
        return cls(data_loader.dataset, sample_rate=1 / num_batches, num_batches=num_batches,
                   collate_fn=data_loader.collate_fn, generator=generator,
                   num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory)


def _split(batch, max_size: int) -> list:
    """A collated batch cut into chunks of at most ``max_size`` records (first dimension)."""
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0]
        return [batch[i:i + max_size] for i in range(0, n, max_size)] or [batch]
    if isinstance(batch, (list, tuple)):
        parts = [_split(b, max_size) for b in batch]
        k = max(len(p) for p in parts)
        return [type(batch)(p[i] if i < len(p) else p[-1][:0] for p in parts) for i in range(k)]
    if isinstance(batch, dict):
        parts = {key: _split(v, max_size) for key, v in batch.items()}
        k = max(len(p) for p in parts.values())
        return [{key: p[i] for key, p in parts.items()} for i in range(k)]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


class BatchMemoryManager:
    """Yields physical batches of at most ``max_physical_batch_size`` records; the optimizer
    steps once per logical batch (it is told to skip the step after all but the last chunk)::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=64, optimizer=opt) as loader:
            for x, y in loader: ...  # forward, backward, optimizer.step() as usual
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer) -> None:
        if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) \
                or max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be an int >= 1; got {max_physical_batch_size!r}")
        self.data_loader, self.max_size, self.optimizer = data_loader, max_physical_batch_size, optimizer

    def __enter__(self) -> Iterator:
        return self._iterate()

    def __exit__(self, *exc) -> None:
        self.optimizer.signal_skip_step(False)

    def __iter__(self) -> Iterator:
        return self._iterate()

    def _iterate(self) -> Iterator:
        for batch in self.data_loader:
            chunks = _split(batch, self.max_size)
            for i, chunk in enumerate(chunks):
                self.optimizer.signal_skip_step(i < len(chunks) - 1)
                yield chunk

    def __len__(self) -> int:
        return len(self.data_loader)

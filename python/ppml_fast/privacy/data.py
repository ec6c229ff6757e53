"""Data for DP-SGD: Poisson sampling (each record joins each batch independently with
probability q — the sampling the accountants assume), its distributed form (disjoint shards, one
per ``torch.distributed`` rank, each Poisson-sampled with q), and virtual batches (one logical
batch in memory-bounded physical chunks, what Opacus's BatchMemoryManager does).
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping
import os
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from ppml_fast.secure_random import bernoulli_mask


class PoissonBatchSampler(Sampler[list[int]]):
    """``num_batches`` batches per epoch; each index is in each batch with probability
    ``sample_rate``, independently (batches may be empty). ``secure=True``: inclusion drawn from
    the OS CSPRNG (:func:`ppml_fast.secure_random.bernoulli_mask`), not torch's generator; a
    ``generator`` is then an error."""

    def __init__(self, num_samples: int, sample_rate: float, num_batches: int,
                 generator: Optional[torch.Generator] = None, *, secure: bool = False) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        if secure is not False and secure is not True:
            raise TypeError(f"secure must be a bool; got {type(secure).__name__}")
        if secure and generator is not None:
            raise ValueError("generator was passed with secure=True: secure-mode sampling draws "
                             "from the OS CSPRNG and cannot be seeded; pass generator=None")
        self.num_samples, self.sample_rate, self.num_batches = num_samples, sample_rate, num_batches
        self.generator, self.secure = generator, secure

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        self.epoch_sizes = []  # the i-th batch's record count (DPDataLoader.yielded_sizes)
        for _ in range(self.num_batches):
            if self.secure:
                mask = bernoulli_mask(self.num_samples, self.sample_rate)
            else:
                mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            batch = mask.nonzero().flatten().tolist()
            self.epoch_sizes.append(len(batch))
            yield batch


def _empty_like(sample) -> object:
    """A batch of zero records shaped like ``sample`` (a collated single record)."""
    if isinstance(sample, torch.Tensor):
        return sample.new_empty((0, *sample.shape[1:]))
    if isinstance(sample, (list, tuple)):
        return type(sample)(_empty_like(s) for s in sample)
    if isinstance(sample, Mapping):  # dicts, and e.g. a tokenizer's BatchEncoding (UserDict)
        empty = {k: _empty_like(v) for k, v in sample.items()}
        try:
            return type(sample)(empty)
        except Exception:  # a mapping type that cannot be built from a dict
            return empty
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
                 collate_fn=None, generator: Optional[torch.Generator] = None, secure: bool = False,
                 **kwargs) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("dataset must not be empty")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        num_batches = num_batches if num_batches is not None else max(1, round(1 / sample_rate))
        self.sample_rate = float(sample_rate)
        self.secure = secure  # PoissonBatchSampler(secure=): the OS CSPRNG
        super().__init__(
            dataset,
            batch_sampler=self._batch_sampler(n, num_batches, generator),
            collate_fn=_CollateWithEmpty(dataset, collate_fn or default_collate),
            generator=generator,
            **kwargs,
        )

    def _batch_sampler(self, num_samples: int, num_batches: int,
                       generator: Optional[torch.Generator]) -> Sampler[list[int]]:
        return PoissonBatchSampler(num_samples, self.sample_rate, num_batches, generator,
                                   secure=self.secure)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.dataset)  # type: ignore[arg-type]

    @property
    def batches_yielded(self) -> int:
        """How many sampled batches this loader has handed out (the DP optimizer refuses a step
        that accumulated two of them: each is one Poisson sampling of the dataset)."""
        return self.__dict__.get("_batches_yielded", 0)

    def yielded_sizes(self, last: int) -> list[int]:
        """The record counts of the ``last`` batches handed out (at most the 64 latest)."""
        sizes = self.__dict__.get("_yielded_sizes", [])
        return sizes[-last:] if last > 0 else []

    def __iter__(self):
        sampler = self.batch_sampler
        for i, batch in enumerate(super().__iter__()):
            # the DataLoader hands batches out in the sampler's order, also with workers that
            # fetch ahead: the i-th batch is the sampler's i-th index list
            sizes = getattr(sampler, "epoch_sizes", None)
            kept = self.__dict__.setdefault("_yielded_sizes", [])
            kept.append(sizes[i] if sizes is not None and i < len(sizes) else -1)
            del kept[:-64]
            self.__dict__["_batches_yielded"] = self.batches_yielded + 1
            yield batch

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator=None,
                         secure: bool = False) -> "DPDataLoader":
        """Poisson sampling with the rate of ``data_loader``'s batches: q = 1 / len(data_loader)
        (``secure``: from the OS CSPRNG, see :class:`PoissonBatchSampler`)."""
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch DataLoader; got {type(data_loader).__name__}")
        num_batches = len(data_loader)
        if num_batches == 0:
            raise ValueError("data_loader has no batches")
        return cls(data_loader.dataset, sample_rate=1 / num_batches, num_batches=num_batches,
                   collate_fn=data_loader.collate_fn, generator=generator, secure=secure,
                   num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory)


def _rank_generator(generator: Optional[torch.Generator], rank: int, num_replicas: int) -> torch.Generator:
    """The sampling stream of rank ``rank``: a fresh CPU generator.

    ``None``: seeded from OS entropy (``os.urandom``), so ranks and runs never share masks, even
    when every rank called ``torch.manual_seed`` alike. A user ``generator`` (typically the same
    seed on every rank): seeded with SHA-256(its state, rank, num_replicas), so the ranks get
    distinct, reproducible streams instead of drawing the same masks; the user's generator is
    read, not advanced. Streams of torch's Mersenne Twister from distinct hashed seeds are not
    proven independent, only practically so; it is no CSPRNG (secure mode needs one).
    """
    if generator is None:
        seed = int.from_bytes(os.urandom(8), "little")
    elif isinstance(generator, torch.Generator):
        h = hashlib.sha256(b"ppml_fast.DistributedPoissonBatchSampler\0")
        h.update(generator.get_state().cpu().numpy().tobytes())
        h.update(rank.to_bytes(8, "little") + num_replicas.to_bytes(8, "little"))
        seed = int.from_bytes(h.digest()[:8], "little")
    else:
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _check_int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    return int(v)


class DistributedPoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling over ``num_replicas`` ranks, this sampler being rank ``rank``'s part.

    The dataset is cut into disjoint shards that cover it once — record ``j`` belongs to rank
    ``j % num_replicas`` (no padding, no repeated record, unlike ``DistributedSampler``) — and
    each rank includes each record of its own shard in each of its ``num_batches`` batches
    independently with probability ``sample_rate``. Batch ``i`` of every rank together form
    logical step ``i``: each record is in it with probability ``sample_rate`` and in at most
    one rank's batch, which is the Poisson subsampling the accountant composes
    (PoissonSampled(q); Abadi et al. 2016 §3.1, Mironov et al. 2019 "Rényi DP of the Sampled
    Gaussian Mechanism" §3). Every rank yields ``num_batches`` batches (some possibly empty), so
    the ranks step in lockstep.

    Inclusion is decided on 53-bit integers: record in iff ``k < floor(q 2^53)`` with ``k``
    uniform in [0, 2^53), a probability in (q - 2^-53, q] — never above the accounted ``q``.
    Randomness: see :func:`_rank_generator` (``generator=None``: OS entropy; a user generator
    yields a distinct stream per rank). ``secure=True``: every mask from the OS CSPRNG
    (:func:`ppml_fast.secure_random.bernoulli_mask`, the same 53-bit rule), each rank reading
    its own fresh bytes; a ``generator`` is then an error (DESIGN.md invariant 3).
    """

    def __init__(self, num_samples: int, sample_rate: float, num_batches: int, *, num_replicas: int,
                 rank: int, generator: Optional[torch.Generator] = None, secure: bool = False) -> None:
        num_samples = _check_int("num_samples", num_samples, 1)
        num_batches = _check_int("num_batches", num_batches, 1)
        num_replicas = _check_int("num_replicas", num_replicas, 1)
        rank = _check_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}); got {rank}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        if secure is not False and secure is not True:
            raise TypeError(f"secure must be a bool; got {type(secure).__name__}")
        if secure and generator is not None:
            raise ValueError("generator was passed with secure=True: secure-mode sampling draws "
                             "from the OS CSPRNG and cannot be seeded; pass generator=None")
        self.num_samples, self.sample_rate, self.num_batches = num_samples, float(sample_rate), num_batches
        self.num_replicas, self.rank, self.secure = num_replicas, rank, secure
        self.generator = None if secure else _rank_generator(generator, rank, num_replicas)
        self._threshold = int(self.sample_rate * 2.0**53)  # exact: a power-of-two scaling, then floor

    @property
    def shard(self) -> torch.Tensor:
        """This rank's records: ``rank, rank + num_replicas, ...``."""
        return torch.arange(self.rank, self.num_samples, self.num_replicas)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        self.epoch_sizes = []  # the i-th batch's record count (DPDataLoader.yielded_sizes)
        shard = self.shard
        for _ in range(self.num_batches):
            if self.secure:
                mask = bernoulli_mask(len(shard), self.sample_rate)
            else:  # randint over a power-of-two range is exactly uniform (64 random bits mod 2^53)
                bits = torch.randint(0, 2**53, (len(shard),), generator=self.generator, dtype=torch.int64)
                mask = bits < self._threshold
            batch = shard[mask].tolist()
            self.epoch_sizes.append(len(batch))
            yield batch


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed Poisson sampling needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) or num_replicas and rank given")
    return dist.get_world_size(), dist.get_rank()


def _distributed_sampler(data_loader: DataLoader):
    from torch.utils.data.distributed import DistributedSampler

    for s in (data_loader.sampler, getattr(data_loader.batch_sampler, "sampler", None)):
        if isinstance(s, DistributedSampler):
            return s
    return None


class DistributedDPDataLoader(DPDataLoader):
    """Rank ``rank``'s loader of distributed Poisson sampling
    (:class:`DistributedPoissonBatchSampler`): ``num_batches`` batches per epoch drawn from this
    rank's shard at rate ``sample_rate``. ``expected_batch_size`` is the global one, q N (N the
    whole dataset: the denominator of the all-reduced gradient);
    ``local_expected_batch_size`` is this rank's share. Every rank must hold the same whole
    dataset (not a rank-local part). ``num_replicas``/``rank`` default to torch.distributed's.
    """

    def __init__(self, dataset: Dataset, *, sample_rate: float, num_batches: Optional[int] = None,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None, collate_fn=None,
                 generator: Optional[torch.Generator] = None, **kwargs) -> None:
        if num_replicas is None or rank is None:
            world, me = _world()
            num_replicas = world if num_replicas is None else num_replicas
            rank = me if rank is None else rank
        self.num_replicas, self.rank = num_replicas, rank
        super().__init__(dataset, sample_rate=sample_rate, num_batches=num_batches, collate_fn=collate_fn,
                         generator=generator, **kwargs)

    def _batch_sampler(self, num_samples: int, num_batches: int,
                       generator: Optional[torch.Generator]) -> Sampler[list[int]]:
        return DistributedPoissonBatchSampler(num_samples, self.sample_rate, num_batches,
                                              num_replicas=self.num_replicas, rank=self.rank,
                                              generator=generator, secure=self.secure)

    @property
    def local_expected_batch_size(self) -> float:
        return self.sample_rate * len(self.batch_sampler.shard)  # type: ignore[attr-defined]

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator=None,
                         secure: bool = False) -> "DistributedDPDataLoader":
        """Distributed Poisson sampling with Opacus's rate q = 1 / len(data_loader) (the per-rank
        loader's number of batches: with a DistributedSampler of batch size B, q ~ B W / N, a
        global expected batch of about B W; without one, q ~ B / N). A DistributedSampler's
        ``num_replicas``/``rank`` must match torch.distributed; its partition and padding are
        not used. Collective: every rank calls it (it checks that the ranks agree on the
        dataset size and the number of batches). ``secure``: masks from the OS CSPRNG."""
        import torch.distributed as dist

        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch DataLoader; got {type(data_loader).__name__}")
        world, rank = _world()
        sampler = _distributed_sampler(data_loader)
        if sampler is not None and (sampler.num_replicas, sampler.rank) != (world, rank):
            raise ValueError(
                f"data_loader's DistributedSampler has num_replicas={sampler.num_replicas}, rank={sampler.rank}; "
                f"torch.distributed has world_size={world}, rank={rank}: they must match")
        num_batches = len(data_loader)
        if num_batches == 0:
            raise ValueError("data_loader has no batches")
        mine = (len(data_loader.dataset), num_batches)  # type: ignore[arg-type]
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        if any(o != mine for o in everyone):
            raise ValueError("every rank must pass a loader over the same whole dataset with the same number "
                             f"of batches; (len(dataset), len(data_loader)) per rank: {everyone}")
        return cls(data_loader.dataset, sample_rate=1 / num_batches, num_batches=num_batches,
                   num_replicas=world, rank=rank, collate_fn=data_loader.collate_fn, generator=generator,
                   secure=secure, num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory)


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

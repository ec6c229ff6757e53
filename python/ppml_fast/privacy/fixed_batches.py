"""The batch order a correlated-noise run is accounted for, enforced step by step.

With ``poisson_sampling=False`` a tree / banded-MF run is accounted for the participation the
loader gives when it is iterated epoch after epoch, one batch per step
(:mod:`ppml_fast.privacy.correlated_plan`): fixed order — record j in steps i, i + K, ... — or
shuffled, one step per record per epoch. A loop that breaks an epoch off and starts a new pass,
skips a batch or puts two batches into one step would put a record into steps the sensitivity
never counted (a record of batch 0 in steps 0 and 3 when the loop restarts after 3 steps). The
DP-SGD accountant can charge such steps more (:mod:`ppml_fast.privacy.sampling`); a matrix
mechanism's sensitivity is fixed in advance, so here they are refused before anything changes.

:class:`FixedBatchesDataLoader` is the user's loader rebuilt with the same sampler object, batch
size, ``drop_last``, collate function and workers (the batches are the ones the user's loader
would give), which counts the batches it hands out and their position in their pass;
:class:`BatchOrder` requires step t (of the noise's current segment, started at step s) to use
exactly one new batch, at position (t - s) mod K of its pass, and to hold at most that batch's
records (a step on ``torch.cat([x, augment(x)])`` holds every record twice: its clipped sum
moves by 2C, which the sensitivity never counted). Batches are counted when handed to the loop,
so DataLoader workers that prefetch do not matter.
"""

from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader

from ppml_fast.accounting.errors import PrivacyError


class FixedBatchesDataLoader(DataLoader):
    """A DataLoader that counts the batches it hands out (``handed``) and the position of the
    last one in its pass (``position``); build it with :meth:`from_data_loader`."""

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader) -> "FixedBatchesDataLoader":
        """``data_loader``'s batches (same sampler object, batch size, drop_last, collate_fn,
        workers); it must batch with ``batch_size`` (no custom ``batch_sampler``)."""
        if data_loader.batch_size is None:
            raise ValueError("data_loader must have a batch_size when poisson_sampling=False")
        kw = dict(batch_size=data_loader.batch_size, sampler=data_loader.sampler,
                  drop_last=data_loader.drop_last, collate_fn=data_loader.collate_fn,
                  num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
                  timeout=data_loader.timeout, worker_init_fn=data_loader.worker_init_fn,
                  multiprocessing_context=data_loader.multiprocessing_context,
                  generator=data_loader.generator, persistent_workers=data_loader.persistent_workers)
        if data_loader.num_workers > 0:
            kw["prefetch_factor"] = data_loader.prefetch_factor
        return cls(data_loader.dataset, **kw)

    @property
    def handed(self) -> int:
        """Batches handed out so far (all passes)."""
        return self.__dict__.get("_handed", 0)

    @property
    def last_size(self) -> Optional[int]:
        """The record count of the batch handed out last (None before the first)."""
        return self.__dict__.get("_last_size")

    @property
    def position(self) -> Optional[int]:
        """The position in its pass of the batch handed out last (None before the first)."""
        return self.__dict__.get("_position")

    def __iter__(self):
        n, size = len(self.sampler), self.batch_size  # BatchSampler: batch i holds min(B, n - iB)
        for i, batch in enumerate(super().__iter__()):
            self.__dict__["_handed"] = self.handed + 1
            self.__dict__["_position"] = i
            self.__dict__["_last_size"] = max(min(size, n - i * size), 0)
            yield batch


class BatchOrder:
    """Refuses a step that is not the next batch of the accounted order (module docstring)."""

    def __init__(self, loader: FixedBatchesDataLoader) -> None:
        self.loader, self.per_epoch = loader, len(loader)
        self._handed = loader.handed

    def check(self, step: int, segment_start: int, records: Optional[int] = None) -> None:
        new, pos = self.loader.handed - self._handed, self.loader.position
        want = (step - segment_start) % self.per_epoch
        if new != 1 or pos != want:
            raise PrivacyError(
                f"step {step}: the correlated noise is accounted for one batch per step, epoch after "
                f"epoch ({self.per_epoch} batches each), so this step must use one new batch at "
                f"position {want} of its pass; {new} batch(es) were drawn from the loader make_private "
                f"returned since the last step, the last at position {pos}. Do not skip batches, "
                "break an epoch off or start a pass mid-epoch (after a resume, start a new pass); "
                "nothing was changed")
        _check_records(step, records, self.loader.last_size)

    def stepped(self) -> None:
        self._handed = self.loader.handed

    def aligned(self, step: int, segment_start: int) -> bool:
        """Whether a fresh pass can serve ``step`` within the segment started at
        ``segment_start`` (a resumed run starts a new pass)."""
        return (step - segment_start) % self.per_epoch == 0


def _check_records(step: int, records: Optional[int], size: Optional[int]) -> None:
    """Refuses a step holding more records (rows) than the one batch it drew: some record is
    then in it twice (e.g. ``torch.cat([x, augment(x)])``), moving the clipped sum by 2C."""
    if records is not None and size is not None and records > size:
        raise PrivacyError(
            f"step {step}: this step holds {records} records (rows), but the one batch it drew "
            f"holds {size}: some record is in the step more than once (two views of one batch "
            "concatenated?), and its clipped sum could move by more than C, which the correlated "
            "noise's sensitivity does not count (average the views per record inside the model "
            "instead); nothing was changed")


def guard(loader):
    """The step-order check for ``loader`` (None for a loader that needs none)."""
    from ppml_fast.privacy.cyclic_poisson import CyclicPoissonDataLoader, CyclicSteps

    if isinstance(loader, CyclicPoissonDataLoader):
        return CyclicSteps(loader)
    if isinstance(loader, FixedBatchesDataLoader):
        return BatchOrder(loader)
    return None

"""The training data of :class:`~ppml_fast.integrations.huggingface.DPTrainer`: one Poisson
sample per optimizer step, handed to the Trainer as ``gradient_accumulation_steps`` parts.

The Trainer takes ``gradient_accumulation_steps`` (k) items from its loader per optimizer step.
Accumulating k independently sampled batches would put a record in one step up to k times while
the accountant counts one sampling (the engine refuses it: ``privacy/clipping.py``
``check_records``). Here each group of k items is *one* logical batch, drawn by the engine's
:class:`~ppml_fast.privacy.data.DPDataLoader` (each record in it independently with probability
q), cut into k parts of nearly equal size (a part may be empty); ``DPTrainer.training_step`` runs
each part in physical chunks of at most ``per_device_train_batch_size`` records and clips them
into the same step, as Opacus's BatchMemoryManager does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator, Optional

import torch


class Part(dict):
    """One of the k parts of a logical batch: the collated inputs (a dict), plus
    ``logical_size`` (records in the whole logical batch) and ``index`` (0 .. k - 1)."""

    logical_size: int = 0
    index: int = 0


class AsDict:
    """A collator whose output is a plain dict: the engine's empty-batch collation
    (``privacy/data.py`` ``_empty_like``) empties dicts, lists and tuples but not other mappings
    (a tokenizer's ``BatchEncoding``), which it would pass on unemptied."""

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, features):
        batch = self.collate_fn(features)
        if not isinstance(batch, Mapping):
            raise TypeError(f"the data collator must return a mapping of input names to tensors "
                            f"(what Hugging Face models take as keyword arguments); got "
                            f"{type(batch).__name__}")
        return dict(batch)


def records_in(batch: Mapping) -> int:
    """The number of records of a collated batch: the common first dimension of its tensors."""
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes:
        raise TypeError(f"a training batch must hold tensors with one row per record; got keys "
                        f"{sorted(batch)} without any")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the tensors of a training batch must all have one row per record; got "
                         f"first dimensions {sizes}")
    return next(iter(sizes.values()))


def slice_batch(batch: Mapping, start: int, stop: int) -> dict:
    """Records ``start:stop`` of a collated batch (every value a tensor with one row per record;
    anything else is refused: it could not be split by record)."""
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise TypeError(f"cannot split the training batch by record: {k!r} is "
                            f"{type(v).__name__}{' (0-d)' if isinstance(v, torch.Tensor) else ''}, "
                            "not a tensor with one row per record")
        out[k] = v[start:stop]
    return out


def bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``n`` records cut into ``parts`` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for j in range(parts):
        stop = start + base + (1 if j < extra else 0)
        out.append((start, stop))
        start = stop
    return out


class PoissonParts:
    """The Trainer's training loader: ``len(dp_loader) * parts`` items per epoch, each group of
    ``parts`` consecutive items one logical Poisson batch (:class:`Part`).

    ``base`` is the plain loader of logical batch size that the engine's ``make_private`` turns
    into its Poisson loader (q = 1 / len(base)); the Poisson loader is set by
    ``DPTrainer`` once the engine has made it (``dp_loader``), before the first iteration.
    """

    def __init__(self, base: torch.utils.data.DataLoader, parts: int) -> None:
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ValueError(f"parts (gradient_accumulation_steps) must be an int >= 1; got {parts!r}")
        self.base, self.parts = base, parts
        self.dp_loader: Optional[torch.utils.data.DataLoader] = None

    @property
    def dataset(self):
        return self.base.dataset

    @property
    def batches_yielded(self) -> int:
        """Logical batches drawn so far (the DP optimizer's one-sampling-per-step check)."""
        return getattr(self.dp_loader, "batches_yielded", 0)

    def __len__(self) -> int:
        return len(self.base) * self.parts

    def __iter__(self) -> Iterator[Part]:
        if self.dp_loader is None:
            raise RuntimeError("the Poisson loader is made with the DP optimizer (DPTrainer."
                               "create_scheduler, called by train()); iterate after that")
        for batch in self.dp_loader:
            n = records_in(batch)
            for j, (start, stop) in enumerate(bounds(n, self.parts)):
                part = Part(slice_batch(batch, start, stop))
                part.logical_size, part.index = n, j
                yield part

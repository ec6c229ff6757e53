"""One step, one sampled batch (DESIGN.md invariant 1; issue 14 item 4): the accountant counts one
Poisson sampling of rate q per step, so a step must not hold the records of two sampled batches
(a record in both would be in the step twice). :class:`SampledBatches` follows the batches a
:class:`~ppml_fast.privacy.data.DPDataLoader` hands out and the steps taken on them.
"""

from __future__ import annotations

import warnings
from typing import Optional

from ppml_fast.accounting.errors import PrivacyError


class SampledBatches:
    """The sizes of the batches drawn from ``loader`` that no step has used yet. With two or more
    of them (a loop that fetches ahead, two batches accumulated or concatenated, virtual-batch
    parts of two batches) a step's record count must equal one of their sizes, and the step
    uses that batch up; with one, the step may hold at most its records (a model may drop rows of
    its own batch; a row repeated as a record of its own would put that record in the step twice);
    with none, a step holding records is refused once the loader has handed out a batch (a
    second step on the same batch is not a fresh Poisson sample) and warned about before that
    (records that never came from the loader). A heuristic on sizes: two batches whose records were mixed into a count
    equal to one of them are not caught; that is code written to evade it."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._drawn = getattr(loader, "batches_yielded", 0)
        self._unused: list[int] = []
        self._after: Optional[list[int]] = None
        self._warned = False

    def check(self, records: int, step: int, forwards: int = 1) -> None:
        """Raises PrivacyError when a step of ``records`` records cannot be one sampled batch;
        nothing changes until :meth:`stepped`. ``forwards``: the backpropagated forwards of the
        step (two or more are the records layer's to refuse or accept, with ``same_records``)."""
        new = self.loader.batches_yielded - self._drawn
        queue = (self._unused + self.loader.yielded_sizes(new))[-64:]
        if not queue and records and self.loader.batches_yielded == 0:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"step {step}: this step holds {records} records, but nothing was drawn from "
                    "the Poisson loader make_private returned: the reported epsilon assumes each "
                    "step is one Poisson sample of that loader; iterate it (not your own loader)",
                    UserWarning, stacklevel=4)
        elif not queue and records:
            raise PrivacyError(
                f"step {step}: this step holds {records} records but no sampled batch was drawn "
                "from the Poisson loader since the last step: a second step on the same batch "
                "(several optimizer steps per batch) or on records from another loader is not "
                "the fresh Poisson sample of rate q the accountant counts for each step; draw "
                "one batch from the loader make_private returned for each step")
        if len(queue) == 1 and 0 <= queue[0] < records and forwards <= 1:
            raise PrivacyError(
                f"step {step}: this step holds {records} records, more than the {queue[0]} "
                "records of the sampled batch it was drawn from: rows repeated or added as "
                "records (e.g. torch.cat([x, augment(x)]) or a collate_fn that turns one record "
                "into several rows) put one record in the step more than once, and its clipped "
                "sum can then move by more than the clipping norm C the accountant assumes")
        if len(queue) >= 2 and records and records not in queue:
            raise PrivacyError(
                f"step {step}: this step holds {records} records, while the sampled batches "
                f"drawn from the Poisson loader and not yet stepped on hold {queue}: one step "
                "must be one sampled batch (the accountant counts one sampling of rate q), split "
                "into physical parts if needed with BatchMemoryManager; parts or concatenations "
                "of two batches would put a record in the step twice")
        if len(queue) >= 2 and records:
            queue.remove(records)  # the oldest batch of that size: this step's
        elif len(queue) == 1:
            queue = []
        self._after = queue

    def stepped(self) -> None:
        """The checked step was taken: its batch is used up."""
        self._drawn = self.loader.batches_yielded
        self._unused, self._after = self._after or [], None

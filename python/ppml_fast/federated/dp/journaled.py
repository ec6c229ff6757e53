"""The optional privacy journal of the server-side DP-FedAvg strategies: what a crashed server
needs to resume without replaying noise or forgetting rounds (DESIGN.md invariants 3 and 4).

``DPFedAvgFixed(..., journal=path)`` / ``DPFedAvgAdaptive(..., journal=path)`` append one
:class:`~ppml_fast.privacy.journal.PrivacyJournal` record per noise reservation — before the
noise is drawn (write + fsync): the round, its accounting event (the update's release; None for
adaptive clipping's count, whose cost is in the update's event, Andrew et al. 2021, Theorem 1),
the SHA-256 name of the noise key (never the key) and the offset range. On
``load_state_dict``:

- the accountant gets the state's history plus the event of every record the state did not
  count (rounds released after it, a crash's lost rounds), and ``rounds`` their number: epsilon
  never under-reports a released round;
- the noise follows :func:`ppml_fast.noise_keys.resume_key`: a user's key continues only when
  this is the journal the state was saved with (same id and path: it holds every offset
  reserved after the state), after the last offset it reserved under that key; otherwise, or
  with an OS-drawn key (never saved), a fresh OS key.

One journal per run (a new run uses a new path): records already in the file when the strategy
is built are counted at once, as for the DP optimizer (:func:`ppml_fast.privacy.state.attach`).
"""

from __future__ import annotations

import os
from typing import Optional, Union

from ppml_fast.accounting.events import Event
from ppml_fast.privacy.journal import JournalRecord, PrivacyJournal

__all__ = ["open_journal", "record", "unseen", "rounds_in"]


def open_journal(journal: Union[None, str, os.PathLike, PrivacyJournal]) -> Optional[PrivacyJournal]:
    """None, or the journal at ``journal`` (a path or an open PrivacyJournal)."""
    if journal is None or isinstance(journal, PrivacyJournal):
        return journal
    if not isinstance(journal, (str, os.PathLike)):
        raise TypeError(f"journal must be None, a path (str or os.PathLike) or a PrivacyJournal; "
                        f"got {type(journal).__name__}")
    return PrivacyJournal(journal)


def record(journal: Optional[PrivacyJournal], *, step: int, event: Optional[Event], key: int,
           start: int, blocks: int) -> None:
    """Durably records one reservation before its noise exists (nothing without a journal)."""
    if journal is not None:
        journal.reserve(step=step, event=event, unnoised=False, seed=key, offset=(start, start + blocks))


def unseen(journal: Optional[PrivacyJournal], position: Optional[dict]) -> list[JournalRecord]:
    """The records a state saved at ``position`` does not count (all of them for another journal)."""
    return [] if journal is None else journal.since(position)


def rounds_in(records: list[JournalRecord]) -> int:
    """How many rounds ``records`` released (a round may reserve twice: update and count)."""
    return len({r.step for r in records})

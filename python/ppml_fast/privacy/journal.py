"""PrivacyJournal: a crash-safe, append-only record of every DP step's cost and noise range.

DESIGN.md invariant 4 (record before release): before a step's noisy gradient exists, the
optimizer appends one line to the journal — the step's accounting event and the range of noise
offsets (Philox blocks) it is about to use — and fsyncs it. A ``kill -9`` at any point therefore
leaves in the journal every step whose gradient may have been seen (and possibly one that was
not: a crash can only over-report epsilon). On resume (:meth:`DPOptimizer.load_state_dict`,
``PrivacyEngine.load_checkpoint``) every record the loaded state does not already count is
composed into the accountant. The noise continues under the state's key (after the last offset
reserved under it) only when this is the journal the state was saved with (:meth:`vouches_for`:
same id and path); otherwise it is re-keyed (:func:`ppml_fast.noise_keys.resume_key`), so no
noise is ever drawn twice (invariant 3).

File format (JSON lines, UTF-8): a header ``{"format": "ppml_fast.PrivacyJournal", "version":
1, "id": <random hex>}`` then one record per step::

    {"seq": 7, "step": 7, "event": {...event_to_dict...} | null, "unnoised": false,
     "key": "<16 hex digits: SHA-256 of the noise key>", "offset": [start, end]}

The noise key itself is never written (whoever reads the journal learns nothing about the
noise); records are matched to a stream by the key's hash. ``seq`` numbers records from 0; a
state saved by the optimizer remembers the journal's id and how many records it had counted.
A record cut short by a crash (no final newline) was never acknowledged, so nothing was
released after it: it is dropped when the journal is opened — unless it parses as a whole
record, which is then kept (over-reporting is safe, under-reporting is not).

One writer: the journal holds an exclusive ``flock`` on ``<path>.lock`` while it is open;
another process (or another journal object in this one) opening the same path gets an error.
Close it (:meth:`close`) to hand the path to another optimizer in the same process. Cost: one
small append and one ``fsync`` per DP step (measured in tests/privacy/test_journal.py's notes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from typing import Optional, Union

from ppml_fast.accounting.events import Event
from ppml_fast.accounting.serialization import event_from_dict, event_to_dict

FORMAT = "ppml_fast.PrivacyJournal"
VERSION = 1


def key_hash(seed: int) -> str:
    """The public name of a noise key in the journal: 16 hex digits of SHA-256(key)."""
    return hashlib.sha256(b"ppml_fast journal key" + int(seed).to_bytes(8, "little")).hexdigest()[:16]


@dataclass(frozen=True)
class JournalRecord:
    """One reserved step: its event (None when no accountant was attached), whether it ran
    without noise (sigma 0: infinite epsilon), the hash of its noise key and its offset range."""

    seq: int
    step: int
    event: Optional[Event]
    unnoised: bool
    key: str
    offset: tuple[int, int]


class PrivacyJournal:
    """The append-only journal at ``path`` (created if missing). See the module docstring."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
            raise TypeError(f"journal must be a str or os.PathLike path; got {type(path).__name__} {path!r}")
        self.path = os.path.abspath(os.fspath(path))
        self._lock_fd: Optional[int] = None
        self._fd: Optional[int] = None
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise RuntimeError(f"journal {self.path} is open in another process or by another "
                               "optimizer; one journal has one writer (close the other first)") from None
        try:
            self.id, self.records = self._open()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd

    # -- reading -----------------------------------------------------------------------------
    def _open(self) -> tuple[str, list[JournalRecord]]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        if b"\n" not in raw:  # new, or a header cut short at creation: no record can exist
            return self._create(), []
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        try:
            header = json.loads(lines[0])
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(f"expected a header with 'format': {FORMAT!r}")
            if header.get("version") != VERSION or not isinstance(header.get("id"), str):
                raise ValueError(f"expected version {VERSION} and a str 'id'; got {header!r}")
            records = [_parse(line, i) for i, line in enumerate(lines[1:]) if line.strip()]
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"{self.path} is not a readable {FORMAT} file: {e}") from e
        if tail:
            try:  # a whole record missing only its newline: keep it (over-report, never under)
                records.append(_parse(tail, len(records)))
                _append(self.path, b"\n")
            except (ValueError, TypeError, KeyError, IndexError):
                with open(self.path, "r+b") as f:  # cut short by a crash: never acknowledged
                    f.truncate(len(raw) - len(tail))
                    f.flush()
                    os.fsync(f.fileno())
        for i, r in enumerate(records):
            if r.seq != i:
                raise ValueError(f"{self.path}: record {i} has seq {r.seq}; the journal was edited")
        return header["id"], records

    def _create(self) -> str:
        jid = secrets.token_hex(8)
        header = json.dumps({"format": FORMAT, "version": VERSION, "id": jid}) + "\n"
        tmp = self.path + ".new"
        with open(tmp, "wb") as f:
            f.write(header.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a reader sees no header or a whole one
        _fsync_dir(self.path)
        return jid

    # -- writing -----------------------------------------------------------------------------
    def reserve(self, *, step: int, event: Optional[Event], unnoised: bool, seed: int,
                offset: tuple[int, int]) -> JournalRecord:
        """Durably appends the record of one step (write + fsync) and returns it. Call before
        the step's noise is drawn; on an error nothing may be released."""
        if self._fd is None:
            raise RuntimeError(f"journal {self.path} is closed")
        record = JournalRecord(len(self.records), int(step), event, bool(unnoised), key_hash(seed),
                               (int(offset[0]), int(offset[1])))
        line = json.dumps({
            "seq": record.seq, "step": record.step,
            "event": None if event is None else event_to_dict(event),
            "unnoised": record.unnoised, "key": record.key, "offset": list(record.offset),
        }, allow_nan=False) + "\n"
        data = line.encode()
        size = os.fstat(self._fd).st_size
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError(f"short write to journal {self.path}")
            os.fsync(self._fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)  # a record that failed is not left half-written
            raise
        self.records.append(record)
        return record

    # -- queries -----------------------------------------------------------------------------
    def next_offset(self, seed: int) -> int:
        """The first offset after every range reserved under noise key ``seed`` (0 if none)."""
        h = key_hash(seed)
        return max((r.offset[1] for r in self.records if r.key == h), default=0)

    def since(self, position: Optional[dict]) -> list[JournalRecord]:
        """Records a state saved at ``position`` (``{"id", "records"}`` from :meth:`position`)
        does not count: those after it, or all of them when it is of another journal or None."""
        if (isinstance(position, dict) and position.get("id") == self.id
                and isinstance(position.get("records"), int)
                and 0 <= position["records"] <= len(self.records)):
            return self.records[position["records"]:]
        return list(self.records)

    def position(self) -> dict:
        """Where a state saved now stands: this journal's id and path, and how many records it
        counts."""
        return {"id": self.id, "path": self.path, "records": len(self.records)}

    def vouches_for(self, position: Optional[dict]) -> bool:
        """True when this journal is the one a state saved at ``position`` wrote to — the same
        id *and* the same path — so every offset reserved after the state is in it. A copy (same
        id, another path: a backup taken with a checkpoint, a file moved to another machine)
        may lack what the original recorded later, and a fresh or other journal knows nothing
        of the state's run: neither can show that the state's next offsets are unused. A state
        of an older version (no path) is not vouched for either (conservative)."""
        return (isinstance(position, dict) and position.get("id") == self.id
                and position.get("path") == self.path
                and isinstance(position.get("records"), int)
                and 0 <= position["records"] <= len(self.records))

    def close(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing the lock file's descriptor releases the flock

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivacyJournal({self.path!r}, records={len(self.records)})"


def _parse(line: bytes, i: int) -> JournalRecord:
    r = json.loads(line.decode("utf-8"))
    if not isinstance(r, dict):
        raise ValueError(f"record {i} is not an object")
    off = r["offset"]
    ints = [r["seq"], r["step"], *off]
    if (len(off) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints)
            or off[1] < off[0] or not isinstance(r["unnoised"], bool) or not isinstance(r["key"], str)):
        raise ValueError(f"record {i} is malformed: {r!r}")
    event = None if r["event"] is None else event_from_dict(r["event"])
    return JournalRecord(r["seq"], r["step"], event, r["unnoised"], r["key"], (off[0], off[1]))


def _append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""PrivacyLedger: privacy budgets of named data sets, every spend recorded durably in a file.

    ledger = PrivacyLedger("privacy.ledger")               # opens, or creates, the file
    ledger.add_dataset("mnist", epsilon_budget=3.0, delta=1e-5)
    ledger.spend("mnist", SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(s)), steps),
                 what="run 7: 10 epochs")                  # -> the data set's epsilon now
    ledger.remaining("mnist")

Record first, release second (DESIGN.md invariant 4): the mechanisms take ``ledger=`` and
``dataset=`` (``ppml_fast.mechanisms``) and spend before any noise is drawn; a spend that would
pass the budget raises ``PrivacyBudgetExceeded`` and records nothing, in memory or on disk.

A data set's epsilon composes all its recorded events in order (one accountant per data set), so
reopening the file gives the same numbers.

The file is an append-only log (JSON lines, format version 2): a header line, then one line per
change (``{"op": "dataset", ...}`` or ``{"op": "spend", ...}``). Several processes (and threads)
may spend from one file at once: every change runs under an exclusive ``fcntl.flock`` on
``<path>.lock`` — read the lines other writers appended since (only those: each ledger caches
its composed accountants and its position in the file), check the budget, append the line,
``fsync`` — so no spend is lost and no budget is passed by two writers each seeing the old total.
A spend costs one small append and one fsync whatever the ledger's length (the check copies the
accountant's history list, not its entries). A line cut short by a crash was never acknowledged:
it is removed under the lock (unless it is a whole record missing only its newline: then kept,
over-reporting rather than under-reporting). Temporary files left by a crash (of this version's
migration or version 1's rewrites) are removed when a ledger opens the file. A version-1 file (one
JSON document) is converted to version 2 in place, atomically, on first open.
The record types and the line encoding live in :mod:`ppml_fast.accounting.ledger_format`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import json
import os
import stat
import tempfile
import threading
from typing import Any, Optional, Union

from ppml_fast.accounting import _checks, calibration
from ppml_fast.accounting.errors import PrivacyBudgetExceeded
from ppml_fast.accounting.events import Event
from ppml_fast.accounting.ledger_format import (  # noqa: F401  (DatasetBudget, SpendRecord: public here)
    FORMAT,
    VERSION,
    Dataset,
    DatasetBudget,
    SpendRecord,
    check_name,
    encode_line,
    is_v2,
    parse_record,
    record_dict,
    refuse_constant,
    temp_prefix,
    trial_copy,
)
from ppml_fast.accounting.serialization import event_to_dict

class PrivacyLedger:
    """Privacy budgets of named data sets, persisted to the append-only file at ``path``.

    Args:
        path: the ledger file; created (with no data sets) when it does not exist.
        accountant: name of the accountant in ``calibration.ACCOUNTANTS`` that composes each data
            set's events ("rdp"); a file keeps the accountant it was created with.
    """

    def __init__(self, path: Union[str, os.PathLike], *, accountant: str = "rdp") -> None:
        if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
            raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__} {path!r}")
        self._make_accountant(accountant)  # checks the name before any file is touched
        self._path = os.fspath(path)
        self._accountant_name = accountant
        self._lock = threading.RLock()
        self._datasets: dict[str, Dataset] = {}
        self._pos = 0  # bytes of the file this ledger has applied
        self._inode: Optional[tuple[int, int]] = None
        with self._locked():
            self._remove_stale_temporaries()
            if not os.path.exists(self._path):
                header = {"format": FORMAT, "version": VERSION, "accountant": accountant}
                self._replace_file(encode_line(header))
            self._catch_up()

    # -- queries ----------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def accountant(self) -> str:
        return self._accountant_name

    @property
    def datasets(self) -> dict[str, DatasetBudget]:
        """Name -> budget of every data set, in the order they were added (a copy)."""
        with self._locked():
            self._catch_up()
            return {name: d.budget for name, d in self._datasets.items()}

    def spent(self, dataset: str) -> float:
        """The data set's epsilon at its delta: all its recorded events composed (also those
        other processes recorded)."""
        with self._locked():
            self._catch_up()
            return self._get(dataset).epsilon

    def remaining(self, dataset: str) -> float:
        """Budget minus spent epsilon, floored at 0."""
        with self._locked():
            self._catch_up()
            d = self._get(dataset)
            return max(0.0, d.budget.epsilon_budget - d.epsilon)

    def records(self, dataset: str) -> list[SpendRecord]:
        """The data set's spends, oldest first (a copy)."""
        with self._locked():
            self._catch_up()
            return list(self._get(dataset).records)

    # -- changes ----------------------------------------------------------------------------
    def add_dataset(self, name: str, *, epsilon_budget: float, delta: float) -> None:
        """Adds a data set with budget (``epsilon_budget``, ``delta``). Adding a name again with
        the same budget does nothing (a script may run twice); with another budget, ValueError."""
        check_name(name)
        budget = DatasetBudget(_checks.positive("epsilon_budget", epsilon_budget),
                               _checks.open_unit("delta", delta))
        with self._locked():
            self._catch_up()
            if name in self._datasets:
                old = self._datasets[name].budget
                if old == budget:
                    return
                raise ValueError(
                    f"dataset {name!r} already has the budget epsilon={old.epsilon_budget!r} at "
                    f"delta={old.delta!r}; got epsilon_budget={budget.epsilon_budget!r}, "
                    f"delta={budget.delta!r}"
                )
            new = Dataset(budget, self._make_accountant(self._accountant_name))
            self._append({"op": "dataset", "name": name, "epsilon_budget": budget.epsilon_budget,
                          "delta": budget.delta})
            self._datasets[name] = new

    def spend(self, dataset: str, event: Event, *, what: str) -> float:
        """Records ``event`` as spent on ``dataset`` (durably: the line is fsynced before this
        returns) and returns the data set's new epsilon.

        Raises:
            PrivacyBudgetExceeded: the epsilon at the data set's delta would exceed its budget
                (reaching it exactly is allowed); nothing is recorded, in memory or on disk.
            UnsupportedEventError: the accountant cannot account for ``event``.
        """
        if not isinstance(event, Event):
            raise TypeError(f"event must be an Event; got {type(event).__name__} {event!r}")
        if not isinstance(what, str):
            raise TypeError(f"what must be a str describing the spend; got {type(what).__name__} {what!r}")
        if not what:
            raise ValueError("what must be a non-empty str describing the spend")
        event_to_dict(event)  # an event the file could not hold is refused before anything
        with self._locked():
            self._catch_up()  # every spend other writers made counts
            d = self._get(dataset)
            candidate = trial_copy(d.accountant)
            candidate.compose(event)
            epsilon = float(candidate.get_epsilon(d.budget.delta))
            if not epsilon <= d.budget.epsilon_budget:
                raise PrivacyBudgetExceeded(
                    f"spending {what!r} on dataset {dataset!r} would bring its epsilon to {epsilon:.6g} "
                    f"at delta={d.budget.delta:g}, over its budget {d.budget.epsilon_budget:g} (spent so "
                    f"far: {d.epsilon:.6g}); nothing was recorded",
                    epsilon=epsilon, epsilon_budget=d.budget.epsilon_budget, delta=d.budget.delta,
                    dataset=dataset,
                )
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
            record = SpendRecord(what, event, epsilon, d.budget.delta, now)
            self._append({"op": "spend", "dataset": dataset, **record_dict(record)})
            d.accountant, d.epsilon = candidate, epsilon
            d.records.append(record)
            return epsilon

    # -- the file -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """This ledger's thread lock, then the file's exclusive flock (other processes, and
        other ledger objects on the same file)."""
        with self._lock:
            fd = os.open(self._path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _append(self, entry: dict) -> None:
        """Appends one line and fsyncs it; on any failure the file is as it was."""
        data = encode_line(entry)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {self._path}")
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        self._pos = size + len(data)

    def _catch_up(self) -> None:
        """Applies the lines appended since this ledger last read (all of them when the file
        was replaced); repairs a crash's torn last line. Call under the flock."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            raise ValueError(f"{self._path} was removed; open the ledger again") from None
        inode = (st.st_dev, st.st_ino)
        if inode == self._inode and st.st_size == self._pos:
            return
        if inode != self._inode or st.st_size < self._pos:
            self._datasets, self._pos, self._inode = {}, 0, inode
        with open(self._path, "rb") as f:
            f.seek(self._pos)
            raw = f.read()
        if self._pos == 0 and raw[:1] == b"{" and not is_v2(raw):
            self._migrate_v1(raw)
            return
        lines = raw.split(b"\n")
        tail = lines.pop()
        start = self._pos
        datasets = dict(self._datasets) if start else {}
        try:
            for i, line in enumerate(lines):
                self._apply(line, datasets, first=start == 0 and i == 0)
            if tail:
                try:  # a whole record missing its newline: kept (over-report, never under)
                    self._apply(tail, datasets, first=False, copy_first=True)
                    complete = True
                except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
                    complete = False
            if start == 0 and not lines:  # created atomically with its header: not ours
                raise ValueError("no header line")
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:
            # lines before the bad one were applied to shared objects: start over next time
            self._datasets, self._pos, self._inode = {}, 0, None
            raise ValueError(f"{self._path} is not a readable {FORMAT} file: {e}") from e
        if tail and not complete:
            with open(self._path, "r+b") as f:  # cut short by a crash: never acknowledged
                f.truncate(len(raw) - len(tail) + start)
                os.fsync(f.fileno())
        elif tail:
            with open(self._path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        self._datasets = datasets
        self._pos = start + len(raw) + (0 if not tail else (1 if complete else -len(tail)))

    def _apply(self, line: bytes, datasets: dict, *, first: bool, copy_first: bool = False) -> None:
        doc = json.loads(line.decode("utf-8"), parse_constant=refuse_constant)
        if first:
            self._check_header(doc)
            return
        if not isinstance(doc, dict):
            raise ValueError("a line must be a JSON object")
        if doc.get("op") == "dataset":
            check_name(doc.get("name"), "dataset name")
            budget = DatasetBudget(_checks.positive("epsilon_budget", doc.get("epsilon_budget")),
                                   _checks.open_unit("delta", doc.get("delta")))
            if doc["name"] in datasets:
                raise ValueError(f"dataset {doc['name']!r} is added twice")
            datasets[doc["name"]] = Dataset(budget, self._make_accountant(self._accountant_name))
        elif doc.get("op") == "spend":
            name = doc.get("dataset")
            if name not in datasets:
                raise ValueError(f"a spend on dataset {name!r}, which was not added")
            record = parse_record(doc)
            d = datasets[name]
            if copy_first:  # a line that may still be refused: compose into a copy
                acc = trial_copy(d.accountant)
                acc.compose(record.event)
                d.accountant = acc
            else:
                d.accountant.compose(record.event)
            d.records.append(record)
            d.epsilon = float(d.accountant.get_epsilon(d.budget.delta))
        else:
            raise ValueError(f"unknown line {doc!r:.80}")

    def _check_header(self, doc: object) -> None:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"expected a JSON object with 'format': {FORMAT!r}")
        if doc.get("version") != VERSION:
            raise ValueError(f"version must be {VERSION}; got {doc.get('version')!r}")
        if doc.get("accountant") != self._accountant_name:
            raise ValueError(
                f"the file keeps accountant {doc.get('accountant')!r}; this ledger was opened with "
                f"accountant={self._accountant_name!r}"
            )

    def _migrate_v1(self, raw: bytes) -> None:
        """Version 1 (one JSON document, rewritten per change) -> version 2, atomically."""
        try:
            doc = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
            if not isinstance(doc, dict) or doc.get("version") != 1:
                raise ValueError(f"version must be {VERSION} (or 1, converted); got {doc.get('version')!r}"
                                 if isinstance(doc, dict) else "expected a JSON object")
            self._check_header({**doc, "version": VERSION})
            if not isinstance(doc.get("datasets"), dict):
                raise ValueError("'datasets' must be an object")
            lines = [encode_line({"format": FORMAT, "version": VERSION, "accountant": self._accountant_name})]
            for name, entry in doc["datasets"].items():
                if not isinstance(entry, dict) or not isinstance(entry.get("records"), list):
                    raise ValueError(f"dataset {name!r} must be an object with a 'records' list")
                lines.append(encode_line({"op": "dataset", "name": name, "epsilon_budget": entry.get("epsilon_budget"),
                                    "delta": entry.get("delta")}))
                lines += [encode_line({"op": "spend", "dataset": name, **r}) for r in entry["records"]]
            data = b"".join(lines)
            datasets: dict = {}
            for i, line in enumerate(data.split(b"\n")[:-1]):
                self._apply(line, datasets, first=i == 0)
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"{self._path} is not a readable {FORMAT} file: {e}") from e
        self._replace_file(data)
        st = os.stat(self._path)
        self._datasets, self._pos, self._inode = datasets, len(data), (st.st_dev, st.st_ino)

    def _replace_file(self, data: bytes) -> None:
        """Writes ``data`` to the path atomically (temporary file, fsync, rename). Under the flock."""
        directory = os.path.dirname(os.path.abspath(self._path))
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(self._path), suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                if os.path.exists(self._path):  # keep the file's permissions
                    os.chmod(tmp, stat.S_IMODE(os.stat(self._path).st_mode))
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename durable where directories fsync
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a crashed writer: every writer holds the flock while its
        temporary file exists, so under the flock any one left is stale."""
        directory = os.path.dirname(os.path.abspath(self._path))
        for tmp in glob.glob(os.path.join(glob.escape(directory), glob.escape(temp_prefix(self._path)) + "*.tmp")):
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    # -- internals --------------------------------------------------------------------------
    def _make_accountant(self, name: object) -> Any:
        accountants = calibration.ACCOUNTANTS  # looked up now: entries added later count
        if not isinstance(name, str) or name not in accountants:
            raise ValueError(f"accountant must be one of {sorted(accountants)}; got {name!r}")
        return accountants[name]()

    def _get(self, dataset: str) -> Dataset:
        check_name(dataset, "dataset")
        try:
            return self._datasets[dataset]
        except KeyError:
            raise ValueError(f"dataset must be one of {list(self._datasets)}; got {dataset!r}") from None

"""PrivacyLedger: privacy budgets of named data sets, every spend recorded in a JSON file.

    ledger = PrivacyLedger("privacy.json")                 # opens, or creates, the file
    ledger.add_dataset("mnist", epsilon_budget=3.0, delta=1e-5)
    ledger.spend("mnist", SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(s)), steps),
                 what="run 7: 10 epochs")                  # -> the data set's epsilon now
    ledger.remaining("mnist")

A data set's epsilon is recomputed from all its recorded events (one accountant composes them in
order), so reopening the file gives the same numbers. A spend that would take it over the budget
raises ``PrivacyBudgetExceeded`` and changes nothing, in memory or on disk. Every change rewrites
the file atomically (temporary file in the same directory, fsync, ``os.replace``): a crash leaves
the old file or the new one, never a mix.

Not a lock: two processes spending from one file concurrently are not serialised. A ledger
refuses to write over a file that changed since it last read or wrote it (ValueError), which
catches a second writer in most, not all, interleavings; give each file one writer.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Optional, Union

from ppml_fast.accounting import _checks, calibration
from ppml_fast.accounting.errors import PrivacyBudgetExceeded
from ppml_fast.accounting.events import Event
from ppml_fast.accounting.serialization import event_from_dict, event_to_dict

FORMAT = "ppml_fast.PrivacyLedger"
VERSION = 1


@dataclass(frozen=True)
class DatasetBudget:
    """A data set's budget: at most ``epsilon_budget`` at ``delta``."""

    epsilon_budget: float
    delta: float


@dataclass(frozen=True)
class SpendRecord:
    """One spend. ``total_epsilon`` is the data set's epsilon at ``delta`` after this spend (all
    its events so far composed), not this spend's alone; ``time`` is UTC, ISO 8601."""

    what: str
    event: Event
    total_epsilon: float
    delta: float
    time: str


class _Dataset:
    def __init__(self, budget: DatasetBudget, accountant: Any) -> None:
        self.budget = budget
        self.accountant = accountant
        self.records: list[SpendRecord] = []
        self.epsilon = 0.0


class PrivacyLedger:
    """Privacy budgets of named data sets, persisted to the JSON file at ``path``.

    Args:
        path: the ledger file; created (with no data sets) when it does not exist.
        accountant: name of the accountant in ``calibration.ACCOUNTANTS`` that composes each data
            set's events ("rdp"); a file keeps the accountant it was created with.
    """

    def __init__(self, path: Union[str, os.PathLike], *, accountant: str = "rdp") -> None:
        if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
            raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__} {path!r}")
        self._make_accountant(accountant)  # checks the name
        self._path = os.fspath(path)
        self._accountant_name = accountant
        self._lock = threading.RLock()
        self._datasets: dict[str, _Dataset] = {}
        self._on_disk: Optional[bytes] = None
        if os.path.exists(self._path):
            self._load()
        else:
            self._write(self._encode(self._datasets))

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
        with self._lock:
            return {name: d.budget for name, d in self._datasets.items()}

    def spent(self, dataset: str) -> float:
        """The data set's epsilon at its delta: all its recorded events composed."""
        with self._lock:
            return self._get(dataset).epsilon

    def remaining(self, dataset: str) -> float:
        """Budget minus spent epsilon, floored at 0."""
        with self._lock:
            d = self._get(dataset)
            return max(0.0, d.budget.epsilon_budget - d.epsilon)

    def records(self, dataset: str) -> list[SpendRecord]:
        """The data set's spends, oldest first (a copy)."""
        with self._lock:
            return list(self._get(dataset).records)

    # -- changes ----------------------------------------------------------------------------
    def add_dataset(self, name: str, *, epsilon_budget: float, delta: float) -> None:
        """Adds a data set with budget (``epsilon_budget``, ``delta``). Adding a name again with
        the same budget does nothing (a script may run twice); with another budget, ValueError."""
        _check_name(name)
        budget = DatasetBudget(_checks.positive("epsilon_budget", epsilon_budget),
                               _checks.open_unit("delta", delta))
        with self._lock:
            if name in self._datasets:
                old = self._datasets[name].budget
                if old == budget:
                    return
                raise ValueError(
                    f"dataset {name!r} already has the budget epsilon={old.epsilon_budget!r} at "
                    f"delta={old.delta!r}; got epsilon_budget={budget.epsilon_budget!r}, "
                    f"delta={budget.delta!r}"
                )
            new = _Dataset(budget, self._make_accountant(self._accountant_name))
            self._write(self._encode({**self._datasets, name: new}))
            self._datasets[name] = new

    def spend(self, dataset: str, event: Event, *, what: str) -> float:
        """Records ``event`` as spent on ``dataset`` and returns the data set's new epsilon.

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
        with self._lock:
            d = self._get(dataset)
            candidate = copy.deepcopy(d.accountant)
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
            new = copy.copy(d)
            new.records = [*d.records, record]
            self._write(self._encode({**self._datasets, dataset: new}))
            d.accountant, d.records, d.epsilon = candidate, new.records, epsilon
            return epsilon

    # -- internals --------------------------------------------------------------------------
    def _make_accountant(self, name: object) -> Any:
        accountants = calibration.ACCOUNTANTS  # looked up now: entries added later count
        if not isinstance(name, str) or name not in accountants:
            raise ValueError(f"accountant must be one of {sorted(accountants)}; got {name!r}")
        return accountants[name]()

    def _get(self, dataset: str) -> _Dataset:
        _check_name(dataset, "dataset")
        try:
            return self._datasets[dataset]
        except KeyError:
            raise ValueError(f"dataset must be one of {list(self._datasets)}; got {dataset!r}") from None

    def _encode(self, datasets: dict[str, _Dataset]) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "accountant": self._accountant_name,
            "datasets": {
                name: {
                    "epsilon_budget": d.budget.epsilon_budget,
                    "delta": d.budget.delta,
                    "records": [
                        {"what": r.what, "event": event_to_dict(r.event), "total_epsilon": r.total_epsilon,
                         "delta": r.delta, "time": r.time}
                        for r in d.records
                    ],
                }
                for name, d in datasets.items()
            },
        }
        return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8")

    def _write(self, data: bytes) -> None:
        """Replaces the file by ``data`` atomically; on any failure the file is as it was."""
        try:
            with open(self._path, "rb") as f:
                current: Optional[bytes] = f.read()
        except FileNotFoundError:
            current = None
        if current != self._on_disk:
            raise ValueError(
                f"{self._path} changed on disk since this ledger read or wrote it; open it again"
            )
        directory = os.path.dirname(os.path.abspath(self._path))
        prefix = "." + os.path.basename(self._path) + "."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                if current is not None:  # keep the file's permissions (a new one gets mkstemp's 0o600)
                    os.chmod(tmp, stat.S_IMODE(os.stat(self._path).st_mode))
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._on_disk = data
        with contextlib.suppress(OSError):  # make the rename durable where directories fsync
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _load(self) -> None:
        with open(self._path, "rb") as f:
            raw = f.read()
        try:
            doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
            datasets = self._parse(doc)
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"{self._path} is not a readable {FORMAT} file: {e}") from e
        self._datasets, self._on_disk = datasets, raw

    def _parse(self, doc: object) -> dict[str, _Dataset]:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"expected a JSON object with 'format': {FORMAT!r}")
        if doc.get("version") != VERSION:
            raise ValueError(f"version must be {VERSION}; got {doc.get('version')!r}")
        if doc.get("accountant") != self._accountant_name:
            raise ValueError(
                f"the file keeps accountant {doc.get('accountant')!r}; this ledger was opened with "
                f"accountant={self._accountant_name!r}"
            )
        if not isinstance(doc.get("datasets"), dict):
            raise ValueError("'datasets' must be an object")
        out: dict[str, _Dataset] = {}
        for name, entry in doc["datasets"].items():
            _check_name(name, "dataset name")
            if not isinstance(entry, dict) or not isinstance(entry.get("records"), list):
                raise ValueError(f"dataset {name!r} must be an object with a 'records' list")
            budget = DatasetBudget(_checks.positive("epsilon_budget", entry.get("epsilon_budget")),
                                   _checks.open_unit("delta", entry.get("delta")))
            d = _Dataset(budget, self._make_accountant(self._accountant_name))
            for i, r in enumerate(entry["records"]):
                where = f"dataset {name!r} record {i}"
                try:
                    record = _parse_record(r)
                    d.accountant.compose(record.event)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{where}: {e}") from e
                d.records.append(record)
            d.epsilon = float(d.accountant.get_epsilon(budget.delta)) if d.records else 0.0
            out[name] = d
        return out


def _parse_record(r: object) -> SpendRecord:
    if not isinstance(r, dict) or not isinstance(r.get("what"), str) or not isinstance(r.get("time"), str):
        raise ValueError("a record must be an object with str 'what' and 'time'")
    datetime.datetime.fromisoformat(r["time"])
    if not isinstance(r.get("event"), dict):
        raise ValueError("'event' must be an object")
    return SpendRecord(r["what"], event_from_dict(r["event"]),
                       _checks.non_negative("total_epsilon", r.get("total_epsilon")),
                       _checks.open_unit("delta", r.get("delta")), r["time"])


def _check_name(name: object, what: str = "name") -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str; got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError(f"{what} must be a non-empty str")


def _refuse_constant(token: str) -> None:
    raise ValueError(f"{token} is not JSON")

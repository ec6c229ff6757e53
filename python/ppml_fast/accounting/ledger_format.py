"""The PrivacyLedger's records and its file's lines (format version 2, JSON lines): the value
types, the encoding of a line and a record, checks, and the cheap copy of an accountant that a
budget check composes into (see :mod:`ppml_fast.accounting.ledger`)."""

from __future__ import annotations

import copy
import datetime
import json
import os
from dataclasses import dataclass
from typing import Any

from ppml_fast.accounting import _checks
from ppml_fast.accounting.events import Event
from ppml_fast.accounting.pld import PLDAccountant
from ppml_fast.accounting.rdp import RDPAccountant
from ppml_fast.accounting.serialization import event_from_dict, event_to_dict

FORMAT = "ppml_fast.PrivacyLedger"
VERSION = 2


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


class Dataset:
    def __init__(self, budget: DatasetBudget, accountant: Any) -> None:
        self.budget = budget
        self.accountant = accountant
        self.records: list[SpendRecord] = []
        self.epsilon = 0.0


def trial_copy(accountant: Any) -> Any:
    """A copy of ``accountant`` to compose a candidate event into, at a cost that does not grow
    with its history: for the library's accountants (exact types) a shallow copy whose lists and
    dicts are copied one level (the history's entries are immutable tuples and the accountants
    replace their numpy arrays, never write into them; the RDP curve cache is shared, it only
    grows); any other accountant is deep-copied."""
    if type(accountant) not in (RDPAccountant, PLDAccountant):
        return copy.deepcopy(accountant)
    new = copy.copy(accountant)
    for name, value in vars(accountant).items():
        if name == "_cache":
            continue
        if isinstance(value, list):
            setattr(new, name, list(value))
        elif isinstance(value, dict):
            setattr(new, name, dict(value))
        elif type(value) in (RDPAccountant, PLDAccountant):
            setattr(new, name, trial_copy(value))
    return new


def encode_line(doc: dict) -> bytes:
    return (json.dumps(doc, allow_nan=False) + "\n").encode("utf-8")


def is_v2(raw: bytes) -> bool:
    try:
        doc = json.loads(raw.split(b"\n", 1)[0].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("version") != 1


def temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def record_dict(r: SpendRecord) -> dict:
    return {"what": r.what, "event": event_to_dict(r.event), "total_epsilon": r.total_epsilon,
            "delta": r.delta, "time": r.time}


def parse_record(r: dict) -> SpendRecord:
    if not isinstance(r.get("what"), str) or not isinstance(r.get("time"), str):
        raise ValueError("a record must be an object with str 'what' and 'time'")
    datetime.datetime.fromisoformat(r["time"])
    if not isinstance(r.get("event"), dict):
        raise ValueError("'event' must be an object")
    return SpendRecord(r["what"], event_from_dict(r["event"]),
                       _checks.non_negative("total_epsilon", r.get("total_epsilon")),
                       _checks.open_unit("delta", r.get("delta")), r["time"])


def check_name(name: object, what: str = "name") -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str; got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError(f"{what} must be a non-empty str")


def refuse_constant(token: str) -> None:
    raise ValueError(f"{token} is not JSON")

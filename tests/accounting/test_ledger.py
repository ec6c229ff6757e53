"""PrivacyLedger (spend, refuse, reopen, atomic writes, bad files and input) and the event
serialization it persists (round trip of every event class, nested ones included)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import pickle
import re
import stat

import pytest

from ppml_fast.accounting import calibration, events, sampling_events
from ppml_fast.accounting import (
    ComposedEvent,
    Event,
    GaussianEvent,
    LaplaceEvent,
    PoissonSampledEvent,
    RandomizedResponseEvent,
    RDPAccountant,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    UnsupportedEventError,
)
from ppml_fast.accounting.errors import PrivacyBudgetExceeded, PrivacyError
from ppml_fast.accounting.ledger import DatasetBudget, PrivacyLedger
from ppml_fast.accounting.serialization import EVENT_CLASSES, event_from_dict, event_to_dict

DPSGD = SelfComposedEvent(PoissonSampledEvent(0.01, GaussianEvent(1.1)), 500)


def eps_of(*evs, delta=1e-5):
    acc = RDPAccountant()
    for e in evs:
        acc.compose(e)
    return acc.get_epsilon(delta)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ledger.json"


def read(p):
    return p.read_bytes()


# --- serialization -----------------------------------------------------------------------------

EXAMPLES = {
    GaussianEvent: GaussianEvent(1.3),
    LaplaceEvent: LaplaceEvent(0.5),
    RandomizedResponseEvent: RandomizedResponseEvent(0.25, 4),
    PoissonSampledEvent: PoissonSampledEvent(1e-3, GaussianEvent(0.9)),
    SampledWithoutReplacementEvent: SampledWithoutReplacementEvent(60_000, 256, GaussianEvent(2.0)),
    SelfComposedEvent: SelfComposedEvent(PoissonSampledEvent(0.02, GaussianEvent(1.0)), 10**12),
    ComposedEvent: ComposedEvent((
        GaussianEvent(5.0),
        SelfComposedEvent(ComposedEvent((LaplaceEvent(2.0), RandomizedResponseEvent.from_epsilon(1.0, 3))),
                          7),
        ComposedEvent(()),
        SampledWithoutReplacementEvent(10, 0, GaussianEvent(1.0)),
    )),
    # non-Poisson sampling (sampling_events.py)
    sampling_events.ShuffledBatchesEvent: sampling_events.ShuffledBatchesEvent.dp_sgd(
        1.1, 235, 1000, "substitution"),
    sampling_events.BallsInBinsEvent: sampling_events.BallsInBinsEvent(LaplaceEvent(0.5), 10, 3),
    sampling_events.TruncatedPoissonEvent: sampling_events.TruncatedPoissonEvent(60_000, 0.004, 300, 1.0),
}


def test_every_event_class_has_an_example_and_a_codec():
    in_module = {c for m in (events, sampling_events) for _, c in inspect.getmembers(m, inspect.isclass)
                 if issubclass(c, Event) and c is not Event}
    assert in_module == set(EXAMPLES) == set(EVENT_CLASSES)


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_event_round_trip_through_json(cls):
    event = EXAMPLES[cls]
    data = event_to_dict(event)
    assert data["type"] == cls.__name__
    back = event_from_dict(json.loads(json.dumps(data, allow_nan=False)))
    assert back == event and type(back) is cls
    # field types survive too (ints stay ints, floats floats)
    for f in dataclasses.fields(event):
        assert type(getattr(back, f.name)) is type(getattr(event, f.name))


def test_infinite_noise_round_trips_as_strict_json():
    data = event_to_dict(GaussianEvent(math.inf))
    text = json.dumps(data, allow_nan=False)
    assert event_from_dict(json.loads(text)) == GaussianEvent(math.inf)


class Foreign(Event):
    pass


@pytest.mark.parametrize(
    "data, match",
    [
        ({"type": "Nope"}, "type"),
        ({"noise_multiplier": 1.0}, "type"),
        ({"type": "GaussianEvent"}, "missing"),
        ({"type": "GaussianEvent", "noise_multiplier": 1.0, "extra": 1}, "unexpected"),
        ({"type": "GaussianEvent", "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"type": "GaussianEvent", "noise_multiplier": True}, "noise_multiplier"),
        ({"type": "GaussianEvent", "noise_multiplier": "1.0"}, "noise_multiplier"),
        ({"type": "SelfComposedEvent", "event": {"type": "GaussianEvent", "noise_multiplier": 1.0},
          "count": 2.0}, "count"),
        ({"type": "PoissonSampledEvent", "sampling_probability": 0.1, "event": 3}, "event"),
        ({"type": "ComposedEvent", "events": [{"type": "Nope"}]}, r"events\[0\]"),
    ],
)
def test_bad_event_dicts(data, match):
    with pytest.raises(ValueError, match=match):
        event_from_dict(data)


def test_event_codec_bad_types():
    with pytest.raises(TypeError, match="event"):
        event_to_dict(Foreign())
    with pytest.raises(TypeError, match="data"):
        event_from_dict([])


# --- the ledger --------------------------------------------------------------------------------


def test_new_file_is_created_and_reopens_empty(path):
    ledger = PrivacyLedger(path)
    assert path.exists() and ledger.datasets == {} and ledger.accountant == "rdp"
    lines = path.read_text().splitlines()
    doc = json.loads(lines[0])
    assert doc == {"format": "ppml_fast.PrivacyLedger", "version": 2, "accountant": "rdp"} and len(lines) == 1
    assert PrivacyLedger(os.fspath(path)).datasets == {}


def test_spend_records_and_returns_the_composed_epsilon(path):
    ledger = PrivacyLedger(path)
    ledger.add_dataset("mnist", epsilon_budget=5.0, delta=1e-5)
    assert ledger.spent("mnist") == 0.0 and ledger.remaining("mnist") == 5.0
    first = ledger.spend("mnist", DPSGD, what="run 1")
    assert first == eps_of(DPSGD)
    second = ledger.spend("mnist", GaussianEvent(10.0), what="release the mean")
    assert second == eps_of(DPSGD, GaussianEvent(10.0)) > first
    assert ledger.spent("mnist") == second
    assert ledger.remaining("mnist") == pytest.approx(5.0 - second)
    recs = ledger.records("mnist")
    assert [r.what for r in recs] == ["run 1", "release the mean"]
    assert [r.total_epsilon for r in recs] == [first, second]
    assert recs[1].event == GaussianEvent(10.0) and recs[1].delta == 1e-5
    assert recs[0].time <= recs[1].time and recs[0].time.endswith("+00:00")
    assert ledger.datasets == {"mnist": DatasetBudget(5.0, 1e-5)}


def test_refused_spend_changes_nothing(path):
    ledger = PrivacyLedger(path)
    ledger.add_dataset("mnist", epsilon_budget=2.0, delta=1e-5)
    ledger.spend("mnist", DPSGD, what="run 1")
    before_bytes, before_spent, before_recs = read(path), ledger.spent("mnist"), ledger.records("mnist")
    with pytest.raises(PrivacyBudgetExceeded, match="mnist") as info:
        ledger.spend("mnist", SelfComposedEvent(DPSGD.event, 5000), what="run 2")
    err = info.value
    assert isinstance(err, PrivacyError)
    assert err.dataset == "mnist" and err.epsilon_budget == 2.0 and err.delta == 1e-5 and err.epsilon > 2.0
    assert read(path) == before_bytes
    assert ledger.spent("mnist") == before_spent and ledger.records("mnist") == before_recs
    # a smaller spend still fits after the refusal
    assert ledger.spend("mnist", GaussianEvent(20.0), what="small") <= 2.0


def test_budget_reached_exactly_is_allowed(path):
    exact = eps_of(DPSGD)
    ledger = PrivacyLedger(path)
    ledger.add_dataset("d", epsilon_budget=exact, delta=1e-5)
    assert ledger.spend("d", DPSGD, what="all of it") == exact
    assert ledger.remaining("d") == 0.0
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.spend("d", GaussianEvent(1e3), what="one more")


def test_reopen_gives_the_same_numbers(path):
    ledger = PrivacyLedger(path)
    ledger.add_dataset("a", epsilon_budget=50.0, delta=1e-6)
    ledger.add_dataset("b", epsilon_budget=50.0, delta=1e-5)
    nested = ComposedEvent((GaussianEvent(5.0), SelfComposedEvent(ComposedEvent((LaplaceEvent(2.0),)), 7)))
    spends = [DPSGD, GaussianEvent(3.0), LaplaceEvent(4.0), RandomizedResponseEvent(0.5, 2), nested]
    for i, e in enumerate(spends):
        ledger.spend("a", e, what=f"step {i}")
    # substitution adjacency (sampling without replacement) in a data set of its own
    ledger.spend("b", SelfComposedEvent(SampledWithoutReplacementEvent(1000, 10, GaussianEvent(1.0)), 100),
                 what="wor")
    ledger.spend("b", EXAMPLES[ComposedEvent], what="nested")
    again = PrivacyLedger(path)
    assert again.datasets == ledger.datasets
    for name in ("a", "b"):
        assert again.spent(name) == ledger.spent(name)
        assert again.records(name) == ledger.records(name)
    # and it goes on from there: same epsilon as the first ledger after the same spend
    assert again.spend("a", GaussianEvent(8.0), what="x") == ledger._datasets["a"].accountant.compose(
        GaussianEvent(8.0)).get_epsilon(1e-6)


def test_add_dataset_again(path):
    ledger = PrivacyLedger(path)
    ledger.add_dataset("d", epsilon_budget=1.0, delta=1e-5)
    ledger.spend("d", GaussianEvent(30.0), what="x")
    before = read(path)
    ledger.add_dataset("d", epsilon_budget=1.0, delta=1e-5)  # the same: nothing happens
    assert read(path) == before and len(ledger.records("d")) == 1
    with pytest.raises(ValueError, match="already"):
        ledger.add_dataset("d", epsilon_budget=2.0, delta=1e-5)
    assert read(path) == before and ledger.datasets["d"].epsilon_budget == 1.0


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_failed_write_leaves_file_and_state_intact(path, monkeypatch, failing):
    ledger = PrivacyLedger(path)
    ledger.add_dataset("d", epsilon_budget=10.0, delta=1e-5)
    ledger.spend("d", DPSGD, what="run 1")
    before, spent = read(path), ledger.spent("d")

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk on fire"):
        ledger.spend("d", GaussianEvent(5.0), what="run 2")
    with pytest.raises(OSError, match="disk on fire"):
        ledger.add_dataset("e", epsilon_budget=1.0, delta=1e-5)
    monkeypatch.undo()
    assert read(path) == before
    assert sorted(os.listdir(path.parent)) == ["ledger.json", "ledger.json.lock"]  # nothing half-written
    assert ledger.spent("d") == spent and len(ledger.records("d")) == 1 and "e" not in ledger.datasets
    assert ledger.spend("d", GaussianEvent(5.0), what="run 2") > spent  # and it works again


def test_write_keeps_the_file_mode(path):
    PrivacyLedger(path)
    os.chmod(path, 0o640)
    PrivacyLedger(path).add_dataset("d", epsilon_budget=1.0, delta=1e-5)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_second_writer_sees_the_first(path):
    # two ledgers on one file (two processes, in tests/accounting/test_ledger_concurrency.py)
    # are serialised by the file lock: each catches up with the other's lines before a change
    one, two = PrivacyLedger(path), PrivacyLedger(path)
    one.add_dataset("d", epsilon_budget=3.0, delta=1e-5)
    after_one = read(path)
    two.add_dataset("d", epsilon_budget=3.0, delta=1e-5)  # the same budget: nothing to do
    assert read(path) == after_one and two.datasets == one.datasets
    with pytest.raises(ValueError, match="already"):
        two.add_dataset("d", epsilon_budget=4.0, delta=1e-5)
    e1 = one.spend("d", DPSGD, what="one")
    e2 = two.spend("d", DPSGD, what="two")
    assert e2 == eps_of(DPSGD, DPSGD) > e1 and one.spent("d") == e2
    assert [r.what for r in one.records("d")] == ["one", "two"]


def test_unsupported_or_unserialisable_event_changes_nothing(path):
    ledger = PrivacyLedger(path)
    ledger.add_dataset("d", epsilon_budget=10.0, delta=1e-5)
    ledger.spend("d", DPSGD, what="run 1")
    before, spent = read(path), ledger.spent("d")
    with pytest.raises(UnsupportedEventError):
        ledger.spend("d", SampledWithoutReplacementEvent(10, 3, LaplaceEvent(1.0)), what="x")
    with pytest.raises(TypeError, match="event"):
        ledger.spend("d", Foreign(), what="x")
    with pytest.raises(ValueError, match="adjacency"):  # Poisson (add/remove) then substitution
        ledger.spend("d", SampledWithoutReplacementEvent(10, 3, GaussianEvent(1.0)), what="x")
    assert read(path) == before and ledger.spent("d") == spent and len(ledger.records("d")) == 1


def test_accountant_is_looked_up_by_name_at_call_time(path, monkeypatch):
    class Other(RDPAccountant):
        pass

    monkeypatch.setitem(calibration.ACCOUNTANTS, "other", Other)
    ledger = PrivacyLedger(path, accountant="other")
    ledger.add_dataset("d", epsilon_budget=10.0, delta=1e-5)
    assert isinstance(ledger._datasets["d"].accountant, Other)
    assert ledger.spend("d", DPSGD, what="x") == eps_of(DPSGD)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        PrivacyLedger(path)  # the file keeps "other"; "rdp" asked
    assert PrivacyLedger(path, accountant="other").spent("d") == eps_of(DPSGD)


def _valid_lines(path):
    ledger = PrivacyLedger(path)
    ledger.add_dataset("d", epsilon_budget=10.0, delta=1e-5)
    ledger.spend("d", DPSGD, what="run 1")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _with(lines, i, change):
    lines = json.loads(json.dumps(lines))
    change(lines[i])
    return "".join(json.dumps(doc) + "\n" for doc in lines)


@pytest.mark.parametrize(
    "make",
    [
        lambda lines: "",
        lambda lines: "{not json\n",
        lambda lines: "[1, 2]\n",
        lambda lines: json.dumps({"hello": "world"}) + "\n",
        lambda lines: _with(lines, 0, lambda d: d.update(format="other")),
        lambda lines: _with(lines, 0, lambda d: d.update(version=99)),
        lambda lines: _with(lines, 1, lambda d: d.update(op="nope")),
        lambda lines: _with(lines, 1, lambda d: d.update(epsilon_budget=-1)),
        lambda lines: _with(lines, 1, lambda d: d.update(delta=1.0)),
        lambda lines: _with(lines, 2, lambda d: d.update(dataset="other")),
        lambda lines: _with(lines, 2, lambda d: d.update(event={"type": "Nope"})),
        lambda lines: _with(lines, 2, lambda d: d.update(time="yesterday")),
        lambda lines: _with(lines, 2, lambda d: d.pop("what")),
        lambda lines: _with(lines, 2, lambda d: d.update(total_epsilon="x")),
        lambda lines: _with(lines, 1, lambda d: d.update(name="")),
        lambda lines: path_text_nan(lines),
    ],
)
def test_corrupted_or_foreign_file(path, make):
    text = make(_valid_lines(path))
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        PrivacyLedger(path)
    assert path.read_text() == text  # never rewritten


def path_text_nan(lines):
    return "".join(json.dumps(doc) + "\n" for doc in lines).replace('"epsilon_budget": 10.0', '"epsilon_budget": NaN')


def test_not_utf8_file(path):
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        PrivacyLedger(path)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda l: l.add_dataset(3, epsilon_budget=1.0, delta=1e-5), TypeError, "name"),
        (lambda l: l.add_dataset("", epsilon_budget=1.0, delta=1e-5), ValueError, "name"),
        (lambda l: l.add_dataset("x", epsilon_budget=0.0, delta=1e-5), ValueError, "epsilon_budget"),
        (lambda l: l.add_dataset("x", epsilon_budget=math.inf, delta=1e-5), ValueError, "epsilon_budget"),
        (lambda l: l.add_dataset("x", epsilon_budget=math.nan, delta=1e-5), ValueError, "epsilon_budget"),
        (lambda l: l.add_dataset("x", epsilon_budget="1", delta=1e-5), TypeError, "epsilon_budget"),
        (lambda l: l.add_dataset("x", epsilon_budget=1.0, delta=0.0), ValueError, "delta"),
        (lambda l: l.add_dataset("x", epsilon_budget=1.0, delta=1.0), ValueError, "delta"),
        (lambda l: l.spend("nope", DPSGD, what="x"), ValueError, "dataset"),
        (lambda l: l.spend(None, DPSGD, what="x"), TypeError, "dataset"),
        (lambda l: l.spend("d", "gaussian", what="x"), TypeError, "event"),
        (lambda l: l.spend("d", DPSGD, what=""), ValueError, "what"),
        (lambda l: l.spend("d", DPSGD, what=None), TypeError, "what"),
        (lambda l: l.spent("nope"), ValueError, "dataset"),
        (lambda l: l.remaining("nope"), ValueError, "dataset"),
        (lambda l: l.records("nope"), ValueError, "dataset"),
    ],
)
def test_bad_input_changes_nothing(path, call, exc, match):
    ledger = PrivacyLedger(path)
    ledger.add_dataset("d", epsilon_budget=10.0, delta=1e-5)
    before = read(path)
    with pytest.raises(exc, match=match):
        call(ledger)
    assert read(path) == before and list(ledger.datasets) == ["d"] and ledger.records("d") == []


def test_bad_constructor_arguments(path):
    with pytest.raises(TypeError, match="path"):
        PrivacyLedger(3)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger(path, accountant="prv")
    assert not path.exists()


def test_budget_error_pickles_with_its_attributes():
    err = PrivacyBudgetExceeded("over", epsilon=3.5, epsilon_budget=3.0, delta=1e-5, dataset="d")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is PrivacyBudgetExceeded and str(back) == "over"
    assert (back.epsilon, back.epsilon_budget, back.delta, back.dataset) == (3.5, 3.0, 1e-5, "d")

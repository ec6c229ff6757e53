"""A resumed DP-FedAvg server never draws noise it already released (DESIGN.md invariant 3).

Attack: a seeded server saves its state after round 1, releases rounds 2-4, crashes, and resumes
from the round-1 state. If the resumed rounds drew the saved key's next offsets again, anyone
who saw a released round and the resumed one could subtract the noise (the updates differ, the
noise does not). Before the fix, ``load_state_dict`` continued the saved key at the saved offset:
the resumed round 2 equalled the released round 2's noise exactly, and an OS-drawn key was
saved in every state (these tests failed on that code). Rounds here have zero updates and zero
parameters, so a round's new parameters are its noise / (qN) alone and comparisons are exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ppml_fast.federated import ClientProxy, DPFedAvgAdaptive, DPFedAvgFixed, FedAvg, FitResult
from ppml_fast.noise_keys import REPRODUCIBLE_NOISE
from ppml_fast.privacy.journal import PrivacyJournal

N, P = 10, 64


def _make(kind="fixed", **kw):
    if kind == "fixed":
        return DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, **kw)
    return DPFedAvgAdaptive(FedAvg(), noise_multiplier=0.5, initial_clip_norm=0.5,
                            clipped_count_stddev=2.0, **kw)


def _noise(s, rnd) -> torch.Tensor:
    """One round with zero updates from zero parameters: the released mean is the noise."""
    params = torch.zeros(P)
    ins = s.configure_fit(rnd, params, [ClientProxy(i) for i in range(N)], 5, np.random.default_rng([0, rnd]))
    res = [(c, FitResult(update=torch.zeros(P), num_examples=1, metrics={})) for c, _ in ins]
    new, _ = s.aggregate_fit(rnd, params, res, [])
    return new.clone()


def _crash_after_checkpoint(kind="fixed", **kw):
    """(state saved after round 1, the noise of rounds 2-4 released after it)."""
    s = _make(kind, **kw)
    _noise(s, 1)
    state = s.state_dict()
    return state, [_noise(s, r) for r in (2, 3, 4)]


def _resume(state, kind="fixed", **load_kw):
    s = _make(kind)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s.load_state_dict(state, **load_kw)
    return s, [str(x.message) for x in w]


def _shares_noise(a, b) -> bool:
    return any(torch.equal(u, v) for u in a for v in b)


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_resume_from_an_older_state_never_replays_released_noise(kind):
    state, released = _crash_after_checkpoint(kind, seed=9)
    s, warned = _resume(state, kind)
    again = [_noise(s, r) for r in (2, 3, 4)]
    assert not _shares_noise(again, released)
    assert any("re-keyed" in w for w in warned), warned
    # the earlier rounds were seeded: the History still says so, but the OS key is not saved
    assert s.reproducible_noise == REPRODUCIBLE_NOISE
    later = s.state_dict()
    assert later["seed"] is None and later["seed_given"] is True
    s2, _ = _resume(later, kind)  # and the next resume is fresh again
    assert not _shares_noise([_noise(s2, 5)], again + released)


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_an_os_drawn_key_is_never_saved(kind):
    state, released = _crash_after_checkpoint(kind)
    assert state["seed"] is None and state["seed_given"] is False
    s, _ = _resume(state, kind)
    assert s.reproducible_noise is None
    assert not _shares_noise([_noise(s, r) for r in (2, 3)], released)
    secure = _make(kind, secure_mode=True)
    _noise(secure, 1)
    assert secure.state_dict()["seed"] is None


def test_continue_noise_is_the_users_word_and_is_bit_for_bit():
    whole = _make(seed=4)
    ref = [_noise(whole, r) for r in (1, 2, 3)]
    a = _make(seed=4)
    _noise(a, 1)
    b, warned = _resume(a.state_dict(), continue_noise=True)  # saved after the last round
    assert not any("re-keyed" in w for w in warned)
    assert torch.equal(_noise(b, 2), ref[1]) and torch.equal(_noise(b, 3), ref[2])
    assert b.state_dict()["seed"] == 4 and b.epsilon(1e-5) == whole.epsilon(1e-5)


def test_continue_noise_without_a_user_key_is_refused_and_changes_nothing():
    for state in (_crash_after_checkpoint()[0],  # an OS key: not in the state
                  {**_crash_after_checkpoint(seed=3)[0], "seed_given": False}):
        s = _make(seed=1)
        _noise(s, 1)
        before = s.state_dict()
        with pytest.raises(ValueError, match="continue_noise"):
            s.load_state_dict(state, continue_noise=True)
        assert s.state_dict() == before
    with pytest.raises(TypeError, match="continue_noise"):
        _make().load_state_dict(_crash_after_checkpoint()[0], continue_noise=1)


# ------------------------------------------------------------------ with a journal

def _journal_ranges(path):
    j = PrivacyJournal(path)
    try:
        return [r.offset for r in j.records], [r.step for r in j.records]
    finally:
        j.close()


@pytest.mark.parametrize("kind", ["fixed", "adaptive"])
def test_the_states_own_journal_counts_lost_rounds_and_continues_after_them(tmp_path, kind):
    path = tmp_path / "server.jsonl"
    s = _make(kind, seed=9, journal=path)
    _noise(s, 1)
    state = s.state_dict()
    released = [_noise(s, r) for r in (2, 3, 4)]
    eps = s.epsilon(1e-5)
    s.journal.close()  # the crash
    t = _make(kind, seed=9, journal=path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t.load_state_dict(state)
    assert not any("re-keyed" in str(x.message) for x in w)
    assert t.rounds == 4 and t.epsilon(1e-5) == pytest.approx(eps, rel=1e-12)  # no lost round
    again = [_noise(t, r) for r in (5, 6)]
    assert not _shares_noise(again, released) and t.state_dict()["seed"] == 9
    t.journal.close()
    ranges, steps = _journal_ranges(path)
    per_round = 1 if kind == "fixed" else 2  # adaptive: the update's range and the count's
    assert len(ranges) == 6 * per_round and sorted(set(steps)) == list(range(6))
    ranges.sort()
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # no offset reserved twice


def test_journal_honest_resume_is_bit_for_bit(tmp_path):
    whole = _make(seed=4)
    ref = [_noise(whole, r) for r in (1, 2, 3)]
    a = _make(seed=4, journal=tmp_path / "j.jsonl")
    _noise(a, 1)
    state = a.state_dict()
    a.journal.close()
    b = _make(seed=4, journal=tmp_path / "j.jsonl")
    b.load_state_dict(state)
    assert torch.equal(_noise(b, 2), ref[1]) and torch.equal(_noise(b, 3), ref[2])
    b.journal.close()


def test_another_journal_cannot_vouch_and_still_counts_its_own_records(tmp_path):
    state, released = _crash_after_checkpoint(seed=9)  # saved without a journal
    s = _make(seed=9, journal=tmp_path / "fresh.jsonl")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s.load_state_dict(state)
    assert any("re-keyed" in str(x.message) for x in w)
    assert not _shares_noise([_noise(s, r) for r in (2, 3, 4)], released)
    s.journal.close()
    with pytest.raises(TypeError, match="journal"):
        _make(journal=3)

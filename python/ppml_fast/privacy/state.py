"""The DP optimizer's privacy state — saved, validated, loaded, and recovered from a journal.

:func:`load` is atomic (DESIGN.md invariant 6): every field is checked, the accountant's state
and the journal's records are composed into a copy, and the wrapped optimizer's state is
loaded (restored on failure) before anything of the DP optimizer changes; on any error nothing
changed — not the optimizer, not the inner optimizer, not the (shared) accountant.

Resuming (invariants 3 and 4):

- with a journal (``make_private(journal=...)``): the accountant gets the loaded history plus
  every journal record the loaded state did not count (steps released after it was saved, a
  crash's lost steps), ``unnoised_steps`` likewise: a resumed run never reports less than every
  released step;
- the noise (:func:`ppml_fast.noise_keys.resume_key`, the rule shared with the federated DP
  strategies): a seeded state continues its key only with the journal it was saved with (same
  id and same path, :meth:`PrivacyJournal.vouches_for`), after the last offset reserved under
  the key — bit for bit the run that never stopped when nothing was reserved after the state.
  With a fresh journal, a copy of the journal (a backup taken with the checkpoint may lack the
  steps released after it), or no journal, nobody can show that the state's next offsets are
  unused: the noise is re-keyed from OS entropy at offset 0, with a warning (no replay of
  released noise; a seeded run is not reproducible past such a resume). A re-keyed key is
  OS-drawn: it is never saved, so the next resume re-keys again. An unseeded state never holds
  its key and always resumes under a fresh one;
- without a journal a warning also says that epsilon counts the loaded state's steps only.

Correlated noise (tree / banded MF, :mod:`ppml_fast.privacy.correlated_noise`): the state holds
the plan, the step and the offsets of the kept noise, never the noise. The recursion continues
exactly when the saved key continues (above) and the journal shows no step after the state;
otherwise a new segment starts at the loaded step, under the key the rule above gives (see that
module for why both are safe).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any, Optional

import torch

from ppml_fast import noise_keys
from ppml_fast.privacy.journal import PrivacyJournal


def _field(state: dict, name: str, check, expected: str, default: Any = ...) -> Any:
    if name not in state:
        if default is not ...:
            return default
        raise ValueError(f"state is missing {name!r} ({expected}); nothing was loaded")
    v = state[name]
    if not check(v):
        raise ValueError(f"state[{name!r}] must be {expected}; got {v!r}; nothing was loaded")
    return v


def _int_in(lo: int, hi: Optional[int]):
    return lambda v: (not isinstance(v, bool) and isinstance(v, numbers.Integral)
                      and lo <= v and (hi is None or v < hi))


def parse(state: object) -> dict:
    """The checked fields of a ``DPOptimizer.state_dict()``; ValueError naming the first bad one."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a DPOptimizer.state_dict() dict; got {type(state).__name__}")
    sigma_ok = (lambda v: not isinstance(v, bool) and isinstance(v, numbers.Real)
                and math.isfinite(v) and v >= 0)
    return {
        "optimizer": _field(state, "optimizer", lambda v: isinstance(v, dict), "the wrapped optimizer's state_dict"),
        "noise_multiplier": float(_field(state, "noise_multiplier", sigma_ok, "a finite number >= 0")),
        "seed": _field(state, "seed", lambda v: v is None or _int_in(0, 1 << 64)(v),
                       "None (a key drawn from OS entropy, not saved) or an int in [0, 2**64)"),
        "offset": int(_field(state, "offset", _int_in(0, 1 << 63), "an int in [0, 2**63)")),
        "steps": int(_field(state, "steps", _int_in(0, None), "an int >= 0")),
        "unnoised_steps": int(_field(state, "unnoised_steps", _int_in(0, None), "an int >= 0", 0)),
        "accountant": _field(state, "accountant", lambda v: v is None or isinstance(v, dict),
                             "None or an accountant's state_dict"),
        "journal": _field(state, "journal", lambda v: v is None or isinstance(v, dict),
                          "None or a journal position", None),
        "correlated_noise": _field(state, "correlated_noise", lambda v: v is None or isinstance(v, dict),
                                   "None or a CorrelatedNoise.state_dict()", None),
    }


def save(opt) -> dict:
    """The state; the noise key only when the user gave it: a key drawn from OS entropy is kept
    out of every checkpoint (with it and two successive model checkpoints anyone could subtract
    the step's noise), so a resumed unseeded run continues under a fresh key."""
    return {
        "optimizer": opt.original_optimizer.state_dict(),
        "noise_multiplier": opt.noise_multiplier,
        "seed": opt.seed if getattr(opt, "_seed_given", True) else None,
        "offset": opt.offset,
        "steps": opt.steps,
        "unnoised_steps": opt.unnoised_steps,
        "accountant": None if opt.accountant is None else opt.accountant.state_dict(),
        "journal": None if opt.journal is None else opt.journal.position(),
        "correlated_noise": None if getattr(opt, "correlated", None) is None else opt.correlated.state_dict(),
    }


def _with_records(accountant, records):
    """A copy of ``accountant`` with the records' events composed, and their unnoised count."""
    unnoised = 0
    for r in records:
        if r.unnoised:
            unnoised += 1
        elif r.event is not None and accountant is not None:
            accountant.compose(r.event)
    return accountant, unnoised


def load(opt, state: object) -> None:
    """Loads ``state`` into ``opt`` atomically (see the module docstring)."""
    s = parse(state)
    trial = None
    if opt.accountant is not None:
        trial = copy.deepcopy(opt.accountant)
        if s["accountant"] is not None:
            try:
                trial.load_state_dict(s["accountant"])
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"state['accountant'] is not loadable: {e}; nothing was loaded") from e
    records = [] if opt.journal is None else opt.journal.since(s["journal"])
    trial, unnoised = _with_records(trial, records)
    # the saved key continues only where the state's own journal (same id and path) shows every
    # offset reserved under it after the save; else a fresh OS key (noise_keys.resume_key)
    vouched = opt.journal is not None and opt.journal.vouches_for(s["journal"])
    unused_from = opt.journal.next_offset(s["seed"]) if vouched and s["seed"] is not None else None
    seed, offset, continued = noise_keys.resume_key(
        None if opt.secure_mode else s["seed"], s["offset"], unused_from=unused_from)
    order = getattr(opt, "_order", None)  # a resumed loop starts a new pass over the data
    correlated = _correlated(opt, s, seed, order, exact=continued and not records)
    inner = opt.original_optimizer
    before = copy.deepcopy(inner.state_dict())
    try:
        inner.load_state_dict(s["optimizer"])
    except Exception as e:
        inner.load_state_dict(before)
        raise ValueError(f"state['optimizer'] does not fit the wrapped optimizer: {e}; nothing was loaded") from e
    if trial is not None:
        try:
            opt.accountant.load_state_dict(trial.state_dict())
        except Exception:
            inner.load_state_dict(before)
            raise
    if opt.journal is None:
        warnings.warn(
            "DPOptimizer state loaded without a journal: epsilon counts the loaded state's steps "
            "only (steps released after it was saved are unknown), and the noise was re-keyed from "
            "OS entropy so that no released noise is drawn again; pass journal= to make_private "
            "for a crash-safe resume", UserWarning, stacklevel=3)
    elif s["seed"] is not None and not continued:
        warnings.warn(
            f"DPOptimizer state loaded with journal {opt.journal.path}, which is not the journal "
            "the state was saved with (another id or path): it cannot show whether steps were "
            "released after the state under the seeded key's next offsets, so the noise was "
            "re-keyed from OS entropy (not reproducible from the seed any more); resume with the "
            "state's own journal file for an exact continuation", UserWarning, stacklevel=3)
    opt.noise_multiplier, opt.seed, opt.offset, opt.steps = s["noise_multiplier"], seed, offset, s["steps"]
    # a re-keyed stream is OS-drawn: never saved, and re-keyed afresh in a forked child
    opt._seed_given = continued
    noise_keys.rekey_after_fork(opt, "seed", user_seeded=continued)
    opt.unnoised_steps = s["unnoised_steps"] + unnoised
    opt._budget.reset()
    if correlated is not None:
        opt.correlated = correlated
        if order is not None:
            if hasattr(order.loader, "align"):  # cyclic Poisson: the next batch samples part steps mod b
                order.loader.align(opt.steps)
            order.stepped()


def _correlated(opt, s: dict, seed: int, order, *, exact: bool):
    """The optimizer's correlated-noise generator at the loaded step (None without one);
    ValueError, before anything changed, for a state of another noise plan."""
    saved, mine = s["correlated_noise"], getattr(opt, "correlated", None)
    if (saved is None) != (mine is None):
        raise ValueError(
            "state['correlated_noise'] is " + ("None (a DP-SGD state)" if saved is None else "set")
            + " but this optimizer " + ("has none" if mine is None else f"adds {mine.kind} noise")
            + ": the state is of another noise mechanism; nothing was loaded")
    if mine is None:
        return None
    if mine.check_state(saved)["step"] != s["steps"]:
        raise ValueError(f"state['correlated_noise']['step'] is {saved['step']}, state['steps'] is "
                         f"{s['steps']}: the state was edited; nothing was loaded")
    from ppml_fast.privacy.per_sample import sum_dtype

    like = [torch.zeros_like(p, dtype=sum_dtype(p)) for p in opt.params]
    exact = exact and (order is None or order.aligned(s["steps"], saved["segment_start"]))
    return mine.resumed(saved, like=like, seed=seed, exact=exact)


def attach(opt, journal) -> PrivacyJournal:
    """Opens ``journal`` (a path or a PrivacyJournal) for ``opt``: every record already in it
    is composed into the accountant (the journal is the run's record; a new run uses a new
    path) and the noise continues after the offsets reserved under ``opt``'s key."""
    if opt.journal is not None:
        raise ValueError(f"this optimizer already writes journal {opt.journal.path}")
    j = journal if isinstance(journal, PrivacyJournal) else PrivacyJournal(journal)
    try:
        trial = None if opt.accountant is None else copy.deepcopy(opt.accountant)
        trial, unnoised = _with_records(trial, j.records)
        if trial is not None and j.records:
            opt.accountant.load_state_dict(trial.state_dict())
    except BaseException:
        if j is not journal:
            j.close()
        raise
    opt.unnoised_steps += unnoised
    opt.offset = max(opt.offset, j.next_offset(opt.seed))
    opt.journal = j
    opt._budget.reset()
    return j

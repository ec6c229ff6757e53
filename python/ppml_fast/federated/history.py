"""What a simulation returns: one row per round, why it stopped, and the final parameters.

A row (a plain dict, JSON-ready) has ``round`` (1-based), ``loss`` and ``accuracy`` (central
evaluation on ``eval_dataset``; None on rounds without evaluation), ``epsilon`` (privacy spent
so far, None when nothing is spent: the strategy's ε, else under local DP the largest ε any
client has spent, failed clients included — see :mod:`~ppml_fast.federated.simulation`),
``clients`` (the cids whose updates were aggregated), ``dropped`` (``[{"cid", "reason"}]``:
"dropout", "budget", "timeout", "nonfinite", "shape" or the exception's ``"Type: message"``;
under local DP also ``"epsilon"``, what that client has spent, when it reports it),
``skipped`` (True when too few results remained, the strategy declined the round or its
aggregate was not finite; the parameters did not change) and ``skip_reason``, ``excluded``
(what the strategy left out of the aggregate: ``[{"cid", "rule", "fraction"}]``, see
:mod:`~ppml_fast.federated.strategy.report`), ``train_loss`` (clients' reported training
loss, weighted by their example counts), ``metrics`` (the strategy's aggregation metrics),
``federated`` (``{"loss", "metrics", "failures"}`` of federated evaluation when the strategy asks
for it, else None)
and ``seconds`` (wall time of the round). ``stopped`` is ``"rounds"`` (all rounds ran),
``"target_accuracy"``, ``"max_epsilon"`` or ``"error"`` (an exception ended the run; it carries
this History as ``.history``, :mod:`~ppml_fast.federated.history_writer`); ``stop_message``
says it in words. ``notes`` holds what the run must say about itself: ``noise_keys.REPRODUCIBLE_NOISE`` when its noise was keyed
from a user-given seed (the strategy's or ``LocalDP.noise_seed``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ppml_fast.noise_keys import REPRODUCIBLE_NOISE

from .parameters import ParameterLayout

__all__ = ["History", "noise_notes"]


@dataclass
class History:
    """The record of one :func:`~ppml_fast.federated.run_simulation` (see the module docstring)."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    stop_message: str = ""
    parameters: Optional[torch.Tensor] = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model_fn: Optional[Callable[[], nn.Module]] = field(default=None, repr=False, compare=False)

    @property
    def accuracy(self) -> Optional[float]:
        """The last measured accuracy (None when never evaluated)."""
        return next((r["accuracy"] for r in reversed(self.rounds) if r["accuracy"] is not None), None)

    @property
    def epsilon(self) -> Optional[float]:
        """The privacy spent after the last round (None when nothing is spent)."""
        return self.rounds[-1]["epsilon"] if self.rounds else None

    def final_model(self) -> nn.Module:
        """A fresh ``model_fn()`` loaded with the final parameters."""
        if self.model_fn is None or self.parameters is None:
            raise ValueError("this History has no model_fn or parameters (built by hand?)")
        with torch.random.fork_rng(devices=[]):
            model = self.model_fn()
        ParameterLayout.of(model).load(model, self.parameters)
        return model

    def to_dict(self, *, times: bool = True) -> dict[str, Any]:
        """Rows, stop reason and settings as plain data (``times=False`` drops the wall times,
        the only part that differs between two runs with the same seed). The parameters are
        not included (``history.parameters`` holds them)."""
        rows = [dict(r) if times else {k: v for k, v in r.items() if k != "seconds"} for r in self.rounds]
        return {"rounds": rows, "stopped": self.stopped, "stop_message": self.stop_message,
                "settings": dict(self.settings), "notes": list(self.notes)}

    def to_json(self, *, times: bool = True, indent: Optional[int] = None) -> str:
        """:meth:`to_dict` as JSON (strict: an infinite epsilon, e.g. of noise multiplier 0,
        is written as the string "inf", see :func:`json_safe`)."""
        return json.dumps(json_safe(self.to_dict(times=times)), indent=indent, allow_nan=False)


def noise_notes(strategy: Any, local_dp: Any) -> list[str]:
    """What the run says about seeded randomness: ``noise_keys.REPRODUCIBLE_NOISE`` when a DP
    strategy (or one it wraps) or ``local_dp`` keys its noise from a user-given seed, and each
    wrapper's own ``reproducible_noise`` message (secure aggregation's seeded masks). The
    simulation's own ``seed`` never keys noise (DESIGN.md, privacy invariant 3)."""
    notes = []
    if local_dp is not None and getattr(local_dp, "noise_seed", None) is not None:
        notes.append(REPRODUCIBLE_NOISE)
    s: Any = strategy
    for _ in range(16):  # wrappers: SecAggFedAvg(DPFedAvgFixed(FedAvg())) and the like
        if s is None:
            break
        note = getattr(s, "reproducible_noise", None)
        if isinstance(note, str) and note not in notes:
            notes.append(note)
        s = getattr(s, "strategy", None)
    return notes


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by the string "inf", "-inf" or "nan":
    standard JSON has no such numbers (Python would write the non-standard ``Infinity``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj

"""SensitivityReport: what :func:`ppml_fast.audit.check_sensitivity` measured, and the tolerance
its verdict allows for floating-point rounding.

The measured quantity: for neighbouring batches B and B' and one DP step each from the same
parameters with the noise removed, ``ratio = ||Δθ(B) − Δθ(B')|| · E / bound`` where E is the
step's denominator (expected batch size) and ``bound`` is the largest distance the clipped sum
may move: C for add/remove-one neighbours, 2C for replace-one (Abadi et al. 2016, section 3.1;
per-layer clipping: the L2 norm of the per-parameter norms). DP-SGD's guarantee needs
``ratio <= 1``; what rounding adds is below the tolerance of :func:`tolerance`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

import torch

# unit roundoff of each parameter dtype (half the distance from 1 to the next number)
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24,
                 torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tolerance(dtype: torch.dtype) -> float:
    """How far above 1 a ratio may be and still count as rounding, for parameters of ``dtype``.

    - float64: 1e-9. The clip factor makes a record's clipped gradient C (1 + O(u)) long, and the
      two sums differ by O(u B C) beyond the removed record's part: ~1e-14 for B up to 10^3;
      1e-9 leaves five orders of magnitude for long reductions and still exposes any real excess.
    - float32: 1e-4, by the same terms with u = 2^-24 (6e-8): B u ~ 1e-5 for B = 128, and the
      per-sample norm of a long row summed in float32 can lose ~1e-4 relative (DESIGN.md,
      "Measured pitfalls"; the native ops sum partials in double, torch's reductions may not).
    - bfloat16 / float16: 2u = 2^-7 / 2^-10. The engine keeps the clipped sums in float32 until
      the noise and rounds after it (post-processing; the checker measures the float32 values
      before that rounding where it can, :func:`check_sensitivity`), but every per-sample
      gradient is formed from 16-bit activations and output gradients: its norm and its part of
      the sum can each see it rounded differently, by up to u relative. A ratio of 1 + 2u is a
      record that moves the sum by 2u C more than C — what that rounding alone can do.
    """
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"no tolerance for parameters of dtype {dtype}; expected one of "
                         f"{sorted(str(d) for d in UNIT_ROUNDOFF)}")
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2 * UNIT_ROUNDOFF[dtype])


def _strict(v: Any) -> Any:
    """A value with every non-finite float written as a string ("inf", "nan"): strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v


@dataclasses.dataclass
class SensitivityReport:
    """The outcome of :func:`~ppml_fast.audit.check_sensitivity`.

    Attributes:
        max_ratio: the largest ``||Δθ(B) − Δθ(B')|| · E / bound`` over the trials (nan when the
            engine refused the model, or no trial ran).
        tol: the tolerance for rounding (:func:`tolerance` of the least precise trainable
            parameter's dtype, plus, where a 16-bit gradient could only be read after its
            rounding, that rounding's share).
        bound: C (remove) or 2C (replace); per-layer clipping: the L2 norm of the per-parameter
            norms, doubled for replace.
        max_grad_norm: the C given.
        neighbours: "remove" (add/remove one record) or "replace" (replace one record).
        trials: how many neighbouring batches were compared.
        expected_batch_size: E, the step's denominator (the number of records in the batch).
        worst_record: index in the batch of the record changed in the worst trial.
        worst_kind: what the worst trial did ("remove", "add copy", "add scaled", "add cancel",
            "add repeat", "add mixed", "replace scaled", ...; see :meth:`Records.crafted`).
        worst_module: the module whose parameters carry the largest part of the worst
            difference ("" is the root module).
        per_parameter: parameter name -> ``||Δθ_p(B) − Δθ_p(B')|| · E / bound`` in the worst trial.
        results: one dict per trial: kind, record, ratio, and error (a trial's step raised; a
            NonFiniteGradientError there is the engine failing closed, not a leak).
        refused: the engine's message when it refused the model (at ``make_private`` or at the
            step on the batch itself; ``ok`` is then False), else None.
        notes: what else the user should know (settings overridden, nondeterminism, ...).
        reference_gap: ``||S − S_ref|| / C``: the engine's clipped sum S on the batch against the
            sum of the records' own gradients, each computed alone and clipped in float64 (None
            where not computed). Not part of ``ok`` (a wrong gradient is not a leak by itself):
            see :attr:`matches_reference`.
    """

    max_ratio: float
    tol: float
    bound: float
    max_grad_norm: Any
    neighbours: str
    trials: int
    expected_batch_size: float
    worst_record: Optional[int] = None
    worst_kind: Optional[str] = None
    worst_module: Optional[str] = None
    per_parameter: dict = dataclasses.field(default_factory=dict)
    results: list = dataclasses.field(default_factory=list)
    refused: Optional[str] = None
    notes: list = dataclasses.field(default_factory=list)
    reference_gap: Optional[float] = None

    @property
    def matches_reference(self) -> Optional[bool]:
        """Whether the engine's clipped sum on the batch equals the per-record reference
        (:mod:`~ppml_fast.audit.sensitivity_reference`) within ``tol`` C per record; None where
        no reference was computed (train mode, a model that fails on one record, too large)."""
        if self.reference_gap is None:
            return None
        return self.reference_gap <= self.tol * self.expected_batch_size

    @property
    def ok(self) -> bool:
        """The engine was not refused and every trial stayed within the bound (1 + tol)."""
        return self.refused is None and math.isfinite(self.max_ratio) and self.max_ratio <= 1 + self.tol

    def to_dict(self) -> dict:
        """A strict-JSON-ready dict (non-finite numbers as "inf"/"nan" strings)."""
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        d["matches_reference"] = self.matches_reference
        return _strict(d)

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def __str__(self) -> str:
        if self.refused is not None:
            return f"sensitivity check: REFUSED by the engine: {self.refused}"
        verdict = ("ok" if self.ok else "NOT CHECKED: no trial completed" if not math.isfinite(
            self.max_ratio) else "EXCEEDS THE BOUND: one record moves the step by more than the "
            "accountant assumes")
        lines = [f"sensitivity check ({self.neighbours} one record, bound {self.bound:g} = "
                 f"{'C' if self.neighbours == 'remove' else '2C'}, {self.trials} trials, "
                 f"batch of {self.expected_batch_size:g}): max ratio {self.max_ratio:.6g} "
                 f"(tolerance 1 + {self.tol:.2g}): {verdict}"]
        if self.worst_kind is not None:
            lines.append(f"  worst: {self.worst_kind} record {self.worst_record}; module "
                         f"{self.worst_module or '(root)'!s}")
        top = sorted(self.per_parameter.items(), key=lambda kv: -kv[1])[:5]
        for name, r in top:
            lines.append(f"    {name}: {r:.4g}")
        for res in self.results:
            what = f"ratio {res['ratio']:.6g}" if res.get("error") is None else f"error: {res['error']}"
            lines.append(f"  trial {res['kind']} record {res['record']}: {what}")
        if self.matches_reference is False:
            lines.append(f"  WARNING: the clipped sum differs from the per-record reference by "
                         f"{self.reference_gap:.4g} C: the engine's per-sample gradients are not the "
                         "records' own, or the model or loss mixes records")
        elif self.matches_reference:
            lines.append(f"  clipped sum = per-record reference within {self.reference_gap:.2g} C")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

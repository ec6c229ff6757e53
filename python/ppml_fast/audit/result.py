"""AuditResult: an audit's empirical epsilon lower bound next to the epsilon the accountant
claims, with the counts that gave the bound."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What an audit found.

    Attributes:
        epsilon_lower_bound: with probability >= ``confidence`` the audited mechanism is not
            (epsilon, ``delta``)-DP for any epsilon below this.
        epsilon_claimed: the epsilon the accountant (or the analysis) claims at ``delta``
            (inf where it claims nothing, e.g. noise multiplier 0).
        confidence: the probability that the lower bound holds.
        delta: the delta at which both epsilons are measured.
        method: "one_run" (Steinke et al. 2023) or "clopper_pearson" (many trials).
        counts: the counts behind the bound: canaries, guesses, correct (one run); tp, fp,
            tn, fn (Clopper–Pearson).
        details: what was audited and how (canary kind, steps, threshold, ...).
    """

    epsilon_lower_bound: float
    epsilon_claimed: float
    confidence: float
    delta: float
    method: str
    counts: Mapping[str, int]
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """True where the lower bound exceeds the claim: the claim is refuted at ``confidence``
        (an implementation or accounting bug, or the 1 - confidence chance of a false alarm)."""
        return self.epsilon_lower_bound > self.epsilon_claimed

    def to_dict(self) -> dict:
        """A JSON-ready dict (inf as the string "inf")."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, Mapping):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean({
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "epsilon_claimed": self.epsilon_claimed,
            "flagged": self.flagged,
            "confidence": self.confidence,
            "delta": self.delta,
            "method": self.method,
            "counts": dict(self.counts),
            "details": dict(self.details),
        })

    def summary(self) -> str:
        """One line: the bound next to the claim."""
        verdict = "REFUTED: the claim is violated" if self.flagged else "consistent with the claim"
        return (f"epsilon lower bound {self.epsilon_lower_bound:.3f} vs claimed epsilon "
                f"{self.epsilon_claimed:.3f} at delta {self.delta:g} ({self.confidence:.0%} "
                f"confidence, {self.method}): {verdict}")

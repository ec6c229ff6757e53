"""The data model of a benchmark: a case (inputs allocated once) and its implementations.

Roles: ``"ppml_fast"`` is what we measure; a ``"baseline"`` is a rival, reported as a speedup
(baseline ms / ppml_fast ms, higher is better); a ``"floor"`` is a bound no implementation can
beat (one read or copy of the data), reported as ppml_fast ms / floor ms (lower is better).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

Inputs = dict[str, Any]
ROLES = ("ppml_fast", "baseline", "floor")
_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    """A goal on a ratio, e.g. ``Target(">=", 4.0)``: ppml_fast at least 4x faster."""

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Target.op must be '>=' or '<='; got {self.op!r}")

    def met(self, ratio: float) -> bool:
        return bool(_OPS[self.op](ratio, self.value))

    def __str__(self) -> str:
        return f"{self.op} {self.value:.2f}x"


@dataclass(frozen=True)
class Impl:
    """One implementation timed on a case's inputs.

    ``make(inputs)`` returns the zero-argument callable that is timed; it may prepare state
    (an output buffer, a compiled function) that lives as long as that callable.
    ``versus`` names the ppml_fast impl a baseline or floor is compared with (default: the
    case's first ppml_fast impl). ``costly`` marks an impl whose preparation takes seconds
    (torch.compile); a profile may time it only where it carries a target.
    """

    key: str
    name: str
    make: Callable[[Inputs], Callable[[], object]]
    role: str = "baseline"
    versus: Optional[str] = None
    target: Optional[Target] = None
    costly: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Impl.role must be one of {ROLES}; got {self.role!r}")


@dataclass(frozen=True)
class Case:
    """Inputs made by ``setup()`` (freed after the case) and the impls timed on them."""

    key: str
    name: str
    setup: Callable[[], Inputs]
    impls: tuple[Impl, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not any(i.role == "ppml_fast" for i in self.impls):
            raise ValueError(f"case {self.key!r} has no ppml_fast impl to compare with")

    def reference(self, impl: Impl) -> Optional[Impl]:
        """The ppml_fast impl that ``impl`` is compared with (None for a ppml_fast impl)."""
        if impl.role == "ppml_fast":
            return None
        key = impl.versus or next(i.key for i in self.impls if i.role == "ppml_fast")
        for i in self.impls:
            if i.key == key:
                return i
        raise ValueError(f"case {self.key!r}: impl {impl.key!r} compares with unknown {key!r}")

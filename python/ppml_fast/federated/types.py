"""What travels between a simulated client and the server: flat parameter vectors one way,
:class:`FitResult` / :class:`EvalResult` the other, and a :class:`ClientProxy` naming a client.

These are the only objects the server and the strategies ever see (Flower's ``FitRes`` /
``EvaluateRes`` / ``ClientProxy``). They hold numbers, never a client's data.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

__all__ = ["ClientProxy", "EvalResult", "FitResult", "Metrics", "check_metrics", "is_finite_update"]

Metrics = Mapping[str, float]


def check_metrics(name: str, metrics: Any) -> dict[str, float]:
    """A copy of ``metrics`` as ``{str: float}``; ValueError/TypeError naming ``name`` otherwise."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{name} must be a mapping of str to numbers; got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"{name} keys must be str; got {type(k).__name__}")
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{k!r}] must be a real number; got {type(v).__name__}")
        out[k] = float(v)
    return out


def _check_num_examples(num_examples: Any) -> int:
    if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral):
        raise TypeError(f"num_examples must be an int; got {type(num_examples).__name__}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0; got {num_examples}")
    return int(num_examples)


@dataclass(frozen=True)
class FitResult:
    """A client's answer to ``fit``: ``update`` = its locally trained parameters minus the
    parameters it received (a flat 1-D floating tensor, the layout of
    :class:`~ppml_fast.federated.parameters.ParameterLayout`), the number of examples it
    trained on (FedAvg's weight), and scalar metrics (e.g. ``loss``, ``epsilon``)."""

    update: torch.Tensor
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.update, torch.Tensor):
            raise TypeError(f"update must be a torch.Tensor; got {type(self.update).__name__}")
        if self.update.dim() != 1 or not self.update.is_floating_point():
            raise ValueError(
                f"update must be a 1-D floating tensor; got shape {tuple(self.update.shape)} "
                f"and dtype {self.update.dtype}")
        object.__setattr__(self, "num_examples", _check_num_examples(self.num_examples))
        object.__setattr__(self, "metrics", check_metrics("metrics", self.metrics))


@dataclass(frozen=True)
class EvalResult:
    """A client's answer to ``evaluate``: mean loss over its ``num_examples`` examples and
    scalar metrics (e.g. ``accuracy``)."""

    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.loss, bool) or not isinstance(self.loss, numbers.Real):
            raise TypeError(f"loss must be a real number; got {type(self.loss).__name__}")
        object.__setattr__(self, "loss", float(self.loss))
        object.__setattr__(self, "num_examples", _check_num_examples(self.num_examples))
        object.__setattr__(self, "metrics", check_metrics("metrics", self.metrics))


@dataclass(frozen=True)
class ClientProxy:
    """The server's handle on a client: its id and nothing else. Strategies choose clients
    and attach per-client configuration through proxies; the simulation maps a proxy back
    to the client object on the (simulated) device side."""

    cid: int

    def __post_init__(self) -> None:
        if isinstance(self.cid, bool) or not isinstance(self.cid, numbers.Integral) or self.cid < 0:
            raise ValueError(f"cid must be an int >= 0; got {self.cid!r}")


def is_finite_update(update: torch.Tensor) -> bool:
    """True when every entry of ``update`` is finite."""
    return bool(torch.isfinite(update).all())

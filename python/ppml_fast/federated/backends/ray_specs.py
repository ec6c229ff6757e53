"""Clients described, not loaded: a :class:`ClientSpec` names a picklable factory and the shard ids
it builds clients from, so that the :class:`~.ray_backend.RayBackend` builds each client on the Ray
worker that trains it and the client's data never passes through the driver.

The driver holds one :class:`SpecClient` per shard: a :class:`~ppml_fast.federated.Client` with a
cid and no data (``run_simulation`` takes them as its ``clients``); the worker calls
``factory(shard)`` and trains what it returns. Usage::

    # mypkg/data.py, importable on every node:
    def make_client(shard: int) -> Client:           # or -> a torch Dataset of (input, target)
        x, y = load_shard_from_local_disk(shard)
        return Client(TensorDataset(x, y))

    spec = ClientSpec(factory="mypkg.data:make_client", shards=range(10_000))
    run_simulation(model_fn, spec.clients(), FedAvg(), backend=RayBackend(address="auto"), ...)

The factory must be deterministic (a shard id always gives the same data: a failed worker's
clients are rebuilt on another worker) and importable where the workers run.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from torch.utils.data import Dataset

from ..client import Client

__all__ = ["ClientSpec", "SpecClient", "build_client"]


def _resolve(factory: Union[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """The callable a factory names ("module:function", a dotted path after the colon allowed)."""
    if callable(factory):
        return factory
    module, _, attr = factory.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"factory {factory!r} names a {type(obj).__name__}, not a callable")
    return obj


@dataclass(frozen=True)
class ClientSpec:
    """How to build clients where they train.

    Args:
        factory: ``"module:function"`` (imported on the worker) or a picklable callable;
            ``factory(shard)`` returns a :class:`~ppml_fast.federated.Client` or a torch
            ``Dataset`` of (input, target) pairs (wrapped in a ``Client``).
        shards: the shard ids, one client each (any picklable values, e.g. ints or file names).
        cids: the clients' cids (default: their positions 0..len(shards)-1).
    """

    factory: Union[str, Callable[[Any], Any]]
    shards: Sequence[Any]
    cids: Optional[Sequence[int]] = None

    def __post_init__(self) -> None:
        f = self.factory
        if isinstance(f, str):
            module, sep, attr = f.partition(":")
            if not (module and sep and attr):
                raise ValueError(f"factory must be 'module:function' or a callable; got {f!r}")
        elif not callable(f):
            raise TypeError(f"factory must be 'module:function' or a callable; got {type(f).__name__}")
        if isinstance(self.shards, (str, bytes)) or not isinstance(self.shards, Sequence) and not isinstance(
                self.shards, range):
            raise TypeError(f"shards must be a sequence of shard ids; got {type(self.shards).__name__}")
        object.__setattr__(self, "shards", list(self.shards))
        if not self.shards:
            raise ValueError("shards must not be empty")
        if self.cids is not None:
            cids = list(self.cids)
            if len(cids) != len(self.shards):
                raise ValueError(f"cids must have one entry per shard ({len(self.shards)}); got {len(cids)}")
            for c in cids:
                if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
                    raise ValueError(f"cids must be ints >= 0; got {c!r}")
            object.__setattr__(self, "cids", [int(c) for c in cids])

    def clients(self) -> list["SpecClient"]:
        """One data-less :class:`SpecClient` per shard, for ``run_simulation(clients=...)``."""
        cids = self.cids if self.cids is not None else range(len(self.shards))
        return [SpecClient(self, i, c) for i, c in enumerate(cids)]


class SpecClient(Client):
    """The driver's handle on a client built on a Ray worker from ``spec.shards[index]``: a cid,
    the client's local-DP state as its worker last reported it, and what the worker told about it
    (``num_examples``, whether it trains with ``Client.fit``), never its data. Its ``fit`` and
    ``evaluate`` raise: only a :class:`~.ray_backend.RayBackend` worker can run them."""

    def __init__(self, spec: ClientSpec, index: int, cid: int) -> None:  # no data: Client.__init__ not called
        self.spec, self.index, self.cid = spec, int(index), int(cid)
        self._local_dp = None
        self._n: Optional[int] = None  # reported by the worker that built it
        self._default_fit: Optional[bool] = None

    @property
    def shard(self) -> Any:
        return self.spec.shards[self.index]

    @property
    def num_examples(self) -> int:
        if self._n is None:
            raise RuntimeError(f"client {self.cid}: its size is known once a Ray worker has built it")
        return self._n

    def __repr__(self) -> str:
        return f"SpecClient(cid={self.cid}, shard={self.shard!r})"

    def fit(self, parameters, config):
        raise RuntimeError(f"client {self.cid} is built from a ClientSpec on a Ray worker; train it with "
                           "backend=RayBackend(...)")

    def evaluate(self, parameters, config):
        raise RuntimeError(f"client {self.cid} is built from a ClientSpec on a Ray worker; its data is "
                           "not on the driver (evaluate centrally with eval_dataset)")


def build_client(factory: Union[str, Callable[[Any], Any]], shard: Any, cid: int) -> Client:
    """``factory(shard)`` as a Client with ``cid`` (a Dataset is wrapped; a Client's own cid must
    agree or be None). Runs on the worker."""
    made = _resolve(factory)(shard)
    if isinstance(made, Dataset) and not isinstance(made, Client):
        return Client(made, cid=cid)
    if not isinstance(made, Client):
        raise TypeError(f"factory({shard!r}) must return a Client or a torch Dataset; got {type(made).__name__}")
    if made.cid is not None and made.cid != cid:
        raise ValueError(f"factory({shard!r}) returned a client with cid {made.cid}; the spec gives {cid}")
    made.cid = cid
    return made

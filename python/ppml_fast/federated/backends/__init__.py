"""Backends of :func:`~ppml_fast.federated.run_simulation`: who runs the clients' ``fit``.

- ``"sequential"`` (:class:`SequentialBackend`): one client after the other, the reference;
- ``"vectorized"`` (:class:`VectorizedBackend`): clients of one architecture trained together
  with ``torch.func.vmap``;
- ``"ray"`` (:class:`RayBackend`): client groups on Ray actors, on one machine or a cluster
  (optional ``ray`` extra); :class:`ClientSpec` builds clients on the workers from a factory and
  shard ids, so that their data never passes through the driver.
"""

from __future__ import annotations

from typing import Union

from .base import Backend, Outcome
from .ray_backend import RayBackend
from .ray_specs import ClientSpec, SpecClient
from .sequential import SequentialBackend
from .vectorized import VectorizedBackend

__all__ = ["BACKENDS", "Backend", "ClientSpec", "Outcome", "RayBackend", "SequentialBackend", "SpecClient",
           "VectorizedBackend", "make_backend"]

BACKENDS = {b.name: b for b in (SequentialBackend, VectorizedBackend, RayBackend)}


def make_backend(backend: Union[str, Backend]) -> Backend:
    """A backend instance from its name (``"sequential"``, ``"vectorized"``, ``"ray"``) or as given."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str) and backend in BACKENDS:
        return BACKENDS[backend]()
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))} or a Backend instance; "
                     f"got {backend!r}")

"""How many torch threads a simulation uses: its own choice, for its duration only.

A simulated client trains a small model on small batches, so each op is a few microseconds of
work; torch's intra-op threads then cost more in waking and waiting than they save. Measured on
this project's 2-core machine (torch 2.13 CPU, the README's 100-client, 30-round DP-FedAvg run
of the 64-64-10 MLP, vectorized backend, other work running): 4.3 s on one thread, 42-62 s on
two. ``run_simulation(threads=None)`` therefore trains models of fewer than
:data:`SMALL_MODEL` parameters on one thread and leaves torch's setting alone for larger ones,
where the ops are big enough to share; ``threads=k`` asks for k. The caller's setting is
restored when the simulation ends (also on error).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["SMALL_MODEL", "choose_threads", "simulation_threads"]

#: models with fewer parameters than this train on one thread (module docstring)
SMALL_MODEL = 1 << 17


def choose_threads(model: nn.Module, threads: Optional[int]) -> Optional[int]:
    """The thread count a simulation of ``model`` uses: ``threads`` when given, 1 for a model
    of fewer than SMALL_MODEL parameters, else None (torch's current setting)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise ValueError(f"threads must be an int >= 1 or None; got {threads!r}")
        return int(threads)
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL else None


@contextlib.contextmanager
def simulation_threads(model: nn.Module, threads: Optional[int]) -> Iterator[Optional[int]]:
    """Sets torch's intra-op threads to :func:`choose_threads` for the block, then restores them."""
    chosen = choose_threads(model, threads)
    before = torch.get_num_threads()
    if chosen is not None and chosen != before:
        torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

"""The strategy interface, in Flower's vocabulary (``configure_fit``, ``aggregate_fit``,
``configure_evaluate``, ``aggregate_evaluate``, ``evaluate``), on flat parameter vectors.

Differences from Flower, all for a simulation in one process: parameters are one flat float32
tensor (:class:`~ppml_fast.federated.parameters.ParameterLayout`); clients answer with an
*update* (trained minus received), so ``aggregate_fit`` also receives the round's starting
parameters; client sampling takes the round's ``num_clients`` and a seeded
``numpy.random.Generator`` from the simulation, so that a run is reproducible; a strategy that
spends privacy reports it through :meth:`Strategy.epsilon`.

Strategies never write into what they receive: the results' updates, the matrix
:func:`stack_updates` returns (a view of those updates, not a copy, when they already are the
rows of one matrix, as the vectorized backend returns them) and ``parameters``. Each works out
of place or on its own copy (every strategy of this package is tested for it).
"""

from __future__ import annotations

import abc
import numbers
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ppml_fast.ops import weighted_aggregate

from ..types import ClientProxy, EvalResult, FitResult

__all__ = ["FitResults", "Strategy", "check_results", "stack_updates", "weighted_mean_update"]

FitResults = Sequence[tuple[ClientProxy, FitResult]]
EvalResults = Sequence[tuple[ClientProxy, EvalResult]]
Failures = Sequence[tuple[ClientProxy, str]]
Instructions = list[tuple[ClientProxy, dict[str, Any]]]


def sample_clients(clients: Sequence[ClientProxy], num_clients: int,
                   rng: np.random.Generator) -> list[ClientProxy]:
    """``num_clients`` proxies drawn uniformly without replacement (all when there are fewer),
    in ascending cid order."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1; got {num_clients!r}")
    if num_clients >= len(clients):
        return sorted(clients, key=lambda c: c.cid)
    picked = rng.choice(len(clients), size=int(num_clients), replace=False)
    return sorted((clients[i] for i in picked), key=lambda c: c.cid)


def check_results(results: FitResults, numel: int) -> None:
    """ValueError unless every update has ``numel`` entries (the simulation filters wrongly
    shaped updates before a strategy sees them; this guards direct calls)."""
    for proxy, res in results:
        if res.update.numel() != numel:
            raise ValueError(
                f"results: client {proxy.cid}'s update has {res.update.numel()} entries, "
                f"expected {numel}")


def _rows_view(updates: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (K, P) matrix whose rows are ``updates``, as a view, when they are the consecutive
    rows of one float32 matrix in this order (same memory, row j at the first's address plus
    j P floats, contiguous, no autograd), else None."""
    first = updates[0]
    p, k = first.numel(), len(updates)
    if (first.dtype is not torch.float32 or p == 0 or first.requires_grad
            or not first.is_contiguous() or first.dim() != 1 or first.is_neg()):
        return None
    step, base, device = p * first.element_size(), first.data_ptr(), first.device
    for j, u in enumerate(updates):
        if (u.data_ptr() != base + j * step or u.dtype is not torch.float32 or u.numel() != p
                or u.device != device or u.requires_grad or not u.is_contiguous()
                or u.is_neg()):  # a lazily negated row: its memory holds -u (copied instead)
            return None
    # every row's bytes lie inside the first update's storage, so the view reads exactly them
    if (first.storage_offset() + k * p) * first.element_size() > first.untyped_storage().nbytes():
        return None
    return first.as_strided((k, p), (p, 1))


def stack_updates(results: FitResults) -> torch.Tensor:
    """The (K, P) float32 matrix of the results' updates (one row per client), read-only.

    When the updates already are the consecutive rows of one float32 matrix, in the results'
    order (what the vectorized backend returns for clients trained in one chunk), the matrix is
    a view of their memory: no copy. Otherwise the updates are copied into a new matrix. Either
    way the caller must not write into it (see the module docstring)."""
    if not results:
        raise ValueError("results must hold at least one FitResult")
    updates = [r.update for _, r in results]
    view = _rows_view(updates)
    if view is not None:
        return view
    return torch.stack([u.to(torch.float32) for u in updates])


def weighted_mean_update(results: FitResults, *, weighted: bool = True) -> torch.Tensor:
    """Mean of the updates weighted by ``num_examples`` (FedAvg, McMahan et al. 2017, Alg. 1),
    or unweighted, through the native ``weighted_aggregate`` op."""
    updates = stack_updates(results)
    if weighted:
        weights = torch.tensor([float(r.num_examples) for _, r in results], dtype=torch.float64)
        if float(weights.sum()) == 0:
            weights = torch.ones(len(results), dtype=torch.float64)
    else:
        weights = torch.ones(len(results), dtype=torch.float64)
    mean, _ = weighted_aggregate(updates, weights)
    return mean


class Strategy(abc.ABC):
    """Base class: subclasses implement :meth:`aggregate_fit`; the rest has Flower's defaults
    for a simulation (uniform sampling, no federated evaluation, no privacy spent).

    Contract of :meth:`aggregate_fit`: the results' updates, the matrix of
    :func:`stack_updates` (which may be a view of them) and ``parameters`` are read-only. A
    strategy that needs to change them (clip, sort, centre) works out of place or on its own
    copy: the updates may be rows of the backend's one (K, P) matrix, shared without a copy."""

    #: a round whose surviving results are fewer than this is skipped (parameters unchanged)
    min_fit_clients: int = 1

    def initialize_parameters(self, parameters: torch.Tensor) -> torch.Tensor:
        """The round-0 parameters (default: the model's initial state, unchanged)."""
        return parameters

    def setup(self, *, num_available_clients: int, clients_per_round: int) -> None:
        """Told once by the simulation, before round 1, how many clients there are and how
        many it asks for per round (a DP strategy derives its sampling rate from them, so it
        can answer ``epsilon(rounds_ahead=...)`` before the first round). Default: nothing."""

    def configure_fit(self, server_round: int, parameters: torch.Tensor,
                      clients: Sequence[ClientProxy], num_clients: int,
                      rng: np.random.Generator) -> Instructions:
        """Which clients train this round and the extra config each gets (merged over the
        simulation's config: local_epochs, batch_size, lr, ...)."""
        return [(c, {}) for c in sample_clients(clients, num_clients, rng)]

    @abc.abstractmethod
    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        """New global parameters from the round's starting ``parameters`` and the results of
        the clients that answered (``failures``: the ones left out and why)."""

    def configure_evaluate(self, server_round: int, parameters: torch.Tensor,
                           clients: Sequence[ClientProxy], num_clients: int,
                           rng: np.random.Generator) -> Instructions:
        """Clients that evaluate the new parameters on their own data (default: none; the
        simulation evaluates centrally on ``eval_dataset``)."""
        return []

    def aggregate_evaluate(self, server_round: int, results: EvalResults,
                           failures: Failures) -> tuple[Optional[float], dict[str, float]]:
        """Loss and metrics averaged over clients, weighted by their example counts."""
        total = sum(r.num_examples for _, r in results)
        if total == 0:
            return None, {}
        loss = sum(r.loss * r.num_examples for _, r in results) / total
        keys = set.intersection(*(set(r.metrics) for _, r in results))
        metrics = {k: sum(r.metrics[k] * r.num_examples for _, r in results) / total for k in sorted(keys)}
        return loss, metrics

    def evaluate(self, server_round: int, parameters: torch.Tensor) -> Optional[tuple[float, dict[str, float]]]:
        """Server-side evaluation of ``parameters`` (default: none)."""
        return None

    def epsilon(self, delta: float, *, rounds_ahead: int = 0) -> Optional[float]:
        """User-level epsilon spent after the rounds aggregated so far plus ``rounds_ahead``
        more, at ``delta``; None for a strategy that spends no privacy."""
        return None

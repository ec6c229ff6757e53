"""``SecAggFedAvg``: a strategy whose aggregate of the clients' updates is computed through secure
aggregation (:mod:`ppml_fast.federated.secagg`), so the server code holds the sum of the updates
and never one of them.

A round, in the simulation:

1. ``configure_fit`` asks the inner strategy which clients train (FedAvg's uniform sampling,
   DP-FedAvg's Poisson sampling); those clients take part in the protocol's first two rounds
   (keys and encrypted shares) as the round starts.
2. ``aggregate_fit`` plays the client side for each result (clip, encode, mask: the only place
   that reads an update) and the server side (sum of masked vectors, unmasking). A client that
   was picked but returned no result — dropped out, failed, timed out — counts as a dropout
   after sharing: its masks are removed through its reconstructed key while the survivors stay
   above the threshold; below it the round fails with :class:`SecAggError`.
3. The inner strategy receives the unmasked mean (or, for DP-FedAvg, the unmasked sum) as one
   result, so FedAvgM / FedAdam / ... apply their server step to it.

Weights (FedAvg): with ``max_weight=W``, client k's weight is w_k = min(num_examples, W); its
update is scaled by w_k / W before encoding and w_k travels exactly in an extra ring element, so
the server gets sum_k w_k u_k and sum_k w_k and divides (the exact weighted mean up to the
quantisation error). A client with more than W examples counts as W (W is public: it must be
fixed before the round, like the encoding range). ``max_weight=None``: every client counts once.

With DP-FedAvg (``SecAggFedAvg(DPFedAvgFixed(FedAvg(), ...))``): central noise on the unmasked
sum. Each client clips its own update (the server cannot), to L2 norm
``C (1 - 2 sqrt(P) / (2^b - 1))``, so that its *encoded* update, rounding included, has norm at
most C (each of the P coordinates moves by less than one step 2C / (2^b - 1)); the encoding range
is r = C, which then clips no coordinate. The server unmasks the sum of those clipped updates and
hands it to :meth:`DPFedAvgFixed.release_sum`, which adds N(0, (σ C)^2 I), divides by qN and
accounts the round as without secure aggregation. Trust: the server sees the exact sum before
its noise (DP protects the clients against everyone who sees the model, secure aggregation
protects each update against the server). Distributed noise (each client adding its share, so
that the server never sees an un-noised sum) is not implemented: with dropouts the noise falls
short of σ C, and its analysis needs discrete noise on the ring (Kairouz, Liu, Steinke, "The
distributed discrete Gaussian mechanism", ICML 2021). Adaptive clipping is refused (the server
would need each update's norm). A round that cannot finish raises under DP, whatever
``on_abort`` says: skipping it would make the release depend on how many clients were sampled,
which the accounting does not cover.
"""

from __future__ import annotations

import math
import numbers
import os
import random
from typing import Optional, Sequence

import numpy as np
import torch

from ..dp.adaptive import DPFedAvgAdaptive
from ..dp.fixed import DPFedAvgFixed
from ..strategy.base import Failures, FitResults, Instructions, Strategy, check_results
from ..strategy.fedavg import FedAvg
from ..strategy.wrapper import StrategyWrapper
from ..types import ClientProxy, FitResult
from .errors import SecAggError
from .params import SecAggParams
from .simulate import SecAggRound

__all__ = ["SecAggFedAvg"]


class SecAggFedAvg(StrategyWrapper):
    """Secure aggregation around ``strategy`` (module docstring).

    Args:
        strategy: the inner strategy, given the secure mean as its one result (default
            ``FedAvg()``), or a :class:`DPFedAvgFixed` for DP-FedAvg on the secure sum.
        clip_range: r, each coordinate of an update is clipped to [-r, r] before encoding.
            Required without DP; with DP it must be None (r = the clipping norm C).
        reconstruction_threshold: the fraction f in (1/2, 1] of a client's share holders needed
            to reconstruct its secrets: t = max(floor(h / 2) + 1, ceil(f h)); None: floor(2h/3) + 1.
        neighbours: None (complete graph, Bonawitz et al.) or an even k (SecAgg+, Bell et al.).
        max_weight: W, weights min(num_examples, W); None: equal weights. Not with DP (DP-FedAvg
            weighs every client equally).
        on_abort: ``"raise"`` (default) a :class:`SecAggError` when a round cannot finish, or
            ``"skip"`` it (parameters unchanged, metric ``secagg_aborted`` = 1). DP: "raise" only
            (a skipped round would reveal, outside the accountant, that few clients took part), so
            with DP a round that samples exactly one client, or loses survivors below the
            threshold, ends the simulation: choose clients_per_round so that qN is well above
            the threshold (at qN = 2 about a quarter of the rounds sample exactly one client).
        seed: None draws every secret from ``os.urandom`` (the masks are then not reproducible;
            the aggregate varies within the quantisation error); an int makes the simulation
            reproducible — and every key predictable: for simulations only.
    """

    def __init__(self, strategy: Optional[Strategy] = None, *, clip_range: Optional[float] = None,
                 reconstruction_threshold: Optional[float] = None, neighbours: Optional[int] = None,
                 max_weight: Optional[int] = None, on_abort: str = "raise",
                 seed: Optional[int] = None) -> None:
        strategy = FedAvg() if strategy is None else strategy
        super().__init__(strategy)
        self.dp = isinstance(strategy, DPFedAvgFixed)
        if isinstance(strategy, DPFedAvgAdaptive):
            raise ValueError("strategy must not be DPFedAvgAdaptive: adaptive clipping counts the "
                             "updates below the clipping norm, which needs each update's norm on the "
                             "server; use DPFedAvgFixed")
        if self.dp:
            if clip_range is not None:
                raise ValueError(f"clip_range must be None with DP-FedAvg (the encoding range is the "
                                 f"clipping norm C); got {clip_range!r}")
            if max_weight is not None:
                raise ValueError("max_weight must be None with DP-FedAvg (every client counts once)")
            if on_abort != "raise":
                raise ValueError("on_abort must be 'raise' with DP-FedAvg: skipping a failed round "
                                 "would make the release depend on the number of sampled clients")
        else:
            if clip_range is None:
                raise ValueError("clip_range is required (the range [-r, r] of the encoding)")
            if isinstance(clip_range, bool) or not isinstance(clip_range, numbers.Real) \
                    or not math.isfinite(clip_range) or clip_range <= 0:
                raise ValueError(f"clip_range must be a finite number > 0; got {clip_range!r}")
        if reconstruction_threshold is not None:
            f = reconstruction_threshold
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.5 < f <= 1:
                raise ValueError(f"reconstruction_threshold must be a fraction in (0.5, 1]; got {f!r}")
        if max_weight is not None and (isinstance(max_weight, bool) or not isinstance(max_weight, int)
                                       or max_weight < 1):
            raise ValueError(f"max_weight must be None or an int >= 1; got {max_weight!r}")
        if on_abort not in ("raise", "skip"):
            raise ValueError(f"on_abort must be 'raise' or 'skip'; got {on_abort!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be None or an int; got {type(seed).__name__}")
        if seed is not None and self.dp and strategy.secure_mode:
            # DESIGN.md invariant 3: in secure mode every secret comes from the OS CSPRNG
            raise ValueError(f"seed={seed!r} was passed with a secure-mode DP strategy: secure-mode "
                             "randomness (here the masks' secrets) cannot be seeded; pass seed=None")
        if neighbours is not None and (isinstance(neighbours, bool) or not isinstance(neighbours, int)
                                       or neighbours < 2 or neighbours % 2):
            raise ValueError(f"neighbours must be None or an even int >= 2; got {neighbours!r}")
        self.clip_range = None if clip_range is None else float(clip_range)
        self.reconstruction_threshold = reconstruction_threshold
        self.neighbours = neighbours
        self.max_weight = max_weight
        self.on_abort = on_abort
        self.seed = None if seed is None else int(seed)
        self._sampled: dict[int, list[int]] = {}

    @property
    def reproducible_noise(self) -> Optional[str]:
        """What a simulation's History says when the masks' secrets come from ``seed``."""
        if self.seed is None:
            return None
        return ("reproducible secure-aggregation masks: no secrecy of single updates against "
                "anyone who knows the seed")

    @property
    def min_fit_clients(self) -> int:  # type: ignore[override]
        """DP: 0 (a round with no result releases noise only); else 2 (the sum of one update is
        that update)."""
        return 0 if self.dp else max(2, self.strategy.min_fit_clients)

    def _randbytes(self, server_round: int):
        if self.seed is None:
            return os.urandom
        return random.Random(f"ppml_fast.secagg/{self.seed}/{server_round}").randbytes

    def _threshold(self, holders: int) -> Optional[int]:
        if self.reconstruction_threshold is None:
            return None
        return max(holders // 2 + 1, math.ceil(self.reconstruction_threshold * holders))

    # -- rounds ---------------------------------------------------------------------------------
    def configure_fit(self, server_round: int, parameters: torch.Tensor,
                      clients: Sequence[ClientProxy], num_clients: int,
                      rng: np.random.Generator) -> Instructions:
        """The inner strategy's choice; those clients enter the round's key exchange."""
        instructions = self.strategy.configure_fit(server_round, parameters, clients, num_clients, rng)
        self._sampled = {server_round: sorted(p.cid for p, _ in instructions)}
        return instructions

    def _client_inputs(self, results: FitResults, numel: int, clip_range: float,
                       bits: int) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
        """What each client feeds the protocol: its update (clipped to L2 norm below C under DP,
        see the module docstring) and its weight."""
        inputs, weights = {}, {}
        shrink = 1.0
        if self.dp:
            shrink = 1.0 - 2.0 * math.sqrt(numel) / ((1 << bits) - 1)
            if shrink <= 0:
                raise ValueError(f"{numel} parameters are too many for {bits}-bit encodings under DP "
                                 "(the rounding alone could exceed the clipping norm)")
        for proxy, res in results:
            u = res.update.detach().to(torch.float64)
            if self.dp:
                norm = float(torch.linalg.vector_norm(u))
                limit = clip_range * shrink
                if norm > limit:
                    u = u * (limit / norm)
            inputs[proxy.cid] = u
            weights[proxy.cid] = 1 if self.max_weight is None else min(res.num_examples, self.max_weight)
        return inputs, weights

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        """The unmasked mean (DP: sum) through one protocol round, then the inner strategy."""
        check_results(results, parameters.numel())
        numel = parameters.numel()
        if self.dp and not results:  # nothing to hide: DP-FedAvg releases its noise alone
            zero = torch.zeros(numel, dtype=torch.float32)
            no_norms = torch.empty(0, dtype=torch.float64)
            return self.strategy.release_sum(server_round, parameters, zero, no_norms, failures)
        got = {p.cid for p, _ in results}
        sampled = sorted(set(self._sampled.get(server_round, [])) | got | {p.cid for p, _ in failures})
        try:
            clip_range = self.strategy.round_clip_norm() if self.dp else self.clip_range
            holders = len(sampled) if self.neighbours is None else min(self.neighbours, len(sampled) - 1) + 1
            if len(sampled) < 2:
                raise SecAggError(f"secure aggregation round {server_round}: {len(sampled)} client "
                                  "sampled; the sum of one update is that update")
            randbytes = self._randbytes(server_round)  # one stream: graph, then clients' keys
            params = SecAggParams.create(
                sampled, vector_length=numel, clip_range=clip_range, threshold=self._threshold(holders),
                neighbours=self.neighbours, max_weight=self.max_weight or 1, round_id=server_round,
                randbytes=randbytes)
            inputs, weights = self._client_inputs(results, numel, clip_range, params.quantizer.bits)
            result = SecAggRound(params, randbytes=randbytes).run(
                inputs, weights=weights, drop_before_masking=[c for c in sampled if c not in got])
        except SecAggError:
            if self.on_abort == "raise":
                raise
            return parameters, {"secagg_aborted": 1.0}
        metrics = {"secagg_survivors": float(len(result.survivors)),
                   "secagg_dropped": float(len(result.dropped)),
                   "secagg_error_bound": float(result.error_bound)}
        if self.dp:
            total = result.total.to(torch.float32)
            new, inner = self.strategy.release_sum(server_round, parameters, total,
                                                   torch.empty(0, dtype=torch.float64), failures)
        else:
            mean = result.mean().to(torch.float32)
            single = [(ClientProxy(0), FitResult(update=mean, num_examples=result.weight_sum, metrics={}))]
            new, inner = self.strategy.aggregate_fit(server_round, parameters, single, failures)
        return new, {**inner, **metrics}

    def __repr__(self) -> str:
        graph = "complete" if self.neighbours is None else f"{self.neighbours}-regular"
        return f"SecAggFedAvg({self.strategy!r}, {graph} graph)"

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
   above the threshold. Below it (checked before any share is revealed), the round is run again
   over the survivors alone (``retry=True``, a fresh protocol run: new keys, new masks); when
   that is impossible too (fewer than two survivors), the round is aborted: ``on_abort="skip"``
   (the default) raises :class:`SecAggAborted`, which ``run_simulation`` records as a skipped
   round with its reason (parameters unchanged) and goes on; ``"raise"`` stops the run. The
   retry happens once, over exactly the clients that sent masked inputs, and only after a
   first run that revealed nothing (no share, no sum): the server learns one sum per round, as
   without it (a server that could retry over chosen subsets could difference their sums).
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
would need each update's norm).

Dropouts under DP, and why a round must not simply be skipped: DP-FedAvg's accountant analyses
a mechanism M that releases, every round, the noised sum of the clipped updates of the sampled
clients that survive (a dropped client contributes zero: the sensitivity C holds for any
dropout pattern). Whether secure aggregation can unmask depends on how many sampled clients
survived, and that count changes by one when one user's data is added or removed (user-level
adjacency): an abort is *not* independent of the data even though the dropouts are (they are
here), so a skipped round would release "few clients survived" outside the accountant, and
charging the round as if it released would not cover that either. So the release is kept
equal to M's for every number of survivors: (1) a round that cannot unmask is run again over
its survivors (fresh keys and masks; the failed run revealed no share: the server checks every
neighbourhood before asking for any, :meth:`SecAggServer.close_masked_inputs`); it releases the
sum over exactly M's survivors; (2) zero survivors: M releases its noise alone; (3) one
survivor, whose update no protocol can hide inside a sum: that client clips its update to C
and adds the round's noise N(0, (σ C)^2 I) itself, and the server releases that: M's output,
and no more than it (in this simulation the strategy plays the client; a deployed client draws
that noise from its own CSPRNG). With these, no DP round aborts for lack of survivors; an abort
(a protocol error, e.g. a bad message) is accounted as released and stops the run.

Parameters (Bell et al. 2020, :mod:`.design`): unless ``neighbours`` or
``reconstruction_threshold`` is given, each round's graph degree k and threshold t are derived
from its number of clients n, ``expected_dropout`` d, ``corrupt_fraction`` and the target
``failure_probability``: the smallest k (then the complete graph) whose smallest secure t keeps
P[the round cannot unmask] below the target. Few clients with many dropouts cannot meet it
(20 clients at d = 0.3: 0.048 per round at the lowest valid t); the round then uses the most
robust choice and, when it fails, the retry.
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
from .design import design
from .errors import SecAggAborted, SecAggError
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
            to reconstruct its secrets: t = max(floor(h / 2) + 1, ceil(f h)); None: derived
            (module docstring), or floor(2h/3) + 1 when ``neighbours`` is given.
        neighbours: None: derived (module docstring); or an even k (SecAgg+, Bell et al.; the
            complete graph of Bonawitz et al. when k >= n - 1).
        max_weight: W, weights min(num_examples, W); None: equal weights. Not with DP (DP-FedAvg
            weighs every client equally).
        on_abort: ``"skip"`` (default) an aborted round: :class:`SecAggAborted` (parameters
            unchanged; ``run_simulation`` records it as skipped with the reason and goes on),
            or ``"raise"`` a :class:`SecAggError` that ends the run. Under DP an abort always
            raises, after accounting the round (module docstring: it cannot come from dropouts).
        expected_dropout: d in [0, 1), the probability that a selected client does not send its
            masked input, independently of the others (the derived parameters assume it).
        failure_probability: the target probability in (0, 1) that a round cannot unmask.
        corrupt_fraction: the fraction in [0, 1) of clients that may collude with the server.
        retry: run a failed round again over its survivors (required under DP, see above).
        seed: None draws every secret from ``os.urandom`` (the masks are then not reproducible;
            the aggregate varies within the quantisation error); an int makes the simulation
            reproducible — and every key predictable: for simulations only.
    """

    def __init__(self, strategy: Optional[Strategy] = None, *, clip_range: Optional[float] = None,
                 reconstruction_threshold: Optional[float] = None, neighbours: Optional[int] = None,
                 max_weight: Optional[int] = None, on_abort: str = "skip",
                 expected_dropout: float = 0.3, failure_probability: float = 1e-6,
                 corrupt_fraction: float = 0.0, retry: bool = True,
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
            if retry is not True:
                raise ValueError("retry must be True with DP-FedAvg: without it a round aborts "
                                 "depending on how many sampled clients survived, which the "
                                 "accounting does not cover (module docstring)")
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
        if not isinstance(retry, bool):
            raise TypeError(f"retry must be a bool; got {type(retry).__name__}")
        design(2, dropout=expected_dropout, failure_probability=failure_probability,
               corrupt_fraction=corrupt_fraction)  # validates the three (named in its errors)
        self.expected_dropout = float(expected_dropout)
        self.failure_probability = float(failure_probability)
        self.corrupt_fraction = float(corrupt_fraction)
        self.retry = retry
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

    def _randbytes(self, server_round: int, attempt: int = 0):
        if self.seed is None:
            return os.urandom
        tail = "" if attempt == 0 else f"/retry{attempt}"
        return random.Random(f"ppml_fast.secagg/{self.seed}/{server_round}{tail}").randbytes

    def _round_design(self, n: int) -> tuple[Optional[int], Optional[int], Optional[float]]:
        """(k, t, failure bound) for a round of ``n`` clients: the user's, or derived."""
        if self.neighbours is None and self.reconstruction_threshold is None:
            got = design(n, dropout=self.expected_dropout, failure_probability=self.failure_probability,
                         corrupt_fraction=self.corrupt_fraction)
            return got.neighbours, got.threshold, got.failure_bound
        holders = n if self.neighbours is None else min(self.neighbours, n - 1) + 1
        if self.reconstruction_threshold is None:
            return self.neighbours, None, None
        t = max(holders // 2 + 1, math.ceil(self.reconstruction_threshold * holders))
        return self.neighbours, t, None

    # -- rounds ---------------------------------------------------------------------------------
    def configure_fit(self, server_round: int, parameters: torch.Tensor,
                      clients: Sequence[ClientProxy], num_clients: int,
                      rng: np.random.Generator) -> Instructions:
        """The inner strategy's choice; those clients enter the round's key exchange."""
        instructions = self.strategy.configure_fit(server_round, parameters, clients, num_clients, rng)
        self._sampled = {server_round: sorted(p.cid for p, _ in instructions)}
        return instructions

    def _client_inputs(self, results: FitResults, numel: int, clip_range: float,
                       bits: Optional[int]) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
        """What each client feeds the protocol: its update (clipped to L2 norm below C under DP,
        see the module docstring; ``bits=None``: no encoding follows, clipped to C) and its weight."""
        inputs, weights = {}, {}
        shrink = 1.0
        if self.dp and bits is not None:
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

    def _run(self, server_round: int, attempt: int, cohort: list[int], results: FitResults,
             numel: int, clip_range: float, dropped: list[int]):
        """One protocol run over ``cohort`` (``dropped``: those that send no masked input)."""
        if len(cohort) < 2:
            raise SecAggError(f"{len(cohort)} client(s) in the protocol run: the sum of one update "
                              "is that update")
        k, t, bound = self._round_design(len(cohort))
        randbytes = self._randbytes(server_round, attempt)  # one stream: graph, then clients' keys
        params = SecAggParams.create(
            cohort, vector_length=numel, clip_range=clip_range, threshold=t, neighbours=k,
            max_weight=self.max_weight or 1, round_id=server_round + (attempt << 63), randbytes=randbytes)
        inputs, weights = self._client_inputs(results, numel, clip_range, params.quantizer.bits)
        result = SecAggRound(params, randbytes=randbytes).run(inputs, weights=weights,
                                                              drop_before_masking=dropped)
        degree = min(len(v) for v in params.graph.values())
        return result, {"secagg_neighbours": float(degree), "secagg_threshold": float(params.threshold),
                        **({} if bound is None else {"secagg_failure_bound": bound})}

    def _abort(self, server_round: int, reason: str, error: Exception) -> None:
        """Skip (``on_abort="skip"``) or raise. Under DP an abort is never skipped: with the
        retry and the lone survivor's own noise, DP-FedAvg's release exists for every number
        of survivors, so an abort means a protocol error (a bad message); the round is
        accounted as released (record first, DESIGN.md invariant 4) and the run stops."""
        metrics = {"secagg_aborted": 1.0}
        if self.dp:
            self.strategy.accountant.compose(self.strategy._event(self.strategy.sampling_rate))
            self.strategy.rounds += 1
        message = f"secure aggregation round {server_round} aborted: {reason}"
        if self.on_abort == "raise" or self.dp:
            raise SecAggError(message) from error
        raise SecAggAborted(message, metrics) from error

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        """The unmasked mean (DP: sum) through one protocol run, or a second over the survivors
        when the first cannot unmask, then the inner strategy.

        Raises:
            SecAggAborted: ``on_abort="skip"`` and neither run could unmask (a skipped round).
            SecAggError: the same with ``on_abort="raise"``.
        """
        check_results(results, parameters.numel())
        numel = parameters.numel()
        no_norms = torch.empty(0, dtype=torch.float64)
        if self.dp and not results:  # nothing to hide: DP-FedAvg releases its noise alone
            zero = torch.zeros(numel, dtype=torch.float32)
            return self.strategy.release_sum(server_round, parameters, zero, no_norms, failures)
        if self.dp and len(results) == 1:  # a lone survivor noises its own update (docstring)
            (proxy, _), = results
            clipped, _ = self._client_inputs(results, numel, self.strategy.round_clip_norm(), None)
            total = clipped[proxy.cid].to(torch.float32)
            new, inner = self.strategy.release_sum(server_round, parameters, total, no_norms, failures)
            return new, {**inner, "secagg_survivors": 1.0, "secagg_lone_survivor": 1.0}
        got = sorted({p.cid for p, _ in results})
        sampled = sorted(set(self._sampled.get(server_round, [])) | set(got) | {p.cid for p, _ in failures})
        clip_range = self.strategy.round_clip_norm() if self.dp else self.clip_range
        retried = 0.0
        try:
            result, info = self._run(server_round, 0, sampled, results, numel, clip_range,
                                     [c for c in sampled if c not in got])
        except SecAggError as first:
            if not self.retry or len(got) < 2 or len(got) == len(sampled):
                why = (f"{first}; {len(got)} client(s) sent masked inputs, too few to retry"
                       if len(got) < 2 else f"{first}; no retry")
                self._abort(server_round, why, first)
            try:  # a fresh protocol run over the survivors (no share of the first was revealed)
                result, info = self._run(server_round, 1, got, results, numel, clip_range, [])
            except SecAggError as second:
                self._abort(server_round, f"{first}; the retry with the {len(got)} survivors "
                                          f"failed too: {second}", second)
            retried = 1.0
        metrics = {"secagg_survivors": float(len(result.survivors)),
                   "secagg_dropped": float(len(result.dropped)),
                   "secagg_error_bound": float(result.error_bound), "secagg_retried": retried, **info}
        if self.dp:
            total = result.total.to(torch.float32)
            new, inner = self.strategy.release_sum(server_round, parameters, total, no_norms, failures)
        else:
            mean = result.mean().to(torch.float32)
            single = [(ClientProxy(0), FitResult(update=mean, num_examples=result.weight_sum, metrics={}))]
            new, inner = self.strategy.aggregate_fit(server_round, parameters, single, failures)
        return new, {**inner, **metrics}

    def __repr__(self) -> str:
        graph = ("derived" if self.neighbours is None and self.reconstruction_threshold is None
                 else "complete" if self.neighbours is None else f"{self.neighbours}-regular")
        return f"SecAggFedAvg({self.strategy!r}, {graph} graph)"

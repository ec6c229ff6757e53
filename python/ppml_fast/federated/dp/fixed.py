"""DP-FedAvg with a fixed clipping norm: user-level differential privacy around a mean-type
strategy (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models", ICLR, Algorithm 1 with the fixed-denominator estimator f_f; Flower's
``DPFedAvgFixed`` / ``DifferentialPrivacyServerSideFixedClipping``).

Each round (server-side noise; the server is trusted with the individual updates):

1. ``configure_fit`` samples each of the N clients independently with probability
   q = clients_per_round / N (Poisson sampling; a round may sample nobody), then asks the inner
   strategy for each sampled client's extra config;
2. ``aggregate_fit`` clips each update to L2 norm <= C, sums them (the native
   ``weighted_aggregate`` op with ``clip_norm``), adds N(0, (σ C)^2 I) once and divides by the
   expected number of clients qN (fixed denominator: one user changes the sum by at most C, so
   the mean's sensitivity is C / (qN) and its noise std σ C / (qN); ``noisy_scale_``), and
   hands that noised mean update to the inner strategy as a single result, so the inner
   strategy's server step applies to it: FedAvg adds it, FedAvgM / FedAdam / FedYogi /
   FedAdagrad treat it as their pseudo-gradient (post-processing, no extra privacy cost).
   Robust aggregators (median, trimmed mean, Krum) are refused: with one noised result there is
   nothing for them to be robust against, and DP already bounds each user's influence.
3. The accountant composes PoissonSampledEvent(q, GaussianEvent(σ)) once per aggregated round
   (user-level adjacency: adding or removing one client's whole data).

Every client counts the same (user-level DP): example counts are not used as weights. A
client that fails or is dropped contributes a zero update; the denominator does not change.
Noise (DESIGN.md, privacy invariant 3): Philox keyed from OS entropy, or from ``seed`` when the
user passes one (reproducible, and then no privacy against whoever knows the seed: the History
says so, ``noise_keys.REPRODUCIBLE_NOISE``); the simulation's seed (data, client sampling,
initialisation) never keys the noise. Each release reserves its offset range atomically
(:class:`~ppml_fast.noise_keys.NoiseStream`), so no two rounds share noise.
``secure_mode=True``: ChaCha20 keyed from OS entropy on every release, and the clients are
sampled from the OS CSPRNG (:func:`ppml_fast.secure_random.bernoulli_mask`) instead of the
simulation's seeded numpy generator; a ``seed`` is then an error. Without ``secure_mode`` the
noise does not defend against floating-point attacks.

``min_fit_clients`` is 0: a round with no surviving result still releases noise / (qN) and is
accounted. A simulation that skipped such a round instead would reveal that nobody took part.

State and resume (the rule of :func:`ppml_fast.noise_keys.resume_key`, as for the DP optimizer
and :class:`~ppml_fast.federated.dp.DPFTRLFedAvg`): :meth:`~DPFedAvgFixed.state_dict` holds the
noise key only when the user gave it (an OS-drawn key never leaves the process). A server has
no journal, so nobody knows whether rounds were released after a state was saved (a crash after
a checkpoint): :meth:`~DPFedAvgFixed.load_state_dict` therefore re-keys the noise from OS entropy
by default, also for a user seed — continuing the saved key would draw the released rounds'
noise again, and whoever saw both releases could subtract it. A seeded run is reproducible up to
a resume, not across it (like Opacus, whose checkpoints do not hold the noise generator; Flower's
DP strategies keep no noise state at all). ``load_state_dict(state, continue_noise=True)`` keeps
the user's key at the saved offset, for a state saved after the last released round (the user
vouches for it). Without a journal epsilon counts the state's rounds only. With ``journal=path``
(:mod:`ppml_fast.federated.dp.journaled`) every noise reservation is durably recorded before the
draw: a loaded state then counts every round released after it, and a user's key continues
(after every offset reserved under it) when the journal is the state's own.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent
from ppml_fast.accounting.calibration import ACCOUNTANTS
from ppml_fast.noise_keys import REPRODUCIBLE_NOISE, NoiseStream, resume_key
from ppml_fast.ops import noisy_scale_, weighted_aggregate
from ppml_fast.ops.noise import blocks as noise_blocks
from ppml_fast.secure_random import bernoulli_mask

from . import journaled
from ..strategy._hparams import check_positive as _positive
from ..strategy.base import Failures, FitResults, Instructions, Strategy, check_results, stack_updates
from ..strategy.wrapper import StrategyWrapper
from ..types import ClientProxy, FitResult

__all__ = ["DPFedAvgFixed", "ROBUST_STRATEGIES"]

#: Strategies whose aggregation is not a mean; a DP wrapper refuses them as inner strategy.
ROBUST_STRATEGIES = frozenset({"FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan"})


def _check_inner(strategy: Strategy) -> None:
    names = {c.__name__ for c in type(strategy).__mro__}
    if names & ROBUST_STRATEGIES or getattr(strategy, "robust", False):
        raise ValueError(
            f"strategy must be a mean-type strategy (FedAvg, FedAvgM, FedProx, FedAdam, ...); got "
            f"{type(strategy).__name__}: robust aggregation of one noised mean is meaningless "
            "under DP-FedAvg (clipping already bounds each client's influence)")
    if strategy.epsilon(0.5) is not None:
        raise ValueError(f"strategy must not spend privacy itself; got {type(strategy).__name__}, "
                         "which reports an epsilon (do not nest DP wrappers)")


class DPFedAvgFixed(StrategyWrapper):
    """User-level DP around ``strategy`` with a fixed clipping norm (module docstring).

    Args:
        strategy: the inner, mean-type strategy (FedAvg, FedAvgM, FedProx, FedAdam, ...).
        noise_multiplier: σ, the noise std as a multiple of the clipping norm (> 0).
        clip_norm: C, the L2 bound on each client's update (> 0).
        sampling_rate: q, when known before the first round (``epsilon(rounds_ahead=k)``
            needs it then: ``run_simulation(max_epsilon=...)`` asks before round 1, so pass
            ``clients_per_round / len(clients)`` there); None: q = clients_per_round / N, set
            by each ``configure_fit``. When given, ``configure_fit`` refuses a round whose q
            differs.
        accountant: "pld" (the default: privacy loss distributions, tight) or "rdp" (Rényi DP, an
            upper bound, looser).
        secure_mode: ChaCha20 noise keyed from OS entropy, and client sampling from the OS
            CSPRNG (a ``seed`` is then an error).
        seed: a noise seed in [0, 2**64) for reproducible noise (no privacy against whoever
            knows it); None (the default): the noise key comes from OS entropy.
        journal: None, or a path (or :class:`~ppml_fast.privacy.journal.PrivacyJournal`) where
            each round's cost and noise range are recorded before its noise is drawn (one per
            run; records already in it are counted at once): a crash-safe resume
            (:mod:`ppml_fast.federated.dp.journaled`).
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clip_norm: float,
                 sampling_rate: Optional[float] = None, accountant: str = "pld",
                 secure_mode: bool = False, seed: Optional[int] = None, journal=None) -> None:
        super().__init__(strategy)
        _check_inner(strategy)
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier)
        self.clip_norm = _positive("clip_norm", clip_norm)
        if sampling_rate is not None:
            q = _positive("sampling_rate", sampling_rate)
            if q > 1:
                raise ValueError(f"sampling_rate must be in (0, 1]; got {sampling_rate!r}")
            sampling_rate = q
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}; got {accountant!r}")
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool; got {type(secure_mode).__name__}")
        self.sampling_rate = sampling_rate
        self.accountant_name = accountant
        self.accountant = ACCOUNTANTS[accountant]()
        self.secure_mode = secure_mode
        self.noise = NoiseStream(seed, name="seed", secure=secure_mode)
        #: whether noise of this run was ever keyed from a user seed (it stays REPRODUCIBLE_NOISE
        #: after a resume re-keys it: the earlier rounds can still be denoised by the seed's holder)
        self._seeded_run = self.noise.user_seeded
        self.rounds = 0
        self.journal = None
        self.min_fit_clients = 0
        self.expected_clients: Optional[float] = None  # qN of the last configured round
        #: each update's L2 norm before clipping in the last aggregated round (server-side)
        self.last_update_norms = torch.empty(0, dtype=torch.float64)
        self._attach_journal(journal)  # last: nothing else can fail once it is held

    def _attach_journal(self, journal) -> None:
        """Opens ``journal`` (None: none): its records count at once (the run's record) and the
        noise continues after every offset it reserved under this strategy's key."""
        if journal is None:
            return
        j = journaled.open_journal(journal)
        for r in j.records:
            if r.event is not None:
                self.accountant.compose(r.event)
        self.noise.advance_to(j.next_offset(self.noise.seed))
        self.journal = j

    # -- noise ----------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """The Philox key of the noise (from OS entropy unless the user gave a seed)."""
        return self.noise.seed

    @property
    def offset(self) -> int:
        """The next unreserved block of the noise stream."""
        return self.noise.offset

    @property
    def reproducible_noise(self) -> Optional[str]:
        """``noise_keys.REPRODUCIBLE_NOISE`` when the noise is keyed from a user-given seed,
        else None (a simulation puts it in its History)."""
        seeded = self.noise.reproducible or self._seeded_run
        return REPRODUCIBLE_NOISE if seeded and not self.secure_mode else None

    def _noise_range(self, tensors, *, event=None, step: Optional[int] = None) -> tuple[int, int]:
        """(key, first offset) of a release on ``tensors``, reserved (and journaled, with the
        release's ``event`` and round ``step``, default :attr:`rounds`) before the draw."""
        blocks = noise_blocks(tensors)
        key, start = self.noise.reserve(blocks)
        journaled.record(self.journal, step=self.rounds if step is None else step, event=event,
                         key=key, start=start, blocks=blocks)
        return key, start

    # -- what the subclass (adaptive clipping) changes -------------------------------------------
    def round_clip_norm(self) -> float:
        """C for the round being aggregated."""
        return self.clip_norm

    def update_noise_multiplier(self) -> float:
        """σ of the update's noise this round (adaptive clipping lowers it, Andrew et al. 2021)."""
        return self.noise_multiplier

    def _after_aggregate(self, norms: torch.Tensor, clip_norm: float) -> dict[str, float]:
        """Hook after the update is released (adaptive clipping: the noised count and C's step)."""
        return {}

    def _check_round(self, num_clients: int, population: int) -> None:
        """Hook to validate a round's parameters before anything is drawn."""

    # -- rounds ---------------------------------------------------------------------------------
    def setup(self, *, num_available_clients: int, clients_per_round: int) -> None:
        """Fixes q = clients_per_round / num_available_clients (capped at 1) before round 1,
        so that ``epsilon(delta, rounds_ahead=k)`` answers from the start; a ``sampling_rate``
        given to the constructor must agree."""
        for name, v in (("num_available_clients", num_available_clients),
                        ("clients_per_round", clients_per_round)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        q = min(1.0, clients_per_round / num_available_clients)
        if self.sampling_rate is not None and not math.isclose(q, self.sampling_rate, rel_tol=1e-9):
            raise ValueError(f"clients_per_round / num_available_clients = {clients_per_round}/"
                             f"{num_available_clients} = {q:.6g} differs from sampling_rate="
                             f"{self.sampling_rate:.6g} given to the strategy")
        self._check_round(int(clients_per_round), int(num_available_clients))
        self.sampling_rate, self.expected_clients = q, q * num_available_clients
        super().setup(num_available_clients=num_available_clients, clients_per_round=clients_per_round)

    def configure_fit(self, server_round: int, parameters: torch.Tensor,
                      clients: Sequence[ClientProxy], num_clients: int,
                      rng: np.random.Generator) -> Instructions:
        """Poisson sampling: each client independently with q = num_clients / len(clients)
        (capped at 1); then the inner strategy's extra config for each sampled client."""
        if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
            raise ValueError(f"num_clients must be an int >= 1; got {num_clients!r}")
        if len(clients) == 0:
            raise ValueError("clients must not be empty")
        n = len(clients)
        q = min(1.0, num_clients / n)
        if self.sampling_rate is not None and not math.isclose(q, self.sampling_rate, rel_tol=1e-9):
            raise ValueError(f"num_clients / len(clients) = {num_clients}/{n} = {q:.6g} differs from "
                             f"sampling_rate={self.sampling_rate:.6g} given to the strategy")
        self._check_round(int(num_clients), n)
        order = sorted(clients, key=lambda c: c.cid)
        # secure mode: the OS CSPRNG, not the simulation's seeded generator
        picked = bernoulli_mask(n, q).numpy() if self.secure_mode else rng.random(n) < q
        sampled = [c for c, keep in zip(order, picked) if keep]
        out = []
        if sampled:
            inner = self.strategy.configure_fit(server_round, parameters, sampled, len(sampled), rng)
            extras = {c.cid: cfg for c, cfg in inner}
            if set(extras) != {c.cid for c in sampled}:
                raise ValueError(f"the inner strategy {type(self.strategy).__name__} changed the "
                                 "Poisson-sampled clients; a DP wrapper needs it to keep them all")
            out = [(c, dict(extras[c.cid])) for c in sampled]
        # the round's state only once nothing can fail
        self.sampling_rate, self.expected_clients = q, q * n
        return out

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        """Clip, sum, noise once, divide by qN; the inner strategy steps with that mean."""
        if self.expected_clients is None:
            raise ValueError("aggregate_fit before configure_fit: the round's sampling rate q and "
                             "expected number of clients qN are unknown")
        check_results(results, parameters.numel())
        clip = self.round_clip_norm()
        if results:
            updates = stack_updates(results)
            k = updates.shape[0]
            mean, norms = weighted_aggregate(updates, torch.ones(k, dtype=torch.float64), clip_norm=clip)
            total = mean * k  # the sum of the clipped updates
        else:
            total = torch.zeros(parameters.numel(), dtype=torch.float32)
            norms = torch.empty(0, dtype=torch.float64)
        return self.release_sum(server_round, parameters, total, norms, failures)

    def release_sum(self, server_round: int, parameters: torch.Tensor, total: torch.Tensor,
                    norms: torch.Tensor, failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        """The second half of :meth:`aggregate_fit`: noise ``total``, the sum of the round's
        updates clipped to :meth:`round_clip_norm` (a float tensor, noised in place), divide by
        qN, account the round and step the inner strategy. ``norms``: the updates' norms before
        clipping where the server knows them (empty otherwise). Secure aggregation
        (:class:`~ppml_fast.federated.secagg.SecAggFedAvg`) calls it with the unmasked sum of
        updates its clients clipped themselves, so the server never holds a single update."""
        if self.expected_clients is None:
            raise ValueError("release_sum before configure_fit: the round's sampling rate q and "
                             "expected number of clients qN are unknown")
        clip, sigma = self.round_clip_norm(), self.update_noise_multiplier()
        key, start = self._noise_range([total], event=self._event(self.sampling_rate))
        noisy_scale_(total, sigma * clip, self.expected_clients, seed=key, offset=start,
                     secure=self.secure_mode)
        self.last_update_norms = norms
        self.accountant.compose(self._event(self.sampling_rate))
        self.rounds += 1
        extra = self._after_aggregate(norms, clip)
        single = [(ClientProxy(0), FitResult(update=total, num_examples=1, metrics={}))]
        new, inner_metrics = self.strategy.aggregate_fit(server_round, parameters, single, failures)
        metrics = {**inner_metrics, "dp_clip_norm": clip,
                   "dp_noise_std": sigma * clip / self.expected_clients, **extra}
        return new, metrics

    def _event(self, q: float) -> PoissonSampledEvent:
        """One round, as the accountant sees it (Theorem 1 of Andrew et al. for the adaptive
        variant: the update and the count together cost one Gaussian at ``noise_multiplier``)."""
        return PoissonSampledEvent(q, GaussianEvent(self.noise_multiplier))

    # -- privacy --------------------------------------------------------------------------------
    def epsilon(self, delta: float, *, rounds_ahead: int = 0) -> Optional[float]:
        """User-level ε at ``delta`` after the rounds aggregated so far plus ``rounds_ahead``
        more at the current q (the state is not changed)."""
        if isinstance(rounds_ahead, bool) or not isinstance(rounds_ahead, numbers.Integral) or rounds_ahead < 0:
            raise ValueError(f"rounds_ahead must be an int >= 0; got {rounds_ahead!r}")
        if rounds_ahead == 0:
            return self.accountant.get_epsilon(delta)
        if self.sampling_rate is None:
            raise ValueError("rounds_ahead > 0 needs the sampling rate, unknown before the first "
                             "configure_fit: pass sampling_rate= to the strategy")
        trial = copy.deepcopy(self.accountant)
        return trial.compose(self._event(self.sampling_rate), int(rounds_ahead)).get_epsilon(delta)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The privacy state: accountant history, the noise key (None unless the user gave it:
        an OS-drawn key is never saved) and offset, whether the run's noise was ever seeded,
        rounds, q and qN."""
        user_key = self.noise.user_seeded and not self.secure_mode
        return {"accountant_name": self.accountant_name, "accountant": self.accountant.state_dict(),
                "seed": self.seed if user_key else None, "offset": self.offset,
                "seed_given": bool(self._seeded_run and not self.secure_mode),
                "journal": None if self.journal is None else self.journal.position(),
                "rounds": self.rounds,
                "sampling_rate": self.sampling_rate, "expected_clients": self.expected_clients,
                "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict, *, continue_noise: bool = False) -> None:
        """Restores :meth:`state_dict` (validated first; nothing changes on an error).

        The noise is re-keyed from OS entropy (module docstring: rounds released after the
        state was saved may have used the saved key's next offsets), unless the strategy's
        journal is the one the state was saved with: a user's key then continues after every
        offset reserved under it. ``continue_noise=True`` continues the user's seeded key at
        the saved offset, bit for bit the run that never stopped — only correct when no round
        was released after the state was saved (the caller vouches for it); a state without a
        user key (OS-drawn keys are never saved, and secure mode has none) is then an error.
        With a journal, the rounds it recorded after the state are counted."""
        if not isinstance(continue_noise, bool):
            raise TypeError(f"continue_noise must be a bool; got {type(continue_noise).__name__}")
        try:
            if state["accountant_name"] != self.accountant_name:
                raise ValueError(f"accountant {state['accountant_name']!r} != "
                                 f"{self.accountant_name!r}")
            acc = ACCOUNTANTS[self.accountant_name]()
            acc.load_state_dict(state["accountant"])
            seed = None if state["seed"] is None else int(state["seed"])
            # states written before "seed_given" existed: their seed may have come from the
            # simulation's seed, so they count as reproducible
            seed_given = bool(state.get("seed_given", seed is not None))
            offset, rounds = int(state["offset"]), int(state["rounds"])
            q = None if state["sampling_rate"] is None else float(state["sampling_rate"])
            expected = None if state["expected_clients"] is None else float(state["expected_clients"])
            clip = _positive("clip_norm", state["clip_norm"])
            position = state.get("journal")
            records = journaled.unseen(self.journal, position)
            for r in records:  # rounds released after the state (a crash's lost rounds)
                if r.event is not None:
                    acc.compose(r.event)
            rounds += journaled.rounds_in(records)
        except (KeyError, TypeError) as e:
            raise ValueError(f"state must be a {type(self).__name__}.state_dict(); {e!r}") from e
        if offset < 0 or rounds < 0:
            raise ValueError(f"state: offset and rounds must be >= 0; got {offset}, {rounds}")
        if seed is not None and not 0 <= seed < 2**64:
            raise ValueError(f"state: seed must be None or in [0, 2**64); got {seed}")
        if q is not None and not 0 < q <= 1:
            raise ValueError(f"state: sampling_rate must be in (0, 1]; got {q}")
        if expected is not None and not expected > 0:
            raise ValueError(f"state: expected_clients must be > 0; got {expected}")
        if continue_noise and (seed is None or state.get("seed_given") is not True or self.secure_mode):
            raise ValueError(
                "continue_noise=True needs a state holding the user's noise seed; this one holds "
                + ("none (secure mode keys every release from OS entropy)" if self.secure_mode else
                   "none (an OS-drawn key is never saved)" if seed is None else
                   "a key that may not be the user's (a state written before 'seed_given')")
                + "; nothing was loaded")
        # noise_keys.resume_key: the user's key continues only with the state's own journal
        # (after every offset it reserved under the key) or on the caller's word
        unused_from = offset if continue_noise else None
        if (self.journal is not None and seed is not None and state.get("seed_given") is True
                and self.journal.vouches_for(position)):
            unused_from = max(offset, self.journal.next_offset(seed))
        key, start, continued = resume_key(None if self.secure_mode else seed, offset,
                                           unused_from=unused_from)
        noise = NoiseStream(None, secure=self.secure_mode)
        if continued:
            noise.seed, noise.user_seeded = key, True
            noise.advance_to(start)
        elif seed is not None and seed_given and not self.secure_mode:
            warnings.warn(
                f"{type(self).__name__} state loaded: the seeded noise was re-keyed from OS entropy "
                "(rounds released after the state was saved may have used the saved key's next "
                "offsets); the run is not reproducible from the seed past this resume. Resume with "
                "the state's own journal=, or pass continue_noise=True only if no round was "
                "released after the state was saved",
                UserWarning, stacklevel=2)
        self.accountant, self.noise, self.rounds = acc, noise, rounds
        self._seeded_run = seed_given and not self.secure_mode
        self.sampling_rate, self.expected_clients, self.clip_norm = q, expected, clip

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.strategy).__name__}, noise_multiplier="
                f"{self.noise_multiplier}, clip_norm={self.clip_norm:.4g})")

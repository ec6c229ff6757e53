"""DP-FTRL for federated learning: user-level DP with correlated noise (tree aggregation or
banded matrix factorization) for cross-device rounds whose clients cannot be Poisson-sampled
(Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private (Deep) Learning
without Sampling or Shuffling", ICML, arXiv 2103.00039, section 5; Choquette-Choo et al. 2023,
"(Amplified) Banded Matrix Factorization", arXiv 2306.08153, section 5: Google's production
federated training).

Each round, as :class:`~ppml_fast.federated.dp.DPFedAvgFixed` (whose pieces it reuses): clip
each client's update to L2 norm <= C, sum, add noise, divide by the fixed number of clients per
round (a public denominator), and let the inner mean-type strategy step with that noised mean.
What differs:

- the noise of round r is sigma C w_r from the correlated-noise generator
  (:class:`~ppml_fast.privacy.correlated_noise.CorrelatedNoise`, offsets reserved from the
  wrapper's :class:`~ppml_fast.noise_keys.NoiseStream` before the draw), so the server's running
  sum of updates carries the factorization's noise B z instead of a sum of independent noises;
- clients are **not** Poisson-sampled: each round picks ``clients_per_round`` clients uniformly
  among those *eligible* — not picked in the last ``min_separation - 1`` rounds and picked fewer
  than ``max_participations`` times. That enforces b-min-separated participation (arXiv
  2306.08153, section 2), the schema the accountant assumes; a picked client counts as
  participating even if it fails (conservative). No amplification is claimed, so the picks may
  come from the simulation's generator, also in secure mode;
- accounting per round: ``strategy.step_event(r, sigma, participation)`` (user-level, zero-out
  adjacency: one user's clipped updates replaced by zero; None: nothing new released);
- the run is planned for ``rounds`` rounds; a round past the plan is refused before anything is
  drawn, and ``epsilon(rounds_ahead=...)`` past it is infinite.

State: as the optimizer's (privacy/state.py): never the noise, and the noise key only when the
user gave it. A server has no journal, so nobody knows whether rounds were released after a
state was saved (a crash): a loaded state always starts a new segment of the strategy at its
round (composition; see :mod:`ppml_fast.privacy.correlated_noise`) and re-keys the noise from
OS entropy, also for a user-given seed (the saved key's next offsets may have been used by such
rounds: reusing them would let their noise be subtracted). A seeded run is therefore
reproducible up to a resume, not across it.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch

from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.noise_keys import NoiseStream

from ..strategy.base import Failures, Instructions, Strategy
from ..strategy.wrapper import StrategyWrapper
from ..types import ClientProxy, FitResult
from .fixed import DPFedAvgFixed

__all__ = ["DPFTRLFedAvg"]

MECHANISMS = ("tree", "banded_mf")


def _count(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    return int(v)


class DPFTRLFedAvg(DPFedAvgFixed):
    """User-level DP-FTRL around ``strategy`` (module docstring).

    Args:
        strategy: the inner, mean-type strategy (FedAvg for DP-FTRL proper: the model is the
            noisy running sum of the updates; FedAvgM / FedAdam post-process the noised mean).
        noise_multiplier: sigma, the std of z as a multiple of the clipping norm (> 0).
        clip_norm: C, the L2 bound on each client's update (> 0).
        rounds: the planned number of rounds T (the strategy matrix is T x T).
        mechanism: "banded_mf" (``bands`` bands, optimised once per (T, b) and cached) or "tree".
        bands: b for "banded_mf".
        min_separation: rounds between two picks of one client (default: ``bands`` for
            "banded_mf", 1 for "tree"); must be >= ``bands``.
        max_participations: picks per client over the run (None: as many as the separation allows).
        accountant, secure_mode, seed: as :class:`DPFedAvgFixed`.
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clip_norm: float, rounds: int,
                 mechanism: str = "banded_mf", bands: Optional[int] = None,
                 min_separation: Optional[int] = None, max_participations: Optional[int] = None,
                 accountant: str = "pld", secure_mode: bool = False, seed: Optional[int] = None) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}; got {mechanism!r}")
        rounds = _count("rounds", rounds)
        if mechanism == "banded_mf":
            if bands is None:
                raise ValueError("mechanism='banded_mf' needs bands= (an int >= 1)")
            bands = _count("bands", bands)
        elif bands is not None:
            raise ValueError("bands is for mechanism='banded_mf'; tree aggregation has none")
        sep = _count("min_separation", min_separation if min_separation is not None else (bands or 1))
        k = None if max_participations is None else _count("max_participations", max_participations)
        from ppml_fast.accounting import matrix_factorization as mf
        from ppml_fast.privacy.correlated_noise import CorrelatedNoise

        super().__init__(strategy, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                         accountant=accountant, secure_mode=secure_mode, seed=seed)
        matrix = mf.tree(rounds) if mechanism == "tree" else mf.optimize_banded(rounds, bands)
        participation = mf.Participation("min_separated", min_separation=sep, max_participations=k)
        matrix.sensitivity_sq_prefix(rounds - 1, participation)  # refuses bands > min_separation
        self.mechanism, self.planned_rounds = mechanism, rounds
        self.min_separation, self.max_participations = sep, k
        self.correlated = CorrelatedNoise(matrix, participation)
        self._last: dict[int, int] = {}  # cid -> the round index it was last picked at
        self._picks: dict[int, int] = {}  # cid -> how often it was picked

    # -- rounds ---------------------------------------------------------------------------------
    def setup(self, *, num_available_clients: int, clients_per_round: int) -> None:
        """The fixed denominator: ``clients_per_round`` (no sampling rate: clients are picked)."""
        _count("num_available_clients", num_available_clients)
        self.expected_clients = float(_count("clients_per_round", clients_per_round))
        StrategyWrapper.setup(self, num_available_clients=num_available_clients,
                              clients_per_round=clients_per_round)

    def eligible(self, clients: Sequence[ClientProxy]) -> list[ClientProxy]:
        """The clients the next round may pick (sorted by cid)."""
        r, k = self.rounds, self.max_participations
        return [c for c in sorted(clients, key=lambda c: c.cid)
                if (c.cid not in self._last or r - self._last[c.cid] >= self.min_separation)
                and (k is None or self._picks.get(c.cid, 0) < k)]

    def configure_fit(self, server_round: int, parameters: torch.Tensor,
                      clients: Sequence[ClientProxy], num_clients: int,
                      rng: np.random.Generator) -> Instructions:
        """Up to ``num_clients`` clients drawn uniformly from :meth:`eligible` (fewer when fewer
        are eligible: the denominator stays ``num_clients``)."""
        num_clients = _count("num_clients", num_clients)
        if len(clients) == 0:
            raise ValueError("clients must not be empty")
        self.correlated.check_step(self.rounds, self.noise_multiplier * self.clip_norm,
                                   sigma=self.noise_multiplier)
        pool = self.eligible(clients)
        idx = rng.permutation(len(pool))[:min(num_clients, len(pool))] if pool else []
        picked = sorted((pool[i] for i in idx), key=lambda c: c.cid)
        out = []
        if picked:
            inner = self.strategy.configure_fit(server_round, parameters, picked, len(picked), rng)
            extras = {c.cid: cfg for c, cfg in inner}
            if set(extras) != {c.cid for c in picked}:
                raise ValueError(f"the inner strategy {type(self.strategy).__name__} changed the "
                                 "picked clients; DP-FTRL needs it to keep them all")
            out = [(c, dict(extras[c.cid])) for c in picked]
        for c in picked:  # the round's state only once nothing can fail
            self._last[c.cid] = self.rounds
            self._picks[c.cid] = self._picks.get(c.cid, 0) + 1
        self._round_picks = (self.rounds, {c.cid for c in picked})
        self.expected_clients = float(num_clients)
        return out

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        """DPFedAvgFixed's clip, sum and release, for results of this round's picked clients
        only, each once: a result from a client not picked this round (a straggler of an earlier
        round, a client the caller added) or a second result of one client would put a user into
        rounds the min-separated schema never counted; refused before anything changes."""
        r, picked = getattr(self, "_round_picks", (None, set()))
        cids = [proxy.cid for proxy, _ in results]
        if len(set(cids)) != len(cids) or (cids and (r != self.rounds or not set(cids) <= picked)):
            raise PrivacyError(
                f"round {self.rounds}: results from clients {sorted(cids)[:20]}, but this round "
                f"picked {sorted(picked)[:20] if r == self.rounds else 'none yet'}: DP-FTRL's "
                "accounting (min-separated participation) holds only for one result per client "
                "picked by configure_fit this round; nothing was changed")
        return super().aggregate_fit(server_round, parameters, results, failures)

    def release_sum(self, server_round: int, parameters: torch.Tensor, total: torch.Tensor,
                    norms: torch.Tensor, failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        """Noise ``total`` (the sum of the clipped updates) with sigma C w_r, divide by the
        number of clients per round, account round r, step the inner strategy."""
        if self.expected_clients is None:
            raise ValueError("release_sum before configure_fit/setup: the number of clients per "
                             "round (the denominator) is unknown")
        clip, sigma, r = self.clip_norm, self.noise_multiplier, self.rounds
        std = sigma * clip
        self.correlated.check_step(r, std, sigma=sigma)
        key, start = self.noise.reserve(self.correlated.blocks([total]))
        try:
            self.correlated.add_([total], std, seed=key, offset=start, secure=self.secure_mode)
            total.div_(self.expected_clients)
            event = self.correlated.event(r, sigma)
            if event is not None:
                self.accountant.compose(event)
        except BaseException:
            self.correlated.discard()
            raise
        self.correlated.commit(std, sigma)
        self.last_update_norms = norms
        self.rounds += 1
        single = [(ClientProxy(0), FitResult(update=total, num_examples=1, metrics={}))]
        new, inner_metrics = self.strategy.aggregate_fit(server_round, parameters, single, failures)
        return new, {**inner_metrics, "dp_clip_norm": clip,
                     "dp_noise_std": std / self.expected_clients}

    # -- privacy --------------------------------------------------------------------------------
    def epsilon(self, delta: float, *, rounds_ahead: int = 0) -> Optional[float]:
        """User-level epsilon at ``delta`` after the rounds so far plus ``rounds_ahead`` more
        (infinite past the plan); the state is not changed."""
        rounds_ahead = _count("rounds_ahead", rounds_ahead, 0)
        if rounds_ahead == 0:
            return self.accountant.get_epsilon(delta)
        if self.rounds + rounds_ahead > self.planned_rounds:
            return math.inf
        trial = copy.deepcopy(self.accountant)
        for r in range(self.rounds, self.rounds + rounds_ahead):
            event = self.correlated.event(r, self.noise_multiplier)
            if event is not None:
                trial.compose(event)
        return trial.get_epsilon(delta)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """DPFedAvgFixed's state (the noise key only when the user gave it) plus the plan's
        step and offsets (never the noise) and the clients' picks."""
        state = super().state_dict()
        if not self.noise.user_seeded:
            state["seed"] = None  # an OS key never leaves the process
        state["correlated_noise"] = self.correlated.state_dict()
        state["picks"] = {int(c): [int(self._last[c]), int(n)] for c, n in self._picks.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (validated first; nothing changes on an error). The
        correlated noise continues as a new segment at the loaded round, under a fresh key."""
        try:
            saved, picks = state["correlated_noise"], state["picks"]
            rounds = state["rounds"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"state must be a DPFTRLFedAvg.state_dict(); {e!r}") from e
        if not isinstance(picks, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x >= 0 for x in v)
                for v in picks.values()):
            raise ValueError(f"state['picks'] must map cid -> [last round, picks]; got {picks!r:.120}")
        if not isinstance(saved, dict) or saved.get("step") != rounds:
            raise ValueError("state['correlated_noise'] does not match state['rounds']; nothing was loaded")
        correlated = self.correlated.resumed(saved, like=[], seed=None, exact=False)
        expected = self.expected_clients
        super().load_state_dict(state)
        self.noise = NoiseStream(None, secure=self.secure_mode)  # never the saved key's offsets again
        self.expected_clients = self.expected_clients or expected
        self.correlated = correlated
        self._last = {int(c): v[0] for c, v in picks.items()}
        self._picks = {int(c): v[1] for c, v in picks.items()}

    def __repr__(self) -> str:
        return (f"DPFTRLFedAvg({type(self.strategy).__name__}, {self.mechanism}, rounds="
                f"{self.planned_rounds}, noise_multiplier={self.noise_multiplier}, "
                f"clip_norm={self.clip_norm:.4g})")

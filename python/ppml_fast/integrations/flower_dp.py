"""User-level DP-FedAvg as a Flower Message-API strategy: Poisson node sampling, per-node clipping
and Gaussian noise on the native ``weighted_aggregate`` op, ppml_fast's accountant reporting ε
in each round's MetricRecord, and a budget stop.

The maths is the simulator's :class:`ppml_fast.federated.dp.DPFedAvgFixed` (McMahan, Ramage,
Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language Models", ICLR,
Algorithm 1 with the fixed-denominator estimator f_f); each round (the server is trusted with
the individual updates, as in Flower's ``DifferentialPrivacyServerSideFixedClipping``):

1. ``configure_train`` samples each of the N connected nodes independently with probability q
   (Poisson sampling from the OS CSPRNG, :func:`ppml_fast.secure_random.bernoulli_mask`; a
   round may sample nobody);
2. ``aggregate_train`` takes each reply's update (its arrays minus the round's global arrays),
   clips it to L2 norm <= C over all arrays together, averages the K updates, adds Gaussian
   noise of std σC/K to that mean (one op call), and scales it by K/(qN): the result is
   (sum of clipped updates + N(0, σ²C² I)) / (qN), so one node changes it by at most C/(qN)
   and the noise std is σC/(qN). A node whose reply failed contributes a zero update (the
   denominator stays qN). A round with no reply (nobody sampled, or every reply failed) still
   releases N(0, (σC/(qN))² I) — skipping it would reveal that nobody took part;
3. before the release, the accountant composes PoissonSampledEvent(q, GaussianEvent(σ))
   (user-level adjacency: adding or removing one node's whole data); ε at ``delta`` goes into
   the round's MetricRecord ("dp-epsilon").

Every node counts the same (example counts are not weights: they would make the sensitivity
depend on what nodes report). N, the number of nodes connected when the round is configured,
is treated as public, as the simulator and McMahan et al. (W fixed) do. Client metrics are not
noised, so they are left out of the round's MetricRecord unless ``client_metrics=True`` (then
they are released outside the ε reported). Noise: Philox keyed from OS entropy, or from
``seed`` (then reproducible, and no privacy against whoever knows the seed); each release
reserves its offset range first (:class:`ppml_fast.noise_keys.NoiseStream`). There is no secure
mode here (ChaCha20 noise hardened against floating-point attacks, as the simulator's
``DPFedAvgFixed(secure_mode=True)`` has): the Philox noise does not defend against floating-point
attacks on the released model. The accountant is
held in memory (no journal): a crashed ServerApp loses its history, so a restarted run must
start from a fresh budget only with fresh data. The noise stream is in memory too: a restarted
ServerApp with the same ``seed`` starts again at offset 0 and draws the crashed run's noise for
its rounds (anyone who saw a round of both runs could subtract it), so give a restarted run a new
seed, or none (the default: a fresh OS key, nothing to replay).

Budget stop (``max_epsilon``): ``start`` runs only the rounds whose release keeps ε <= max_epsilon
at ``delta`` and logs where and why it stopped; ``configure_train`` raises Flower's
``PrivacyBudgetExhausted`` if driven past that point by hand.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Callable, Optional

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent
from ppml_fast.accounting.calibration import ACCOUNTANTS
from ppml_fast.integrations._ndarrays import _work_dtype, pack, unpack
from ppml_fast.integrations.flower_message import FedAvg, check_shapes, reply_arrays, to_arrayrecord
from ppml_fast.noise_keys import REPRODUCIBLE_NOISE, NoiseStream
from ppml_fast.ops import noise_blocks, weighted_aggregate
from ppml_fast.secure_random import bernoulli_mask

__all__ = ["DPFedAvg"]


def _positive(name: str, value: object, *, upper: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
    return float(value)


class DPFedAvg(FedAvg):
    """User-level DP-FedAvg with a fixed clipping norm (module docstring).

    Args:
        noise_multiplier: σ, the noise std as a multiple of ``clip_norm`` (> 0).
        clip_norm: C, the L2 bound on each node's update over all its arrays (> 0).
        sampling_rate: q in (0, 1], the probability that a node takes part in a round.
        delta: δ at which ε is reported and the budget is checked.
        max_epsilon: when set, no round starts whose release would take ε past it.
        accountant: "pld" (default; privacy loss distributions, tight) or "rdp" (an upper bound).
        seed: a noise seed in [0, 2**64) for reproducible noise (no privacy against whoever
            knows it); None (default): the noise key comes from OS entropy.
        client_metrics: put Flower's aggregate of the replies' (un-noised) MetricRecords into the
            round's metrics too (not covered by the ε reported). Default False.
        min_available_nodes, fraction_evaluate, min_evaluate_nodes, weighted_by_key,
            arrayrecord_key, configrecord_key, evaluate_metrics_aggr_fn: as in Flower's FedAvg
            (evaluation is Flower's; ``weighted_by_key`` only weights evaluation metrics).
    """

    def __init__(self, *, noise_multiplier: float, clip_norm: float, sampling_rate: float,
                 delta: float, max_epsilon: Optional[float] = None, accountant: str = "pld",
                 seed: Optional[int] = None, client_metrics: bool = False,
                 min_available_nodes: int = 2, fraction_evaluate: float = 1.0,
                 min_evaluate_nodes: int = 2, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config",
                 train_metrics_aggr_fn: Optional[Callable] = None,
                 evaluate_metrics_aggr_fn: Optional[Callable] = None) -> None:
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier)
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.sampling_rate = _positive("sampling_rate", sampling_rate, upper=1.0)
        self.delta = _positive("delta", delta, upper=1.0)
        if self.delta == 1.0:
            raise ValueError(f"delta must be in (0, 1); got {delta!r}")
        self.max_epsilon = None if max_epsilon is None else _positive("max_epsilon", max_epsilon)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}; got {accountant!r}")
        if not isinstance(client_metrics, bool):
            raise TypeError(f"client_metrics must be a bool; got {type(client_metrics).__name__}")
        if isinstance(min_available_nodes, bool) or not isinstance(min_available_nodes, numbers.Integral) \
                or min_available_nodes < 1:
            raise ValueError(f"min_available_nodes must be an int >= 1; got {min_available_nodes!r}")
        self.noise = NoiseStream(seed, name="seed")  # validates the seed
        super().__init__(fraction_train=self.sampling_rate, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=0, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=int(min_available_nodes),
                         weighted_by_key=weighted_by_key, arrayrecord_key=arrayrecord_key,
                         configrecord_key=configrecord_key,
                         train_metrics_aggr_fn=train_metrics_aggr_fn,
                         evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn)
        self.min_train_nodes = 0
        self.accountant_name = accountant
        self.accountant = ACCOUNTANTS[accountant]()
        self.client_metrics = client_metrics
        self.rounds = 0
        self._round: Optional[tuple[int, list[str], list[np.ndarray], int]] = None

    # -- privacy --------------------------------------------------------------------------------
    def _event(self) -> PoissonSampledEvent:
        return PoissonSampledEvent(self.sampling_rate, GaussianEvent(self.noise_multiplier))

    def epsilon(self, *, rounds_ahead: int = 0) -> float:
        """User-level ε at ``delta`` after the released rounds plus ``rounds_ahead`` more."""
        if isinstance(rounds_ahead, bool) or not isinstance(rounds_ahead, numbers.Integral) or rounds_ahead < 0:
            raise ValueError(f"rounds_ahead must be an int >= 0; got {rounds_ahead!r}")
        if rounds_ahead == 0:
            return self.accountant.get_epsilon(self.delta)
        trial = copy.deepcopy(self.accountant)
        return trial.compose(self._event(), int(rounds_ahead)).get_epsilon(self.delta)

    def affordable_rounds(self, num_rounds: int) -> int:
        """How many of the next ``num_rounds`` rounds fit under ``max_epsilon`` (all of them
        without a budget): the largest r with ε(released + r) <= max_epsilon (ε grows with r)."""
        if self.max_epsilon is None or num_rounds == 0 or self.epsilon(rounds_ahead=num_rounds) <= self.max_epsilon:
            return num_rounds
        lo, hi = 0, num_rounds  # ε(lo) <= max (or lo = 0), ε(hi) > max
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(rounds_ahead=mid) <= self.max_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    @property
    def reproducible_noise(self) -> Optional[str]:
        """``noise_keys.REPRODUCIBLE_NOISE`` when a user seed keys the noise, else None."""
        return REPRODUCIBLE_NOISE if self.noise.reproducible else None

    # -- rounds ---------------------------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> DP (ppml_fast, user-level DP-FedAvg, McMahan et al. 2018):")
        log(INFO, "\t│\t├── Poisson sampling q=%s, noise multiplier σ=%s, clip norm C=%s",
            self.sampling_rate, self.noise_multiplier, self.clip_norm)
        log(INFO, "\t│\t├── accountant %s, δ=%g, max ε=%s", self.accountant_name, self.delta,
            self.max_epsilon)
        if self.reproducible_noise:
            log(WARNING, "\t│\t├── %s", self.reproducible_noise)
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: Optional[ConfigRecord] = None,
              evaluate_config: Optional[ConfigRecord] = None,
              evaluate_fn: Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]] = None) -> Result:
        """Flower's ``Strategy.start``, run for the rounds the budget allows (module docstring)."""
        if isinstance(num_rounds, bool) or not isinstance(num_rounds, numbers.Integral) or num_rounds < 0:
            raise ValueError(f"num_rounds must be an int >= 0; got {num_rounds!r}")
        rounds = self.affordable_rounds(int(num_rounds))
        if rounds < num_rounds:
            log(WARNING, "DPFedAvg budget stop: running %d of %d rounds; round %d would take ε to "
                "%.4f > max_epsilon=%s at δ=%g (ε now %.4f)", rounds, num_rounds, rounds + 1,
                self.epsilon(rounds_ahead=rounds + 1), self.max_epsilon, self.delta, self.epsilon())
        if rounds == 0:
            result = Result()
            result.arrays = initial_arrays
            return result
        return super().start(grid, initial_arrays, num_rounds=rounds, timeout=timeout,
                             train_config=train_config, evaluate_config=evaluate_config,
                             evaluate_fn=evaluate_fn)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Poisson sampling: each connected node with probability q (waits for
        ``min_available_nodes`` first); keeps the round's global arrays for the updates."""
        if self.max_epsilon is not None and self.epsilon(rounds_ahead=1) > self.max_epsilon:
            raise PrivacyBudgetExhausted(
                f"round {server_round} would take epsilon to {self.epsilon(rounds_ahead=1):.4f} > "
                f"max_epsilon={self.max_epsilon} at delta={self.delta:g}")
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                len(nodes), self.min_available_nodes)
            time.sleep(1)
        picked = bernoulli_mask(len(nodes), self.sampling_rate).numpy()
        sampled = [n for n, keep in zip(nodes, picked) if keep]
        log(INFO, "configure_train: Poisson-sampled %d nodes (out of %d, q=%g)", len(sampled),
            len(nodes), self.sampling_rate)
        keys = list(arrays.keys())
        self._round = (server_round, keys, [arrays[k].numpy() for k in keys], len(nodes))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, sampled, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Clip, average and noise natively, rescale to the fixed denominator qN, account, and
        release; an empty round releases noise only."""
        if self._round is None or self._round[0] != server_round:
            held = None if self._round is None else self._round[0]
            raise ValueError(f"aggregate_train for round {server_round} needs that round's global "
                             f"arrays, which configure_train keeps; it last ran for round {held}")
        _, keys, reference, n = self._round
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        clients = []
        for m in valid:
            arrays = reply_arrays(m.content, keys, m.metadata.src_node_id)[1]
            check_shapes(arrays, reference, keys, m.metadata.src_node_id, "the global model")
            clients.append(arrays)
        dtype = _work_dtype(reference)
        base = pack(reference, dtype)
        k, expected = len(clients), self.sampling_rate * n
        sigma_c = self.noise_multiplier * self.clip_norm
        if k:
            matrix = np.stack([pack(c, dtype) for c in clients]) - base
            std, scale = sigma_c / k, k / expected  # noise on the mean, then mean * K / (qN)
        else:  # nothing to average: N(0, (σC/(qN))^2) alone (McMahan et al. 2018, Alg. 1)
            matrix, std, scale = np.zeros((1, base.size), dtype), sigma_c / expected, 1.0
        # record before release (DESIGN.md invariant 4): account and reserve the noise first
        self.accountant.compose(self._event())
        self.rounds += 1
        key, offset = self.noise.reserve(noise_blocks(base.size))
        mean, norms = weighted_aggregate(matrix, np.ones(matrix.shape[0]), clip_norm=self.clip_norm,
                                         noise_std=std, seed=key, offset=offset)
        new = unpack(base + np.asarray(mean) * scale, reference)
        eps = self.epsilon()
        log(INFO, "aggregate_train: DP-FedAvg round %d: %d updates clipped to C=%g, noise std %.4g "
            "on the mean update; epsilon=%.4f at delta=%g", server_round, k, self.clip_norm,
            sigma_c / expected, eps, self.delta)
        metrics = MetricRecord({"dp-epsilon": eps, "dp-delta": self.delta,
                                "dp-noise-std": sigma_c / expected, "dp-clip-norm": self.clip_norm})
        if self.client_metrics and valid:
            for name, value in self.train_metrics_aggr_fn([m.content for m in valid],
                                                          self.weighted_by_key).items():
                metrics[name] = value
        return to_arrayrecord(keys, new), metrics

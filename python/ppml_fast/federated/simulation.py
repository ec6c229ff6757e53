"""``run_simulation``: the server's round loop over simulated clients.

Each round: the strategy picks clients and their extra config (``configure_fit``, with a
numpy generator seeded by ``(seed, round)``); each picked client drops out with probability
``dropout`` (seeded by ``(seed, round)`` and its position, so one client's draw does not depend
on who else was picked); the backend trains the others from the current parameters, each with
``{model_fn, local_epochs, batch_size, lr, seed, local_dp}`` merged under the strategy's extras,
``seed`` being drawn per round and per client from ``seed``; faults leave a client out with its
reason (it raised — ``PrivacyBudgetExceeded`` reads ``"budget"``, anything else
``"Type: message"`` —, took longer than ``client_timeout`` seconds (``"timeout"``: a fit
past the deadline is abandoned, :mod:`.deadline`; the vectorized backend attributes to each
client trained in a chunk its chunk's wall time divided by the chunk's clients), returned
NaN/Inf (``"nonfinite"``) or an update of the wrong size (``"shape"``)); the strategy
aggregates when at least ``max(min_clients, strategy.min_fit_clients)`` results remain, else the round is skipped (parameters unchanged);
a round is also skipped when the strategy declines it or its aggregate is not finite
(:mod:`.aggregate_check`); the clients a robust strategy left out are in the row's ``excluded``.
Then central evaluation on ``eval_dataset`` every ``eval_every`` rounds (and after the last),
federated evaluation when the strategy's ``configure_evaluate`` asks for it, and the stop
rules: accuracy >= ``target_accuracy`` after a round, or, before a round,
``strategy.epsilon(delta, rounds_ahead=1) > max_epsilon``.

A round's ``epsilon`` is ``strategy.epsilon(delta)`` when the strategy spends privacy, else,
under ``local_dp``, the largest ε any client has reported so far (each at ``local_dp.delta``):
a result's ``metrics["epsilon"]``, also of a result left out (late, non-finite, misshapen), and
for a client that raised, the ε its own accountant has spent, the steps of the failed fit
included (``Outcome.epsilon``; it also appears in that client's ``dropped`` entry). Each
client's own budget (``LocalDP.max_epsilon``) counts those steps as well: the client keeps them.

The same arguments and seed give the same :class:`~ppml_fast.federated.history.History`, wall
times aside (the initial model is built under ``torch.manual_seed(seed)`` in a forked RNG, so
the caller's global RNG is untouched).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ppml_fast.accounting.errors import PrivacyBudgetExceeded

from .backends import Backend, Outcome, make_backend
from .backends.base import make_model
from .threads import simulation_threads
from .client import Client, _materialize, evaluate_model
from .sim_args import check_cids as _cids, check_int as _int, check_real as _real
from .sim_args import check_local_dp as _check_local_dp
from .aggregate_check import check_aggregate
from .history import History, noise_notes
from .history_writer import attach_history, check_history_path, write_history
from .parameters import ParameterLayout
from .secagg.errors import SecAggAborted
from .strategy.base import Strategy
from .types import ClientProxy, EvalResult, is_finite_update

__all__ = ["Simulation", "run_simulation"]

_STREAM_FIT, _STREAM_DROPOUT, _STREAM_SEEDS, _STREAM_EVAL = 0, 1, 2, 3


# --------------------------------------------------------------------------- round helpers

def _all_finite(update: torch.Tensor) -> bool:
    """``is_finite_update``, fast: a finite sum means every entry is finite (NaN and Inf
    propagate); only a non-finite sum (which also overflow gives) is checked entry by entry."""
    return bool(torch.isfinite(update.sum())) or is_finite_update(update)


def _fault(outcome: Outcome, numel: int, client_timeout: Optional[float]) -> Optional[str]:
    """Why a client's outcome is left out of the round, or None to keep it."""
    if outcome.error is not None:
        if isinstance(outcome.error, PrivacyBudgetExceeded):
            return "budget"
        return f"{type(outcome.error).__name__}: {outcome.error}"
    if client_timeout is not None and outcome.seconds > client_timeout:
        return "timeout"
    if outcome.result.update.numel() != numel:
        return "shape"
    if not (_all_finite(outcome.result.update) if outcome.finite is None else outcome.finite):
        return "nonfinite"
    return None


def _client_epsilon(outcome: Outcome) -> Optional[float]:
    """The ε a client reports having spent (local DP): its result's ``metrics["epsilon"]`` and,
    for a client that raised, ``outcome.epsilon`` (its accountant's, the failed steps included);
    the larger when both are there; None when it reports none."""
    reported = [outcome.epsilon] if outcome.epsilon is not None else []
    if outcome.result is not None and "epsilon" in outcome.result.metrics:
        reported.append(outcome.result.metrics["epsilon"])
    return max(reported) if reported else None


def _weighted_loss(results: list) -> Optional[float]:
    pairs = [(r.metrics["loss"], r.num_examples) for _, r in results if "loss" in r.metrics]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def _federated_evaluate(strategy: Strategy, rnd: int, parameters: torch.Tensor, proxies: list,
                        clients: Sequence[Client], index_of: dict, model: nn.Module,
                        rng: np.random.Generator) -> Optional[dict]:
    instructions = strategy.configure_evaluate(rnd, parameters, proxies, len(proxies), rng)
    if not instructions:
        return None
    results, failures = [], []
    for proxy, extra in instructions:
        try:
            res = clients[index_of[proxy.cid]].evaluate(parameters, {**extra, "model": model})
            if not isinstance(res, EvalResult):
                raise TypeError(f"Client.evaluate must return an EvalResult; got {type(res).__name__}")
            results.append((proxy, res))
        except Exception as e:  # a failing client is reported, the round goes on
            failures.append((proxy, f"{type(e).__name__}: {e}"))
    loss, metrics = strategy.aggregate_evaluate(rnd, results, failures)
    return {"loss": loss, "metrics": dict(metrics),
            "failures": [{"cid": p.cid, "reason": r} for p, r in failures]}


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, desc="federated rounds", unit="round")


# --------------------------------------------------------------------------- the loop

class Simulation:
    """The round loop of :func:`run_simulation`, one round per :meth:`step` (what a benchmark
    times). Arguments as :func:`run_simulation`'s; the backend is set up on construction and
    freed by :meth:`close` (or ``with Simulation(...) as sim:``)."""

    def __init__(self, model_fn: Callable[[], nn.Module], clients: Sequence[Client], strategy: Strategy, *,
                 rounds: int, clients_per_round: int, backend: Union[str, Backend] = "sequential",
                 local_epochs: int = 1, batch_size: int = 32, lr: float = 0.01, dropout: float = 0.0,
                 seed: int = 0, target_accuracy: Optional[float] = None, max_epsilon: Optional[float] = None,
                 delta: Optional[float] = None, eval_dataset: Optional[Dataset] = None, eval_every: int = 1,
                 progress: bool = True, min_clients: Optional[int] = None,
                 client_timeout: Optional[float] = None, local_dp: Any = None,
                 history_path: Optional[str] = None) -> None:
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a callable returning an nn.Module; got {type(model_fn).__name__}")
        cids = _cids(clients)
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a ppml_fast.federated.Strategy; got {type(strategy).__name__}")
        self.rounds = _int("rounds", rounds, 1)
        self.clients_per_round = _int("clients_per_round", clients_per_round, 1)
        if self.clients_per_round > len(clients):
            raise ValueError(f"clients_per_round must be <= len(clients) = {len(clients)}; "
                             f"got {clients_per_round}")
        local_epochs = _int("local_epochs", local_epochs, 1)
        batch_size = _int("batch_size", batch_size, 1)
        lr = _real("lr", lr, 0.0, math.inf, lo_open=True, hi_open=True)
        self.dropout = _real("dropout", dropout, 0.0, 1.0, lo_open=False, hi_open=False)
        self.seed = _int("seed", seed, 0)
        self.eval_every = _int("eval_every", eval_every, 1)
        min_clients = None if min_clients is None else _int("min_clients", min_clients, 0)
        if target_accuracy is not None:
            target_accuracy = _real("target_accuracy", target_accuracy, 0.0, 1.0, lo_open=True, hi_open=False)
            if eval_dataset is None:
                raise ValueError("target_accuracy needs eval_dataset (the accuracy is measured on it); got None")
        self.target_accuracy = target_accuracy
        if max_epsilon is not None:
            max_epsilon = _real("max_epsilon", max_epsilon, 0.0, math.inf, lo_open=True, hi_open=True)
        self.max_epsilon = max_epsilon
        if delta is None:
            delta = min(1e-5, 1.0 / (10 * len(clients)))
        self.delta = _real("delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)
        if client_timeout is not None:
            client_timeout = _real("client_timeout", client_timeout, 0.0, math.inf, lo_open=True, hi_open=True)
        self.client_timeout = client_timeout
        if eval_dataset is not None and not isinstance(eval_dataset, Dataset):
            raise TypeError(f"eval_dataset must be a torch Dataset or None; got {type(eval_dataset).__name__}")
        _check_local_dp(local_dp)
        self.history_path = check_history_path(history_path)
        strategy.setup(num_available_clients=len(clients), clients_per_round=self.clients_per_round)
        if min_clients and strategy.epsilon(self.delta) is not None:
            raise ValueError(
                f"min_clients={min_clients} with a strategy that spends privacy: a round skipped "
                "for too few results would release nothing and reveal that few of the sampled "
                "clients took part, outside the accountant; leave min_clients None (the strategy's "
                "own minimum, 0 for the DP wrappers)")
        if max_epsilon is not None and strategy.epsilon(self.delta, rounds_ahead=1) is None:
            raise ValueError("max_epsilon needs a strategy that spends privacy (strategy.epsilon returned "
                             "None); for local DP set LocalDP(max_epsilon=...)")
        self.backend = make_backend(backend)
        self.backend.deadline = client_timeout
        if local_dp is not None and self.backend.name == "vectorized":
            raise ValueError("local_dp: local DP-SGD needs backend='sequential' or 'ray'; "
                             "the vectorized backend trains without per-sample clipping")

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = make_model(model_fn)
        self.layout = ParameterLayout.of(self.model)
        self.numel = self.layout.numel
        self.parameters = strategy.initialize_parameters(self.layout.flatten(self.model))
        self.layout.check(self.parameters, "strategy.initialize_parameters(...)")
        self.eval_xy = None if eval_dataset is None else _materialize(eval_dataset)
        self.strategy, self.clients = strategy, clients
        self.proxies = [ClientProxy(c) for c in cids]
        self.index_of = {c: i for i, c in enumerate(cids)}
        self.min_clients = min_clients
        self.required = max(min_clients or 0, int(strategy.min_fit_clients))
        self.base_config: dict[str, Any] = {"model_fn": model_fn, "local_epochs": local_epochs,
                                            "batch_size": batch_size, "lr": lr}
        if local_dp is not None:
            self.base_config["local_dp"] = local_dp
        self.history = History(model_fn=model_fn, parameters=self.parameters, settings={
            "backend": self.backend.name or type(self.backend).__name__, "strategy": type(strategy).__name__,
            "num_clients": len(clients), "rounds": self.rounds, "clients_per_round": self.clients_per_round,
            "local_epochs": local_epochs, "batch_size": batch_size, "lr": lr, "dropout": self.dropout,
            "seed": self.seed, "target_accuracy": target_accuracy, "max_epsilon": max_epsilon,
            "delta": self.delta, "eval_every": self.eval_every, "min_clients": min_clients,
            "client_timeout": client_timeout, "local_dp": None if local_dp is None else repr(local_dp)})
        self.history.notes = noise_notes(strategy, local_dp)
        self.history.stopped, self.history.stop_message = "rounds", f"all {self.rounds} rounds ran"
        self.round = 0
        self.done = False
        self._local_epsilon: Optional[float] = None
        summed_for = getattr(self.backend, "partial_sums_for", None)
        if summed_for is not None and summed_for is not strategy:
            # a backend summing (or clipping) for another strategy than the one that aggregates
            # would hand a DP wrapper sums it never clipped per client
            raise ValueError("backend.partial_sums_for must be the strategy object passed to "
                             f"run_simulation; got {type(summed_for).__name__} for a run of "
                             f"{type(strategy).__name__}")
        self.backend.setup(clients, model_fn)
        self._bar = _progress(self.rounds, progress)

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Free the backend's workers and the progress bar (idempotent)."""
        self.done = True
        if self.backend is not None:
            self.backend.close()
            self.backend = None  # type: ignore[assignment]
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _stop(self, reason: str, message: str) -> None:
        self.history.stopped, self.history.stop_message = reason, message
        self.done = True

    def step(self) -> Optional[dict[str, Any]]:
        """Run the next round and return its History row; None (and no round) once stopped."""
        if self.done or self.round >= self.rounds:
            self.done = True
            return None
        rnd, strategy = self.round + 1, self.strategy
        if self.max_epsilon is not None:
            ahead = strategy.epsilon(self.delta, rounds_ahead=1)
            if ahead is not None and ahead > self.max_epsilon:
                self._stop("max_epsilon", f"before round {rnd}: epsilon would reach {ahead:.4g} > "
                                          f"max_epsilon = {self.max_epsilon:g} at delta = {self.delta:g}")
                return None
        self.round = rnd
        start = time.perf_counter()
        parameters, seed, n = self.parameters, self.seed, len(self.clients)
        rng = np.random.default_rng([seed, rnd, _STREAM_FIT])
        instructions = strategy.configure_fit(rnd, parameters, self.proxies, self.clients_per_round, rng)
        draws = np.random.default_rng([seed, rnd, _STREAM_DROPOUT]).random(n)
        seeds = np.random.default_rng([seed, rnd, _STREAM_SEEDS]).integers(0, 2**63 - 1, n).tolist()
        dropped, todo = [], []
        for proxy, extra in instructions:
            i = self.index_of.get(proxy.cid)
            if i is None:
                raise ValueError(f"strategy.configure_fit returned an unknown client (cid {proxy.cid})")
            if self.dropout > 0 and draws[i] < self.dropout:
                dropped.append({"cid": proxy.cid, "reason": "dropout"})
            else:
                todo.append((proxy, i, {**self.base_config, "seed": seeds[i], **extra}))
        outcomes = self.backend.fit([i for _, i, _ in todo], parameters, [c for _, _, c in todo]) if todo else []
        results, failures = [], []
        for (proxy, _, _), outcome in zip(todo, outcomes):
            reason = _fault(outcome, self.numel, self.client_timeout)
            # a client's spent epsilon counts even when its result is left out (late, non-finite,
            # misshapen: it trained all the same; raised part-way: its accountant has the steps)
            spent = _client_epsilon(outcome)
            if spent is not None:
                self._local_epsilon = max(spent, self._local_epsilon or 0.0)
            if reason is None:
                results.append((proxy, outcome.result))
            else:
                entry = {"cid": proxy.cid, "reason": reason}
                if spent is not None:
                    entry["epsilon"] = spent
                dropped.append(entry)
                failures.append((proxy, reason))
        excluded: list = []
        if len(results) >= self.required:
            try:
                new, metrics = strategy.aggregate_fit(rnd, parameters, results, failures)
            except SecAggAborted as aborted:  # secure aggregation gave the round up: skip it
                new, metrics, skip_reason = None, dict(aborted.metrics), str(aborted)
            else:
                self.layout.check(new, "strategy.aggregate_fit(...)[0]")
                skip_reason, excluded = check_aggregate(strategy, new)  # its report; inf/NaN fail
            skipped = skip_reason is not None
            if not skipped:
                self.parameters = new
        else:
            metrics, skipped = {}, True
            skip_reason = (f"{len(results)} result(s) remained, fewer than the {self.required} required "
                           f"(min_clients={self.min_clients}, "
                           f"strategy.min_fit_clients={strategy.min_fit_clients})")
        spent = strategy.epsilon(self.delta)
        row: dict[str, Any] = {
            "round": rnd, "loss": None, "accuracy": None,
            "epsilon": spent if spent is not None else self._local_epsilon,
            "clients": [p.cid for p, _ in results], "dropped": sorted(dropped, key=lambda d: d["cid"]),
            "skipped": skipped, "skip_reason": skip_reason, "excluded": excluded,
            "train_loss": _weighted_loss(results),
            "metrics": dict(metrics), "federated": None}
        self._evaluate(rnd, row)
        row["seconds"] = time.perf_counter() - start
        self.history.rounds.append(row)
        self.history.parameters = self.parameters
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(acc=row["accuracy"], eps=row["epsilon"], clients=len(results))
        acc = row["accuracy"]
        if self.target_accuracy is not None and acc is not None and acc >= self.target_accuracy:
            self._stop("target_accuracy", f"round {rnd}: accuracy {acc:.4f} >= "
                                          f"target_accuracy = {self.target_accuracy:g}")
        if self.history_path is not None:
            write_history(self.history, self.history_path)
        return row

    def _evaluate(self, rnd: int, row: dict[str, Any]) -> None:
        if self.eval_xy is not None:
            if rnd % self.eval_every == 0 or rnd == self.rounds:
                self.layout.load(self.model, self.parameters)
                ev = evaluate_model(self.model, *self.eval_xy)
                row["loss"], row["accuracy"] = ev.loss, ev.metrics.get("accuracy")
        else:
            central = self.strategy.evaluate(rnd, self.parameters)
            if central is not None:
                row["loss"], row["accuracy"] = central[0], central[1].get("accuracy")
        row["federated"] = _federated_evaluate(
            self.strategy, rnd, self.parameters, self.proxies, self.clients, self.index_of, self.model,
            np.random.default_rng([self.seed, rnd, _STREAM_EVAL]))


def run_simulation(model_fn: Callable[[], nn.Module], clients: Sequence[Client], strategy: Strategy, *,
                   rounds: int, clients_per_round: int, backend: Union[str, Backend] = "sequential",
                   local_epochs: int = 1, batch_size: int = 32, lr: float = 0.01, dropout: float = 0.0,
                   seed: int = 0, target_accuracy: Optional[float] = None, max_epsilon: Optional[float] = None,
                   delta: Optional[float] = None, eval_dataset: Optional[Dataset] = None, eval_every: int = 1,
                   progress: bool = True, min_clients: Optional[int] = None,
                   client_timeout: Optional[float] = None, local_dp: Any = None,
                   threads: Optional[int] = None, history_path: Optional[str] = None) -> History:
    """Simulate federated training (see the module docstring for one round, step by step).

    Args:
        model_fn: builds the model (same architecture every call); its initial weights, drawn
            under ``torch.manual_seed(seed)``, are the round-0 parameters.
        clients: the simulated devices; a client's cid is its ``cid`` or else its position.
        strategy: picks clients, aggregates their updates, may spend privacy.
        rounds: at most this many rounds.
        clients_per_round: the ``num_clients`` passed to ``strategy.configure_fit``.
        backend: ``"sequential"`` (reference), ``"vectorized"``, ``"ray"`` or a Backend instance.
        local_epochs, batch_size, lr: local SGD of every client (a strategy may override per client).
        dropout: probability that a picked client does not answer this round.
        seed: fixes the initial model, sampling, dropout and every client's batch order.
        target_accuracy: stop once the central accuracy reaches it (needs ``eval_dataset``).
        max_epsilon: stop before a round that would take ``strategy.epsilon`` above it.
        delta: the delta of every epsilon (default ``min(1e-5, 1 / (10 * len(clients)))``).
        eval_dataset: central test data (loss and accuracy every ``eval_every`` rounds and after
            the last); without it, ``strategy.evaluate`` (server-side) fills loss and accuracy.
        progress: show a tqdm bar (when tqdm is installed).
        min_clients: a round with fewer surviving results than ``max(min_clients,
            strategy.min_fit_clients)`` is skipped (default None: the strategy's
            ``min_fit_clients`` alone — a DP wrapper sets 0 because it must release noise,
            and account for it, even in a round where nobody answered).
        client_timeout: straggler deadline in seconds of wall time per client, or None: a
            client's own ``fit`` past it is abandoned (:mod:`.deadline`), a vectorized chunk's
            clients are dropped after it when their share of its time exceeds it.
        local_dp: a :class:`ppml_fast.federated.dp.LocalDP`: clients train with DP-SGD.
        threads: torch threads during the run (restored after it); None: one thread for a
            model under 131,072 parameters, else torch's setting (:mod:`.threads`).
        history_path: write the History there as JSON after every round and when the run ends,
            atomically (:mod:`.history_writer`); None: not written.

    Returns:
        The :class:`~ppml_fast.federated.history.History`.

    Raises:
        BaseException: whatever stops the run (a strategy's error, ``SecAggError``,
            ``KeyboardInterrupt``), with ``.history`` set to the History of the rounds completed
            before it (``stopped = "error"``), also written to ``history_path``.
    """
    with Simulation(model_fn, clients, strategy, rounds=rounds, clients_per_round=clients_per_round,
                    backend=backend, local_epochs=local_epochs, batch_size=batch_size, lr=lr,
                    dropout=dropout, seed=seed, target_accuracy=target_accuracy, max_epsilon=max_epsilon,
                    delta=delta, eval_dataset=eval_dataset, eval_every=eval_every, progress=progress,
                    min_clients=min_clients, client_timeout=client_timeout, local_dp=local_dp,
                    history_path=history_path) as sim:
        try:
            with simulation_threads(sim.model, threads):
                while sim.step() is not None:
                    pass
        except BaseException as e:  # the completed rounds travel with the error (and to disk)
            attach_history(e, sim.history, sim.round, sim.history_path)
            raise
        if sim.history_path is not None:
            write_history(sim.history, sim.history_path)
    return sim.history

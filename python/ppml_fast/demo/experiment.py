"""The demo's experiment: digits split over simulated clients (Dirichlet label skew), an MLP
trained federatedly with the chosen privacy mode, the same run without privacy for comparison,
and a sweep of noise levels for the privacy-utility plot (each point and the baseline over
``seeds`` seeds, for error bars). Every run starts from fresh clients: a local-DP client's
spend never carries over from one run to the next."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from .config import DemoConfig

__all__ = ["DemoResult", "RunSummary", "mlp", "run_experiment"]


def mlp() -> nn.Module:
    """The demo's model: an MLP 64-64-10 on 8x8 digits (a module-level function so that Ray
    workers can import it)."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@dataclass
class RunSummary:
    """One federated run: its noise multiplier, per-round rows and final numbers."""

    label: str
    noise_multiplier: Optional[float]
    rounds: list[dict[str, Any]]
    final_accuracy: float
    final_epsilon: Optional[float]
    stopped: Optional[str]
    seconds: float
    #: what the run says about itself (History.notes), e.g. noise_keys.REPRODUCIBLE_NOISE: the
    #: demo keys DP-FedAvg's noise with its --seed so that a run can be repeated
    notes: list[str] = field(default_factory=list)
    #: final test accuracy of this run and of its repeats with the next seeds (``--seeds``)
    seed_accuracies: list[float] = field(default_factory=list)
    #: local-dp: the clients' own sigmas (calibrated per client) and planned epsilons
    client_sigmas: list[float] = field(default_factory=list)


@dataclass
class DemoResult:
    config: DemoConfig
    delta: float
    main: RunSummary
    baseline: RunSummary  # the same run without privacy
    sweep: list[RunSummary] = field(default_factory=list)
    #: local-dp: how the clients set their noise (one console line)
    local_dp_plan: Optional[str] = None


def _strategy(cfg: DemoConfig):
    from ppml_fast import federated

    names = {
        "fedavg": "FedAvg", "fedavgm": "FedAvgM", "fedprox": "FedProx", "fedadam": "FedAdam",
        "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad", "fedmedian": "FedMedian",
        "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum",
    }
    cls = getattr(federated, names[cfg.strategy])  # the name is checked by DemoConfig
    return cls(proximal_mu=cfg.proximal_mu) if cfg.strategy == "fedprox" else cls()


_DATA: dict = {}


def _data(cfg: DemoConfig):
    """(client partitions, test set) of ``cfg``'s split, cached: runs build fresh clients on them."""
    from ppml_fast.datasets import digits
    from ppml_fast.federated import dirichlet_partition

    key = (cfg.seed, cfg.clients, cfg.alpha)
    if key not in _DATA:
        train, test = digits(seed=cfg.seed)
        _DATA.clear()
        _DATA[key] = (dirichlet_partition(train, cfg.clients, alpha=cfg.alpha, seed=cfg.seed), test)
    return _DATA[key]


def calibrated_sigma(cfg: DemoConfig) -> float:
    """sigma for DP-FedAvg: as given, or the smallest that keeps ``rounds`` Poisson-sampled
    rounds (q = clients_per_round / clients) within target_epsilon at the demo's delta."""
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    from ppml_fast.accounting import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                                sample_rate=cfg.per_round / cfg.clients, steps=cfg.rounds,
                                accountant=cfg.accountant)


def _one_run(cfg: DemoConfig, private: bool, factor: float, label: str, progress: bool,
             cache: dict) -> RunSummary:
    """One federated run on fresh clients: no privacy, or ``cfg.mode`` at ``factor`` times the
    main run's noise."""
    from ppml_fast.federated import Client, run_simulation

    parts, test = _data(cfg)
    strategy = _strategy(cfg)
    local_dp, sigma, sigmas = None, None, []
    if private and cfg.mode == "dp-fedavg":
        from ppml_fast.federated import DPFedAvgFixed

        sigma = calibrated_sigma(cfg) * factor
        strategy = DPFedAvgFixed(strategy, noise_multiplier=sigma, clip_norm=cfg.clip_norm,
                                 accountant=cfg.accountant, seed=cfg.seed)
    if private and cfg.mode == "local-dp":
        from ppml_fast.federated.dp import LocalDP

        from .local_plan import budgeted_clients, plan_clients

        plans = plan_clients(cfg, [len(p) for p in parts], factor=factor, cache=cache)
        clients = budgeted_clients(cfg, parts, plans)
        sigmas = [p.noise_multiplier for p in plans]
        sigma = sorted(sigmas)[len(sigmas) // 2]  # the median client's, for the plot's order
        # the server's switch for DP-SGD in the clients; each client trains under its own
        local_dp = LocalDP(noise_multiplier=sigma, max_grad_norm=cfg.clip_norm,
                           delta=cfg.target_delta, max_epsilon=cfg.target_epsilon,
                           accountant=cfg.accountant)
    else:
        clients = [Client(p, cid=i) for i, p in enumerate(parts)]
    start = time.perf_counter()
    history = run_simulation(
        mlp, clients, strategy, rounds=cfg.rounds, clients_per_round=cfg.per_round,
        backend=cfg.backend if local_dp is None else "sequential",
        local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
        eval_dataset=test, delta=cfg.target_delta, local_dp=local_dp, progress=progress)
    seconds = time.perf_counter() - start
    rows = [dict(r) for r in history.rounds]
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    accuracy = float(evaluated[-1]["accuracy"]) if evaluated else float("nan")
    return RunSummary(
        label=label, noise_multiplier=sigma, rounds=rows, final_accuracy=accuracy,
        final_epsilon=rows[-1].get("epsilon") if rows else None,
        stopped=getattr(history, "stopped", None), seconds=seconds,
        notes=list(getattr(history, "notes", [])), seed_accuracies=[accuracy],
        client_sigmas=sigmas)


def _label(cfg: DemoConfig, factor: float) -> str:
    if cfg.mode == "local-dp" and cfg.noise_multiplier is None:  # each client its own sigma
        return f"sigma x{factor:g} (per client)"
    return f"sigma={calibrated_sigma(cfg) * factor:.3g}"


def _repeat(cfg: DemoConfig, run: RunSummary, private: bool, factor: float, cache: dict) -> RunSummary:
    """``run`` with the final accuracies of seeds seed + 1 .. seed + seeds - 1 appended."""
    for k in range(1, cfg.seeds):
        other = cfg.replace(seed=cfg.seed + k)
        r = _one_run(other, private, factor, run.label, False, cache)  # plans depend on sizes only
        run.seed_accuracies.append(r.final_accuracy)
    return run


def run_experiment(cfg: DemoConfig, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> DemoResult:
    """The main run, the non-private baseline and the noise sweep (sweep skipped for mode none),
    each repeated over ``cfg.seeds`` seeds (their final accuracies in ``seed_accuracies``)."""
    cache: dict = {}
    plan_line = None
    if cfg.mode == "local-dp":
        from .local_plan import describe, plan_clients

        parts, _ = _data(cfg)
        plan_line = describe(plan_clients(cfg, [len(p) for p in parts], cache=cache), cfg)
        log(plan_line)
    private = cfg.mode != "none"
    main_label = "no privacy" if not private else f"{cfg.mode}, {_label(cfg, 1.0)}"
    log(f"main run: {main_label}")
    main = _repeat(cfg, _one_run(cfg, private, 1.0, main_label, progress, cache), private, 1.0, cache)
    if not private:
        return DemoResult(config=cfg, delta=cfg.target_delta, main=main, baseline=main,
                          local_dp_plan=plan_line)
    log("baseline: the same run without privacy" + (f", {cfg.seeds} seeds" if cfg.seeds > 1 else ""))
    baseline = _repeat(cfg, _one_run(cfg, False, 1.0, "no privacy", progress, cache), False, 1.0, cache)
    sweep = []
    for factor in cfg.sweep:
        label = _label(cfg, factor)
        if factor == 1.0:  # the main run itself (and its seeds): same settings
            point = dataclasses.replace(main, label=label, seed_accuracies=list(main.seed_accuracies))
        else:
            log(f"sweep: {label}")
            point = _repeat(cfg, _one_run(cfg, True, factor, label, False, cache), True, factor, cache)
        sweep.append(point)
    return DemoResult(config=cfg, delta=cfg.target_delta, main=main, baseline=baseline, sweep=sweep,
                      local_dp_plan=plan_line)

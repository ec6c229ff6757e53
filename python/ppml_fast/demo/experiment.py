"""The demo's experiment: digits split over simulated clients (Dirichlet label skew), an MLP
trained federatedly with the chosen privacy mode, the same run without privacy for comparison,
and a sweep of noise levels for the privacy-utility plot."""

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


@dataclass
class DemoResult:
    config: DemoConfig
    delta: float
    main: RunSummary
    baseline: RunSummary  # the same run without privacy
    sweep: list[RunSummary] = field(default_factory=list)


def _strategy(name: str):
    from ppml_fast import federated

    names = {
        "fedavg": "FedAvg", "fedavgm": "FedAvgM", "fedprox": "FedProx", "fedadam": "FedAdam",
        "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad", "fedmedian": "FedMedian",
        "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum",
    }
    if name not in names or not hasattr(federated, names[name]):
        raise ValueError(f"strategy must be one of {sorted(n for n in names if hasattr(federated, names[n]))}; got {name!r}")
    return getattr(federated, names[name])()


def _clients(cfg: DemoConfig):
    from ppml_fast.datasets import digits
    from ppml_fast.federated import Client, dirichlet_partition

    train, test = digits(seed=cfg.seed)
    parts = dirichlet_partition(train, cfg.clients, alpha=cfg.alpha, seed=cfg.seed)
    return [Client(p, cid=i) for i, p in enumerate(parts)], test


def calibrated_sigma(cfg: DemoConfig) -> float:
    """sigma for DP-FedAvg: as given, or the smallest that keeps ``rounds`` Poisson-sampled
    rounds (q = clients_per_round / clients) within target_epsilon at the demo's delta."""
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    from ppml_fast.accounting import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
                                sample_rate=cfg.per_round / cfg.clients, steps=cfg.rounds,
                                accountant=cfg.accountant)


def _one_run(cfg: DemoConfig, clients, test, sigma: Optional[float], label: str,
             progress: bool) -> RunSummary:
    from ppml_fast.federated import run_simulation

    strategy = _strategy(cfg.strategy)
    local_dp = None
    if sigma is not None and cfg.mode == "dp-fedavg":
        from ppml_fast.federated import DPFedAvgFixed

        strategy = DPFedAvgFixed(strategy, noise_multiplier=sigma, clip_norm=cfg.clip_norm,
                                 accountant=cfg.accountant, seed=cfg.seed)
    elif sigma is not None and cfg.mode == "local-dp":
        from ppml_fast.federated import LocalDP

        local_dp = LocalDP(noise_multiplier=sigma, max_grad_norm=cfg.clip_norm, delta=cfg.target_delta,
                           max_epsilon=cfg.target_epsilon, accountant=cfg.accountant)
    start = time.perf_counter()
    history = run_simulation(
        mlp, clients, strategy, rounds=cfg.rounds, clients_per_round=cfg.per_round,
        backend=cfg.backend if local_dp is None else "sequential", local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, eval_dataset=test,
        delta=cfg.target_delta, local_dp=local_dp, progress=progress)
    seconds = time.perf_counter() - start
    rows = [dict(r) for r in history.rounds]
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    return RunSummary(
        label=label, noise_multiplier=sigma, rounds=rows,
        final_accuracy=float(evaluated[-1]["accuracy"]) if evaluated else float("nan"),
        final_epsilon=rows[-1].get("epsilon") if rows else None,
        stopped=getattr(history, "stopped", None), seconds=seconds,
        notes=list(getattr(history, "notes", [])))


def run_experiment(cfg: DemoConfig, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> DemoResult:
    """The main run, the non-private baseline and the noise sweep (sweep skipped for mode none)."""
    clients, test = _clients(cfg)
    if cfg.mode == "none":
        sigma = None
    elif cfg.mode == "dp-fedavg":
        sigma = calibrated_sigma(cfg)
    else:
        sigma = float(cfg.noise_multiplier) if cfg.noise_multiplier is not None else 1.0
    main_label = "no privacy" if sigma is None else f"{cfg.mode}, sigma={sigma:.3g}"
    log(f"main run: {main_label}")
    main = _one_run(cfg, clients, test, sigma, main_label, progress)
    log("baseline: the same run without privacy")
    baseline = main if sigma is None else _one_run(cfg, clients, test, None, "no privacy", progress)
    sweep = []
    if sigma is not None:
        for factor in cfg.sweep:
            s = sigma * factor
            if factor == 1.0:  # the main run itself: same seed, same result
                sweep.append(dataclasses.replace(main, label=f"sigma={s:.3g}"))
                continue
            log(f"sweep: sigma={s:.3g}")
            sweep.append(_one_run(cfg, clients, test, s, f"sigma={s:.3g}", progress=False))
    return DemoResult(config=cfg, delta=cfg.target_delta, main=main, baseline=baseline, sweep=sweep)

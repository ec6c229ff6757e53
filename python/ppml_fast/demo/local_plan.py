"""Local DP in the demo: each client calibrates its own noise multiplier so that the rounds it
will take part in stay within ``--target-epsilon`` (record-level, per client), instead of one
sigma for all that lets a client with many examples spend its budget in round 1 and refuse
every later round.

A client with n examples takes, per fit, ``local_epochs * ceil(n / b)`` DP-SGD steps at Poisson
rate q = 1 / ceil(n / b) (:func:`ppml_fast.federated.dp.local.local_dp_steps`). It plans for the
fits it will make: every round when every client is picked each round; with
``--clients-per-round k`` of N, the expected ``ceil(rounds * k / N)`` (a client picked more
often than that refuses the extra fits: its cap stays, and the console says so). The smallest
sigma that keeps those steps within the target (accounted as the client itself accounts them)
is the client's; its cap (``LocalDP.max_epsilon``) is the target. The client's example count
is public, as in DP-SGD practice, so choosing sigma from it costs no privacy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ppml_fast.federated import Client
from ppml_fast.federated.dp import LocalDP
from ppml_fast.federated.dp.local import local_dp_steps

from .config import DemoConfig

__all__ = ["BudgetedClient", "ClientPlan", "budgeted_clients", "describe", "plan_clients", "planned_fits"]


class BudgetedClient(Client):
    """A client that trains under its own :class:`LocalDP` (its sigma and cap) in place of the
    server's ``config["local_dp"]``; everything else as :class:`Client`."""

    def __init__(self, dataset, *, cid: int, local_dp: LocalDP) -> None:
        super().__init__(dataset, cid=cid)
        self.own_local_dp = local_dp

    def fit(self, parameters, config: Mapping[str, Any]):
        if config.get("local_dp") is not None:
            config = {**config, "local_dp": self.own_local_dp}
        return super().fit(parameters, config)


@dataclass(frozen=True)
class ClientPlan:
    """One client's local-DP plan: its sigma, its cap, the fits it plans for and the epsilon
    those fits spend at that sigma."""

    noise_multiplier: float
    max_epsilon: Optional[float]
    fits: int
    planned_epsilon: float


def planned_fits(cfg: DemoConfig) -> int:
    """The fits a client plans for (module docstring)."""
    return cfg.rounds if cfg.per_round == cfg.clients else math.ceil(cfg.rounds * cfg.per_round / cfg.clients)


def plan_clients(cfg: DemoConfig, sizes: list[int], *, factor: float = 1.0,
                 cache: Optional[dict] = None) -> list[ClientPlan]:
    """One plan per client size in ``sizes``. With ``cfg.noise_multiplier`` given, every client
    uses ``factor`` times it and keeps the cap ``cfg.target_epsilon``; else each client's sigma
    is calibrated to ``cfg.target_epsilon`` and multiplied by ``factor`` (the noise sweep), with
    the cap the target (factor 1) or the epsilon its planned fits spend at that sigma."""
    from ppml_fast.accounting import epsilon, get_noise_multiplier

    cache = {} if cache is None else cache
    fits = planned_fits(cfg)
    plans = []
    for n in sizes:
        q, steps = local_dp_steps(n, cfg.batch_size, cfg.local_epochs)
        steps *= fits
        if cfg.noise_multiplier is not None:
            sigma, cap = cfg.noise_multiplier * factor, cfg.target_epsilon
        else:
            key = ("sigma", q, steps)
            if key not in cache:  # tolerance: min(0.2, 1% of the target)
                cache[key] = get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, sample_rate=q,
                    steps=max(steps, 1), accountant=cfg.accountant, epsilon_tolerance=0.2)
            sigma, cap = cache[key] * factor, None
        key = ("eps", q, steps, sigma)
        if key not in cache:
            cache[key] = epsilon(noise_multiplier=sigma, sample_rate=q, steps=max(steps, 1),
                                 delta=cfg.target_delta, accountant=cfg.accountant) if steps else 0.0
        spent = cache[key]
        if cap is None:  # calibrated: the target, or (sweep) the planned spend, rounded up
            cap = cfg.target_epsilon if factor == 1.0 else max(spent * (1 + 1e-9), 1e-12)
        plans.append(ClientPlan(noise_multiplier=float(sigma), max_epsilon=cap, fits=fits,
                                planned_epsilon=float(spent)))
    return plans


def budgeted_clients(cfg: DemoConfig, parts: list, plans: list[ClientPlan]) -> list[BudgetedClient]:
    """Fresh clients (no spend yet) over ``parts``, each with its plan's LocalDP."""
    out = []
    for i, (part, plan) in enumerate(zip(parts, plans)):
        ldp = LocalDP(noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.clip_norm,
                      delta=cfg.target_delta, max_epsilon=plan.max_epsilon, accountant=cfg.accountant)
        out.append(BudgetedClient(part, cid=i, local_dp=ldp))
    return out


def describe(plans: list[ClientPlan], cfg: DemoConfig) -> str:
    """One console line on how the clients set their noise."""
    sigmas = [p.noise_multiplier for p in plans]
    spent = [p.planned_epsilon for p in plans]
    fits = plans[0].fits if plans else 0
    if cfg.noise_multiplier is not None:
        line = (f"local-dp: every client uses the given sigma {cfg.noise_multiplier:g}; each "
                f"client's epsilon stays capped at {cfg.target_epsilon:g} (--target-epsilon): "
                f"a client refuses a fit that would pass it")
        if max(spent) > cfg.target_epsilon:
            line += (f"; at this sigma {sum(s > cfg.target_epsilon for s in spent)} of {len(plans)} "
                     f"clients would pass it within {fits} fits, so they will stop early")
        return line
    return (f"local-dp: each client calibrates its own sigma (from {min(sigmas):.3g} to "
            f"{max(sigmas):.3g}) so that its {fits} planned fits spend at most epsilon "
            f"{cfg.target_epsilon:g} (largest planned: {max(spent):.3g}) at delta {cfg.target_delta:g}")


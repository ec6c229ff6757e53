"""FedOpt: the server-side adaptive optimisers of Reddi, Charles, Zaheer, Garrett, Rush,
Konečný, Kumar, McMahan 2021, "Adaptive Federated Optimization", ICLR, Algorithm 2, as Flower
1.42's ``FedOpt`` family computes them (``eta``, ``eta_l``, ``beta_1``, ``beta_2``, ``tau``).

Each round, with ``Δ_t`` the FedAvg weighted mean of the client updates::

    m_t = beta_1 * m_{t-1} + (1 - beta_1) * Δ_t           (m_{-1} = 0)
    v_t = second_moment(v_{t-1}, Δ_t)                     (v_{-1} = 0; Adagrad/Adam/Yogi differ here)
    w_{t+1} = w_t + step_size(t) * m_t / (sqrt(v_t) + tau)

Subclasses: :class:`~.fedadagrad.FedAdagrad`, :class:`~.fedadam.FedAdam`,
:class:`~.fedyogi.FedYogi`.
"""

from __future__ import annotations

import abc
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..types import ClientProxy
from ._hparams import check_int, check_real, check_state_vector
from .base import Failures, FitResults, Instructions, check_results, weighted_mean_update
from .fedavg import FedAvg

__all__ = ["FedOpt"]


class FedOpt(FedAvg):
    """Base of the adaptive server optimisers; the moments ``m_t`` and ``v_t`` are server
    state (:meth:`state_dict` / :meth:`load_state_dict`).

    ``eta`` is the server learning rate. ``eta_l`` is the client learning rate: Flower stores it
    and never uses it; here it defaults to None (the simulation's ``lr`` is used) and, when
    given, :meth:`configure_fit` sends it to every client as ``config["lr"]``.
    """

    def __init__(self, *, eta: float, eta_l: Optional[float], beta_1: float, beta_2: float,
                 tau: float, min_fit_clients: int = 1) -> None:
        eta = check_real("eta", eta, lo=0.0, lo_open=True)
        if eta_l is not None:
            eta_l = check_real("eta_l", eta_l, lo=0.0, lo_open=True)
        beta_1 = check_real("beta_1", beta_1, lo=0.0, hi=1.0)
        beta_2 = check_real("beta_2", beta_2, lo=0.0, hi=1.0)
        tau = check_real("tau", tau, lo=0.0, lo_open=True)
        super().__init__(min_fit_clients=min_fit_clients)
        self.eta, self.eta_l, self.beta_1, self.beta_2, self.tau = eta, eta_l, beta_1, beta_2, tau
        self.m_t: Optional[torch.Tensor] = None
        self.v_t: Optional[torch.Tensor] = None

    @abc.abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``v_t`` from ``v_{t-1}`` and ``Δ_t`` (may update ``v`` in place and return it)."""

    def step_size(self, server_round: int) -> float:
        """The server step of round ``server_round`` (default: ``eta``)."""
        return self.eta

    def configure_fit(self, server_round: int, parameters: torch.Tensor,
                      clients: Sequence[ClientProxy], num_clients: int,
                      rng: np.random.Generator) -> Instructions:
        pairs = super().configure_fit(server_round, parameters, clients, num_clients, rng)
        if self.eta_l is None:
            return pairs
        return [(proxy, {**config, "lr": self.eta_l}) for proxy, config in pairs]

    def aggregate_fit(self, server_round: int, parameters: torch.Tensor, results: FitResults,
                      failures: Failures) -> tuple[torch.Tensor, dict[str, float]]:
        server_round = check_int("server_round", server_round, 0)
        check_results(results, parameters.numel())
        if self.m_t is not None and self.m_t.numel() != parameters.numel():
            raise ValueError(
                f"parameters has {parameters.numel()} entries but the server moments have "
                f"{self.m_t.numel()} (a different model?)")
        step = self.step_size(server_round)
        delta = weighted_mean_update(results)
        m = torch.zeros_like(delta) if self.m_t is None else self.m_t.clone()
        v = torch.zeros_like(delta) if self.v_t is None else self.v_t.clone()
        m.mul_(self.beta_1).add_(delta, alpha=1.0 - self.beta_1)
        v = self.second_moment(v, delta)
        self.m_t, self.v_t = m, v
        new = parameters + (step * m / (v.sqrt() + self.tau)).to(parameters.dtype)
        return new, {}

    def state_dict(self) -> dict[str, Any]:
        """The moments ``m_t``, ``v_t`` (None before the first aggregated round), copies."""
        return {"m_t": None if self.m_t is None else self.m_t.clone(),
                "v_t": None if self.v_t is None else self.v_t.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (validated before anything changes)."""
        m = check_state_vector(state, "m_t", None)
        v = check_state_vector(state, "v_t", None if m is None else m.numel())
        if (m is None) != (v is None):
            raise ValueError("state_dict['m_t'] and state_dict['v_t'] must both be None or both tensors")
        self.m_t, self.v_t = m, v

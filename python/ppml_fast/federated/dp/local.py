"""Local DP-SGD inside a client: :class:`LocalDP` (the settings the simulation puts in every
client's fit config as ``config["local_dp"]``) and the DP-SGD fit a :class:`Client` runs with it.

Each client protects its own records: it trains with DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy", Algorithm 1) through :class:`ppml_fast.PrivacyEngine`, keeps its own
accountant across the rounds it takes part in (client-side state, so ε composes over its
fits), reports ``metrics["epsilon"]`` and refuses a fit that would pass ``max_epsilon``.

One fit, for a client with n examples, config ``batch_size`` b and ``local_epochs`` E:
Poisson sampling with rate q = 1 / ceil(n / b) (each example joins each batch independently;
expected batch size n q ≈ b), E * ceil(n / b) steps, each clipping per-sample gradients to
``max_grad_norm`` C, adding N(0, (σ C)^2) to the sum and dividing by n q, then a plain SGD step
with ``lr``. The accountant composes PoissonSampledEvent(q, GaussianEvent(σ)) per step.
Against whom, by ``LocalDP.secure_mode``:

- ``secure_mode=True`` (for real deployments): record-level DP towards everyone outside the
  device, the server included. The noise comes from ChaCha20 keyed from the OS's entropy on the
  device, and the Poisson sampler from the OS CSPRNG on the device
  (:mod:`ppml_fast.secure_random`), so neither the server nor anyone else can regenerate the
  noise or know the batches. ``noise_seed`` is then an error.
- ``secure_mode=False`` (the default, for simulations): the noise is Philox keyed from OS
  entropy on the device (DESIGN.md, privacy invariant 3: the server's ``config["seed"]`` never
  keys noise), unless ``LocalDP(noise_seed=...)`` asks for reproducible noise: then the key is
  SHA-256(noise_seed, config["seed"]), one stream per client and round, and the History says
  ``noise_keys.REPRODUCIBLE_NOISE`` (whoever knows ``noise_seed`` can subtract the noise). The
  Poisson sampler is ``torch.Generator().manual_seed(config["seed"])``: the server, which chose
  that seed, knows the batches, so towards the server this mode has no amplification by
  sampling. Use it to study utility; use ``secure_mode`` to protect clients from the server.

What is treated as public, as in Opacus and DP-SGD practice: the client's example count n (it
fixes q and the number of steps, and ``num_examples`` in the result, FedAvg's weight). The
training loss is computed from raw data without noise, so it is not reported under local DP.
FedProx's proximal term: each step is ``p -= lr * (noised mean gradient + mu * (p - p_received))``
as in the non-private client; the term reads no data (post-processing), so it costs no privacy.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent, PrivacyBudgetExceeded
from ppml_fast.accounting.calibration import ACCOUNTANTS

from ppml_fast.noise_keys import derived_key, noise_seed

from ..strategy._hparams import check_positive as _positive

__all__ = ["LocalDP", "LocalDPState", "local_dp_sgd", "local_dp_steps", "state_after_lost_fit"]


@dataclass(frozen=True)
class LocalDP:
    """Local DP-SGD settings for every client.

    Args:
        noise_multiplier: σ, the noise std as a multiple of ``max_grad_norm`` (> 0).
        max_grad_norm: C, the per-sample gradient clipping norm (> 0).
        delta: δ at which each client's ε is reported and its budget checked, in (0, 1).
        max_epsilon: a client refuses (``PrivacyBudgetExceeded``, before training) a fit after
            which its ε at ``delta`` would exceed this; None: no limit.
        accountant: "pld" (the default; tight) or "rdp" (an upper bound) (the client's accountant;
            fixed at its first DP fit).
        secure_mode: ChaCha20 noise keyed from OS entropy and Poisson sampling from the OS
            CSPRNG (not reproducible by design).
        noise_seed: reproducible noise (no privacy against whoever knows it; not with
            ``secure_mode``); None (the default): the noise key comes from OS entropy.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    max_epsilon: Optional[float] = None
    accountant: str = "pld"
    secure_mode: bool = False
    noise_seed: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _positive("noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "max_grad_norm", _positive("max_grad_norm", self.max_grad_norm))
        d = self.delta
        if isinstance(d, bool) or not isinstance(d, numbers.Real):
            raise TypeError(f"delta must be a real number; got {type(d).__name__} {d!r}")
        if not 0 < float(d) < 1:
            raise ValueError(f"delta must be in (0, 1); got {d!r}")
        object.__setattr__(self, "delta", float(d))
        if self.max_epsilon is not None:
            object.__setattr__(self, "max_epsilon", _positive("max_epsilon", self.max_epsilon))
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}; got {self.accountant!r}")
        if not isinstance(self.secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool; got {type(self.secure_mode).__name__}")
        object.__setattr__(self, "noise_seed", noise_seed("noise_seed", self.noise_seed,
                                                         secure=self.secure_mode))


class LocalDPState:
    """A client's own privacy state across rounds: its accountant, the Philox offset where its
    next noise starts, and how many DP fits it has completed. Lives on the client (device)."""

    def __init__(self, accountant: str = "pld") -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}; got {accountant!r}")
        self.accountant_name = accountant
        self.accountant = ACCOUNTANTS[accountant]()
        self.noise_offset = 0
        self.fits = 0

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``."""
        return self.accountant.get_epsilon(delta)

    def state_dict(self) -> dict:
        return {"accountant_name": self.accountant_name, "accountant": self.accountant.state_dict(),
                "noise_offset": self.noise_offset, "fits": self.fits}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            fresh = LocalDPState(state["accountant_name"])
            fresh.accountant.load_state_dict(state["accountant"])
            offset, fits = int(state["noise_offset"]), int(state["fits"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"state must be a LocalDPState.state_dict(); {e!r}") from e
        if offset < 0 or fits < 0:
            raise ValueError(f"state: noise_offset and fits must be >= 0; got {offset}, {fits}")
        self.accountant_name, self.accountant = fresh.accountant_name, fresh.accountant
        self.noise_offset, self.fits = offset, fits


def local_dp_steps(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(Poisson rate q, number of DP-SGD steps) of one local fit: q = 1 / ceil(n / b),
    ``local_epochs * ceil(n / b)`` steps (0 steps for n = 0)."""
    if num_examples == 0:
        return 1.0, 0
    per_epoch = math.ceil(num_examples / batch_size)
    return 1.0 / per_epoch, local_epochs * per_epoch


def state_after_lost_fit(state: Optional[LocalDPState], local_dp: LocalDP, num_examples: int,
                         batch_size: int, local_epochs: int) -> LocalDPState:
    """A conservative stand-in for a client's state after a fit whose device was lost with its
    state (a Ray worker that died mid-round): how many of the fit's steps ran is unknown, so
    all of them are composed onto ``state`` (the state the fit started from; None: a new
    client), as if the fit had completed. The true spend is at most this, since a fit composes
    its steps one by one as they run. Nothing is composed where the client would have refused
    the fit before training (another accountant; ``max_epsilon`` exceeded, the same check as
    :func:`local_dp_sgd`). The noise offset is left where it was: the lost fit released
    nothing, so no noise it drew is released twice. ``state`` itself is not changed."""
    local_dp = check_local_dp(local_dp)
    base = LocalDPState(local_dp.accountant) if state is None else state
    if base.accountant_name != local_dp.accountant:
        return base  # the client would have raised ValueError before any step
    q, steps = local_dp_steps(num_examples, batch_size, local_epochs)
    after = LocalDPState(base.accountant_name)
    after.load_state_dict(base.state_dict())
    if steps:
        after.accountant.compose(PoissonSampledEvent(q, GaussianEvent(local_dp.noise_multiplier)), steps)
        if local_dp.max_epsilon is not None and after.epsilon(local_dp.delta) > local_dp.max_epsilon:
            return base  # refused before training (PrivacyBudgetExceeded): nothing spent
    return after


def check_local_dp(value: Any) -> LocalDP:
    if not isinstance(value, LocalDP):
        raise TypeError(f"config['local_dp'] must be a ppml_fast.federated.dp.LocalDP; "
                        f"got {type(value).__name__}")
    return value


def local_dp_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Mapping[str, Any],
                 local_dp: LocalDP, state: LocalDPState) -> dict[str, float]:
    """Trains ``model`` (already holding the received parameters) in place with DP-SGD on
    (``x``, ``y``) as the module docstring says; composes the steps into ``state``. Returns the
    metrics to report: ``{"epsilon": ε at local_dp.delta after this fit}``.

    Raises ``PrivacyBudgetExceeded`` before any change (model and ``state`` untouched) when
    the fit would take ε past ``local_dp.max_epsilon``."""
    local_dp = check_local_dp(local_dp)
    if local_dp.accountant != state.accountant_name:
        raise ValueError(f"local_dp.accountant is {local_dp.accountant!r} but this client has "
                         f"accounted with {state.accountant_name!r} so far; keep one accountant")
    n, b, epochs = int(x.shape[0]), settings["batch_size"], settings["local_epochs"]
    q, steps = local_dp_steps(n, b, epochs)
    sigma, delta = local_dp.noise_multiplier, local_dp.delta
    event = PoissonSampledEvent(q, GaussianEvent(sigma))
    if local_dp.max_epsilon is not None and steps:
        after = copy.deepcopy(state.accountant).compose(event, steps).get_epsilon(delta)
        if after > local_dp.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"this fit ({steps} DP-SGD steps at q={q:.4g}, noise_multiplier={sigma:g}) would "
                f"take the client's epsilon to {after:.4g} > max_epsilon {local_dp.max_epsilon:g} "
                f"at delta {delta:g}; nothing was trained",
                epsilon=after, epsilon_budget=local_dp.max_epsilon, delta=delta)
    if steps:
        _train(model, x, y, settings, local_dp, state)
    state.fits += 1
    return {"epsilon": state.epsilon(delta)}


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Mapping[str, Any],
           local_dp: LocalDP, state: LocalDPState) -> None:
    # imported here: ppml_fast.privacy is the heavier layer, only needed by local-DP clients
    from ppml_fast.privacy import PrivacyEngine

    seed, lr, mu = s["seed"], s["lr"], s["proximal_mu"]
    engine = PrivacyEngine(accountant=local_dp.accountant, secure_mode=local_dp.secure_mode)
    engine.accountant = state.accountant  # the client's accountant: ε composes across its fits
    loader = DataLoader(TensorDataset(x, y), batch_size=s["batch_size"])
    base = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    # secure mode: the engine samples from the OS CSPRNG and keys the noise from OS entropy (the
    # server knows config["seed"]); else the batches follow config["seed"] and the noise key is
    # OS entropy, or the user's noise_seed mixed with config["seed"] (one stream per fit)
    sampler = None if local_dp.secure_mode else torch.Generator().manual_seed(seed)
    key = None if local_dp.noise_seed is None else derived_key(local_dp.noise_seed, int(seed))
    private, opt, dp_loader = engine.make_private(
        module=model, optimizer=base, data_loader=loader, noise_multiplier=local_dp.noise_multiplier,
        max_grad_norm=local_dp.max_grad_norm, noise_seed=key, generator=sampler)
    opt.offset = state.noise_offset
    params = opt.params
    anchors = [p.detach().clone() for p in params] if mu > 0 else None
    loss_fn = s["loss_fn"]
    model.train()
    try:
        for _ in range(s["local_epochs"]):
            for xb, yb in dp_loader:
                opt.zero_grad()
                if len(xb):  # an empty Poisson batch: noise only
                    loss_fn(private(xb), yb).backward()
                # FedProx's term mu (p - p_received) at the pre-step p: reads no data
                prox = None if anchors is None else [mu * (p.detach() - a) for p, a in zip(params, anchors)]
                opt.step()
                if prox is not None:
                    with torch.no_grad():
                        for p, t in zip(params, prox):
                            p.sub_(t, alpha=lr)
    finally:
        # steps taken before an error stay composed (conservative) and their noise stays used
        state.noise_offset = opt.offset
        private.remove_hooks()
        for p in model.parameters():
            p.grad = None

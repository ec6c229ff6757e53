"""Auditing DP-SGD as the user configures it: insert canaries, train with
``PrivacyEngine.make_private``, score each canary, and bound epsilon.

Two designs:

- one run (default): ``canaries`` canaries, each included independently with probability 1/2;
  one training; the bound of Steinke, Nasr & Jagielski 2023 (:mod:`ppml_fast.audit.one_run`).
- many runs (``runs=R``): one canary, included in every other run; R trainings; the
  Clopper–Pearson bound of the threshold test (:mod:`ppml_fast.audit.distinguish`).

Scores (higher: more likely "in"):

- dirac canaries, ``observe="gradients"`` (white box): the log-likelihood ratio of "the
  canary joined each step with probability q" against "it never did", from the noisy gradient
  at the canary's coordinate at every step (:func:`~ppml_fast.audit.canaries.poisson_gaussian_llr`).
  With ``ROBUST_STEPS`` steps or more, each coordinate is first centred on its median over the
  steps and its noise level measured by its median absolute deviation, which removes most of
  the real data's gradient on that coordinate (and, where the noise is missing, exposes it).
  DP-SGD's guarantee covers the whole sequence of noisy gradients (the accountant composes one
  event per step), so an auditor may see all of them: the strongest view, the tightest audit.
- dirac canaries, ``observe="model"``: minus the change of the canary's coordinate between the
  initial and the final model (the final model only; for optimizers whose update moves a
  coordinate against its gradient, such as SGD and Adam).
- input canaries: minus the final model's loss on the canary.

The epsilon claimed is the engine's accountant's at ``config.delta`` after training (the
largest over runs). A bound above it refutes the claim at the stated confidence: a bug in the
DP step, its accounting, or the configuration.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.accounting import calibration
from ppml_fast.audit import _checks
from ppml_fast.audit.canaries import INPUT_KINDS, DiracCanaries, DiracCanaryMixin, input_canaries, poisson_gaussian_llr
from ppml_fast.audit.distinguish import distinguishing_test
from ppml_fast.audit.one_run import one_run_audit
from ppml_fast.audit.result import AuditResult
from ppml_fast.privacy.engine import PrivacyEngine
from ppml_fast.privacy.distributed import DistributedDPOptimizer
from ppml_fast.privacy.optimizer import DPOptimizer

CANARY_KINDS = ("dirac",) + INPUT_KINDS
OBSERVE = ("gradients", "model")
ROBUST_STEPS = 5  # from this many steps on, each coordinate is centred and scaled by its own statistics
MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation of a normal
_RESERVED = ("module", "optimizer", "data_loader", "noise_multiplier", "max_grad_norm", "noise_seed",
             "generator", "distributed")


@dataclasses.dataclass(frozen=True)
class DPSGDConfig:
    """The DP-SGD training an audit runs.

    Attributes:
        noise_multiplier: sigma (> 0), noise std as a multiple of the clipping norm.
        max_grad_norm: C (a tuple of one per trainable parameter with per-layer clipping).
        batch_size: the data loader's batch size (Poisson sampling: sample rate 1/len(loader)).
        epochs: passes over the data.
        lr: learning rate of the default optimizer, ``torch.optim.SGD``.
        delta: the delta at which the claimed and the audited epsilon are measured.
        accountant: "rdp" or "pld".
        engine_options: further ``make_private`` keywords (clipping, grad_sample_mode,
            poisson_sampling, loss_reduction, ...).
        optimizer: parameters -> torch optimizer (default SGD with ``lr``).
        loss: (outputs, targets) -> mean loss (default cross entropy).
    """

    noise_multiplier: float
    max_grad_norm: float | tuple[float, ...]
    batch_size: int = 64
    epochs: int = 1
    lr: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    engine_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy

    def __post_init__(self) -> None:
        _checks.positive("noise_multiplier", self.noise_multiplier)
        if isinstance(self.max_grad_norm, numbers.Real):
            _checks.positive("max_grad_norm", self.max_grad_norm)
        else:
            for c in self.max_grad_norm:
                _checks.positive("max_grad_norm", c)
        _checks.count("batch_size", self.batch_size, minimum=1)
        _checks.count("epochs", self.epochs, minimum=1)
        _checks.positive("lr", self.lr)
        _checks.open_unit("delta", self.delta)
        if self.accountant not in calibration.ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(calibration.ACCOUNTANTS)}; got {self.accountant!r}")
        bad = sorted(set(self.engine_options) & set(_RESERVED))
        if bad:
            raise ValueError(f"engine_options must not set {bad}: the audit sets them (the model, "
                             "optimizer, loader, seeds) or takes them from the config")
        if self.optimizer is not None and not callable(self.optimizer):
            raise TypeError(f"optimizer must be callable or None; got {type(self.optimizer).__name__}")
        if not callable(self.loss):
            raise TypeError(f"loss must be callable; got {type(self.loss).__name__}")


@dataclasses.dataclass
class _Run:
    engine: PrivacyEngine
    optimizer: DPOptimizer
    model: nn.Module  # the user's model, hooks removed, after training


def _seeds(seed: int, n: int) -> list[int]:
    return [int(s.generate_state(1, np.uint64)[0] >> np.uint64(1)) for s in np.random.SeedSequence(seed).spawn(n)]


def _make_model(model_fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return a torch.nn.Module; got {type(model).__name__}")
    return model


def _rebuild(opt: DPOptimizer, cls: type) -> DPOptimizer:
    """The same DP optimizer (same wrapped optimizer, module, accountant, seed) as ``cls``."""
    if type(opt) is cls:
        return opt
    return cls(opt.original_optimizer, module=opt.module, noise_multiplier=opt.noise_multiplier,
               max_grad_norm=opt.max_grad_norm, expected_batch_size=opt.expected_batch_size,
               clipping=opt.clipping, accountant=opt.accountant, sample_rate=opt.sample_rate,
               max_epsilon=opt.max_epsilon, delta=opt.delta, seed=opt.seed,
               secure_mode=opt.secure_mode, nonfinite=opt.nonfinite, gamma=opt.gamma)


def _train(model: nn.Module, data: TensorDataset, config: DPSGDConfig, cls: type, seeds: Sequence[int],
           setup: Optional[Callable[[DPOptimizer], None]] = None) -> _Run:
    optimizer = (config.optimizer or (lambda ps: torch.optim.SGD(ps, lr=config.lr)))(model.parameters())
    engine = PrivacyEngine(accountant=config.accountant)
    mgn = config.max_grad_norm if isinstance(config.max_grad_norm, numbers.Real) else list(config.max_grad_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # poisson_sampling=False warns; the user chose it
        module, opt, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=config.batch_size),
            noise_multiplier=config.noise_multiplier, max_grad_norm=mgn, noise_seed=seeds[0],
            generator=torch.Generator().manual_seed(seeds[1]), **dict(config.engine_options))
    opt = _rebuild(opt, cls)
    engine.optimizer = opt
    if setup is not None:
        setup(opt)
    for _ in range(config.epochs):
        for xb, yb in loader:  # the loader's (Poisson) batches: the optimizer checks one per step
            opt.zero_grad()
            config.loss(module(xb), yb).backward()
            opt.step()
    return _Run(engine, opt, module.remove_hooks())


def _claimed(run: _Run, delta: float) -> float:
    return float(run.engine.get_epsilon(delta)) if run.optimizer.steps else 0.0


def _dirac_scores(model_fn, data, config, cls, seeds, canaries: DiracCanaries, included, observe):
    """(scores, run) of one training with these dirac canaries."""
    model = _make_model(model_fn, seeds[2])
    mixed = type(f"DiracCanary{cls.__name__}", (DiracCanaryMixin, cls), {})
    before: list[torch.Tensor] = []

    def setup(opt):
        opt.setup_canaries(canaries, included, torch.Generator().manual_seed(seeds[3]))
        before.extend(p.detach().clone() for p in opt.params)

    run = _train(model, data, config, mixed, seeds, setup)
    opt = run.optimizer
    if observe == "model":
        change = canaries.gather([p.detach() - b for p, b in zip(opt.params, before)])
        return -change, run
    if not opt.canary_observations:
        return torch.zeros(canaries.count, dtype=torch.float64), run
    z = torch.stack(opt.canary_observations)
    noise = opt.noise_std / opt.canary_norm  # the claimed std of an observation
    if z.shape[0] >= ROBUST_STEPS:
        # the real data's gradient adds to each coordinate a part that changes little from step
        # to step (a canary joins a step with probability q only): centre each coordinate on its
        # median over steps and measure its spread by the median absolute deviation
        z = z - z.median(0).values
        noise = (MAD_TO_STD * z.abs().median(0).values).clamp_min(1e-6)
    return poisson_gaussian_llr(z, opt.sample_rate, noise), run


def _input_scores(model_fn, data, config, cls, seeds, cx, cy, included):
    x, y = data.tensors[0], data.tensors[1]
    train = TensorDataset(torch.cat([x, cx[included]]), torch.cat([y, cy[included].to(y.dtype)]))
    run = _train(_make_model(model_fn, seeds[2]), train, config, cls, seeds)
    run.model.eval()
    with torch.no_grad():
        out = run.model(cx)
        losses = F.cross_entropy(out, cy, reduction="none") if config.loss is F.cross_entropy else \
            torch.stack([config.loss(out[i:i + 1], cy[i:i + 1]) for i in range(cx.shape[0])])
    return -losses.double(), run


def audit_dp_sgd(
    model_fn: Callable[[], nn.Module],
    train: TensorDataset,
    config: DPSGDConfig,
    *,
    canaries: int = 1000,
    canary_kind: str = "dirac",
    observe: str = "gradients",
    runs: Optional[int] = None,
    confidence: float = 0.95,
    seed: int = 0,
    guesses=None,
    dp_optimizer_class: type = DPOptimizer,
    num_classes: Optional[int] = None,
) -> AuditResult:
    """Audits DP-SGD with ``config`` on ``train``; returns the epsilon lower bound next to the
    accountant's claim.

    Args:
        model_fn: builds a fresh model (called under ``torch.manual_seed`` of a derived seed).
        train: a TensorDataset (inputs, integer labels).
        config: the training (noise multiplier, clipping norm, batch size, epochs, ...).
        canaries: canaries of the one-run audit (ignored with ``runs``).
        canary_kind: "dirac" (gradient space), "mislabelled" or "ood" (input space).
        observe: for dirac canaries, "gradients" (every step's noisy gradient) or "model".
        runs: None for the one-run audit; else the number of trainings (>= 4) of the many-run
            Clopper–Pearson audit (one canary, in every other run).
        confidence: probability that the lower bound holds.
        seed: seeds everything (model init, sampling, noise, canaries, the threshold split).
        guesses: one-run guesses, see :func:`~ppml_fast.audit.one_run.one_run_audit`.
        dp_optimizer_class: the DPOptimizer (sub)class to audit, e.g. one with its own stages.
        num_classes: for input canaries (default: max label + 1).
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    if not isinstance(train, TensorDataset) or len(train.tensors) != 2:
        raise TypeError(f"train must be a TensorDataset of (inputs, labels); got {type(train).__name__}")
    if not isinstance(config, DPSGDConfig):
        raise TypeError(f"config must be a DPSGDConfig; got {type(config).__name__}")
    if canary_kind not in CANARY_KINDS:
        raise ValueError(f"canary_kind must be one of {CANARY_KINDS}; got {canary_kind!r}")
    if observe not in OBSERVE:
        raise ValueError(f"observe must be one of {OBSERVE}; got {observe!r}")
    if not (isinstance(dp_optimizer_class, type) and issubclass(dp_optimizer_class, DPOptimizer)) \
            or issubclass(dp_optimizer_class, DistributedDPOptimizer):
        raise TypeError(f"dp_optimizer_class must be a (non-distributed) DPOptimizer subclass; got {dp_optimizer_class!r}")
    confidence = _checks.open_unit("confidence", confidence)
    seed = _checks.seed("seed", seed)
    details = {"canary_kind": canary_kind, "noise_multiplier": config.noise_multiplier,
               "max_grad_norm": config.max_grad_norm, "batch_size": config.batch_size,
               "epochs": config.epochs, "accountant": config.accountant,
               "optimizer_class": dp_optimizer_class.__name__}
    if canary_kind == "dirac":
        details["observe"] = observe
    if runs is None:
        m = _checks.count("canaries", canaries, minimum=1)
        return _one_run(model_fn, train, config, m, canary_kind, observe, confidence, seed, guesses,
                        dp_optimizer_class, num_classes, details)
    runs = _checks.count("runs", runs, minimum=4)
    return _many_runs(model_fn, train, config, runs, canary_kind, observe, confidence, seed,
                      dp_optimizer_class, num_classes, details)


def _canary_source(model_fn, train, kind, m, gen, num_classes, model_seed):
    """(kind-specific canary description) drawn with ``gen``."""
    if kind == "dirac":
        params = [p for p in _make_model(model_fn, model_seed).parameters() if p.requires_grad]
        return DiracCanaries.draw(params, m, gen)
    x, y = train.tensors
    return input_canaries(x, y, m, kind=kind, num_classes=num_classes, generator=gen)


def _scores(model_fn, train, config, cls, seeds, kind, source, included, observe):
    if kind == "dirac":
        return _dirac_scores(model_fn, train, config, cls, seeds, source, included, observe)
    cx, cy = source
    return _input_scores(model_fn, train, config, cls, seeds, cx, cy, included)


def _one_run(model_fn, train, config, m, kind, observe, confidence, seed, guesses, cls, num_classes,
             details) -> AuditResult:
    seeds = _seeds(seed, 6)
    included = torch.rand(m, generator=torch.Generator().manual_seed(seeds[4])) < 0.5  # its own stream
    source = _canary_source(model_fn, train, kind, m, torch.Generator().manual_seed(seeds[5]),
                            num_classes, seeds[2])
    scores, run = _scores(model_fn, train, config, cls, seeds, kind, source, included, observe)
    test = one_run_audit(scores.numpy(), included.numpy(), delta=config.delta, confidence=confidence,
                         guesses=guesses)
    claimed = _claimed(run, config.delta)
    return AuditResult(
        epsilon_lower_bound=test.epsilon_lower_bound, epsilon_claimed=claimed, confidence=confidence,
        delta=config.delta, method="one_run",
        counts={"canaries": test.canaries, "included": int(included.sum()), "guesses": test.guesses,
                "correct": test.correct},
        details={**details, "k_plus": test.k_plus, "k_minus": test.k_minus, "tests": test.tests,
                 "steps": run.optimizer.steps, "sample_rate": run.optimizer.sample_rate})


def _many_runs(model_fn, train, config, runs, kind, observe, confidence, seed, cls, num_classes,
               details) -> AuditResult:
    base = _seeds(seed, runs + 1)
    gen = torch.Generator().manual_seed(base[-1])
    source = _canary_source(model_fn, train, kind, 1, gen, num_classes, base[-1])
    ins, outs, claimed, steps, rate = [], [], 0.0, 0, 0.0
    for r in range(runs):
        included = torch.tensor([r % 2 == 0])
        seeds = _seeds(base[r], 5)
        seeds[2] = base[-1]  # one initial model for all runs (the guarantee holds for any): less variance
        score, run = _scores(model_fn, train, config, cls, seeds, kind, source, included, observe)
        (ins if bool(included) else outs).append(float(score[0]))
        claimed = max(claimed, _claimed(run, config.delta))
        steps, rate = run.optimizer.steps, run.optimizer.sample_rate
    test = distinguishing_test(ins, outs, delta=config.delta, confidence=confidence, threshold="split", seed=seed)
    return AuditResult(
        epsilon_lower_bound=test.epsilon_lower_bound, epsilon_claimed=claimed,
        confidence=confidence, delta=config.delta, method="clopper_pearson",
        counts={"tp": test.tp, "fp": test.fp, "tn": test.tn, "fn": test.fn},
        details={**details, "runs": runs, "threshold": test.threshold, "threshold_strategy": test.strategy,
                 "steps": steps, "sample_rate": rate})

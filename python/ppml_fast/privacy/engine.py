"""PrivacyEngine: Opacus's entry point, on ppml_fast's native ops and accountants. An Opacus
training loop runs after changing the import::

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0)
    ...                                   # the usual loop
    engine.get_epsilon(delta=1e-5)

Differences from Opacus: ``make_private`` returns four values only when given ``criterion=``
(Opacus: whenever ``grad_sample_mode="ghost"``); the default ``grad_sample_mode="ghost"`` covers
every supported layer (not only Linear and Embedding) and plain ``nn.MultiheadAttention``;
accountants are "pld" (default) or "rdp". docs/migrating_from_opacus.md has the rest.
"""

from __future__ import annotations

import math

import numbers
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast.accounting import calibration
from ppml_fast.privacy import checkpoint, correlated_plan, sampling
from ppml_fast.noise_keys import noise_seed as noise_seed_check
from ppml_fast.privacy.data import DistributedDPDataLoader, DPDataLoader
from ppml_fast.privacy.module import PrivateModule
from ppml_fast.privacy.distributed import DistributedDPOptimizer
from ppml_fast.privacy.optimizer import DPOptimizer


def _loss_reduction(loss_reduction: Optional[str], criterion) -> str:
    """``loss_reduction``, or the criterion's own ``reduction`` ("mean" when neither says)."""
    own = getattr(criterion, "reduction", None) if criterion is not None else None
    own = own if own in ("mean", "sum") else None
    if loss_reduction is None:
        return own or "mean"
    if own is not None and own != loss_reduction:
        raise ValueError(f"loss_reduction={loss_reduction!r} contradicts the criterion's reduction "
                         f"{own!r}: per-sample gradients would be scaled wrongly; pass one of them")
    return loss_reduction


class PrivacyEngine:
    """Makes a model, optimizer and data loader private and keeps the privacy accountant.

    Args:
        accountant: "pld" (the default, as Opacus defaults to its tight PRV accountant:
            privacy loss distributions, within 1% of Opacus's PRV) or "rdp" (Rényi DP; an upper
            bound, 4-69% looser in epsilon, cheaper per query).
        secure_mode: draw the noise from ChaCha20 keyed by OS entropy with a sampler hardened
            against floating-point attacks (not reproducible by design).
    """

    def __init__(self, accountant: str = "pld", secure_mode: bool = False) -> None:
        if accountant not in calibration.ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(calibration.ACCOUNTANTS)}; got {accountant!r}")
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool; got {type(secure_mode).__name__}")
        self.accountant_name = accountant
        self.accountant = calibration.ACCOUNTANTS[accountant]()
        self.secure_mode = secure_mode
        self.optimizer: Optional[DPOptimizer] = None
        # which sampling the accountant assumes, in words (privacy/sampling.py); set by make_private
        self.accounting_analysis: Optional[str] = None

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        poisson_sampling: bool = True,
        clipping: str = "flat",
        grad_sample_mode: str = "ghost",
        max_epsilon: Optional[float] = None,
        delta: Optional[float] = None,
        loss_reduction: Optional[str] = None,
        batch_first: bool = True,
        noise_seed: Optional[int] = None,
        nonfinite: str = "raise",
        generator: Optional[torch.Generator] = None,
        distributed: bool = False,
        optimizer_class: Optional[type] = None,
        journal: Optional[str] = None,
        criterion: Optional[Callable] = None,
        noise_mechanism: str = "gaussian",
        bands: Optional[int] = None,
        epochs: Optional[int] = None,
        steps: Optional[int] = None,
    ) -> tuple:
        """Returns (private module, DP optimizer, data loader), or, with ``criterion`` (as
        Opacus's ghost-clipping tutorials call it), (private module, DP optimizer, criterion,
        data loader): the criterion is returned as it is (ghost clipping needs no wrapped
        loss here), and its ``reduction`` ("mean" or "sum") is the default ``loss_reduction``
        ("mean" without one; a ``loss_reduction`` that contradicts it is an error).
        ``grad_sample_mode``: "ghost" (default: per layer the cheaper of ghost norms and
        materialised per-sample gradients) or "materialize"; Opacus's "hooks", "functorch" and
        "ew" mean "materialize" (the same exact per-sample gradients).

        ``noise_multiplier`` is sigma (noise std / max_grad_norm); ``max_grad_norm`` is C (a
        list of one per trainable parameter with ``clipping="per_layer"``). With ``max_epsilon``
        (and ``delta``), the step that would spend more raises ``PrivacyBudgetExceeded`` before
        any parameter changes. ``noise_seed`` makes the noise reproducible (and then not
        private against whoever knows it); ``generator`` seeds the Poisson sampler. In secure
        mode both are errors: the sampler draws from the OS CSPRNG, the noise from ChaCha20.
        ``distributed=True``: data-parallel training over ``torch.distributed`` ranks; every
        rank passes a loader over the same whole dataset (with or without a DistributedSampler)
        and gets :class:`~ppml_fast.privacy.data.DistributedDPDataLoader`: disjoint shards, each
        Poisson-sampled with q = 1 / len(data_loader) from its own stream (OS entropy, the OS
        CSPRNG in secure mode; a ``generator`` given alike on every rank is turned into a
        distinct stream per rank); clipped sums are all-reduced and the noise added once per
        logical step (:class:`~ppml_fast.privacy.distributed.DistributedDPOptimizer`,
        denominator q N).
        ``optimizer_class``: a :class:`DPOptimizer` subclass to build instead of the default (a
        :class:`DistributedDPOptimizer` subclass with ``distributed=True``), e.g. to check one's
        own subclass with :func:`ppml_fast.audit.check_sensitivity`.

        ``journal``: a path (str or os.PathLike) or :class:`~ppml_fast.privacy.journal.PrivacyJournal`
        for a crash-safe privacy record. Before each step's noise exists, its event and noise
        offsets are appended to it and fsynced; after a crash (even ``kill -9``),
        :meth:`load_checkpoint` (or ``load_state_dict``) counts every step recorded after the
        checkpoint and continues the noise after the last reserved offset, so the resumed run
        reports at least the epsilon of every released step and never draws noise twice. The
        records already in the file are counted at once (one journal per run: a new run uses a
        new path). Without a journal, a resume counts the checkpoint's steps only and re-keys
        the noise. Cost: one fsync per step. With ``distributed=True`` give each rank its own path.

        ``noise_mechanism``: "gaussian" (DP-SGD, the default), "tree" (DP-FTRL's tree
        aggregation, Kairouz et al. 2021) or "banded_mf" (banded matrix factorization with
        ``bands`` bands, Choquette-Choo et al. 2023): the noise of step t is sigma C w_t, a
        linear combination of fresh Gaussians (:mod:`ppml_fast.privacy.correlated_noise`), and the
        run is planned for ``steps`` steps (or ``epochs`` epochs of ``len(data_loader)`` steps);
        a step beyond the plan is refused. The participation schema follows the loader
        (:mod:`ppml_fast.privacy.correlated_plan`): fixed order, shuffled (conservative), or for
        "banded_mf" with ``poisson_sampling=True`` cyclic Poisson sampling over ``bands`` parts
        (the returned loader). The noise std stays fixed; no distributed training.
        """
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch DataLoader; got {type(data_loader).__name__}")
        loss_reduction = _loss_reduction(loss_reduction, criterion)
        if optimizer_class is not None:
            base = DistributedDPOptimizer if distributed else DPOptimizer
            if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, base)):
                raise TypeError(f"optimizer_class must be a subclass of {base.__name__}"
                                f"{' (distributed=True)' if distributed else ''}; got {optimizer_class!r}")
        if max_epsilon is not None and delta is None:
            raise ValueError("delta is required with max_epsilon")
        if self.secure_mode:  # DESIGN.md invariant 3: secure randomness cannot be seeded
            noise_seed_check("noise_seed", noise_seed, secure=True)
            if generator is not None:
                raise ValueError("generator was passed with secure_mode=True: secure-mode Poisson "
                                 "sampling draws from the OS CSPRNG and cannot be seeded; pass "
                                 "generator=None")
        correlated_plan.check_args(noise_mechanism, bands, epochs, steps)
        correlated = plan = None
        if noise_mechanism != "gaussian":  # tree / banded MF: strategy, participation, loader
            correlated, loader, sample_rate, expected = correlated_plan.plan(
                noise_mechanism=noise_mechanism, bands=bands, epochs=epochs, steps=steps,
                data_loader=data_loader, poisson_sampling=poisson_sampling, distributed=distributed,
                noise_multiplier=noise_multiplier, generator=generator, secure=self.secure_mode)
        elif poisson_sampling:
            loader_cls = DistributedDPDataLoader if distributed else DPDataLoader
            loader = loader_cls.from_data_loader(data_loader, generator=generator,
                                                 secure=self.secure_mode)  # secure: the OS CSPRNG
            sample_rate = loader.sample_rate
            expected = loader.expected_batch_size
        else:
            # what the loader really does: its steps are accounted so (privacy/sampling.py)
            plan = sampling.analyse(data_loader, distributed=distributed)
            sampling.warn_not_poisson(plan)
            loader = data_loader
            sample_rate = 1 / len(data_loader)
            if data_loader.batch_size is None:
                raise ValueError("data_loader must have a batch_size when poisson_sampling=False")
            expected = float(data_loader.batch_size)
        # the accountant, not the engine: it outlives an engine nobody kept
        # (``PrivacyEngine().make_private(...)``) and holds what was spent
        owner = getattr(module, "_privacy_accountant", None) if isinstance(module, PrivateModule) else None
        if owner is not None and owner is not self.accountant:
            raise ValueError(
                "module was made private by another PrivacyEngine, whose accountant holds what "
                "it has spent: a second make_private with a new engine would restart the budget; "
                "call make_private again on that engine (it continues its accountant), or pass "
                "the original model (module.remove_hooks()) to start a new, separately accounted "
                "training")
        wrapped_here = not isinstance(module, PrivateModule)
        private = PrivateModule(module, grad_sample_mode=grad_sample_mode, batch_first=batch_first,
                                loss_reduction=loss_reduction) if wrapped_here else module
        try:
            dp_optimizer = self._optimizer(
                private, optimizer, distributed, poisson_sampling, expected, optimizer_class,
                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, clipping=clipping,
                sample_rate=sample_rate, max_epsilon=max_epsilon, delta=delta, seed=noise_seed,
                nonfinite=nonfinite, journal=journal,
                loader=loader if poisson_sampling or correlated is not None else None,
                correlated_noise=correlated)
        except BaseException:
            if wrapped_here:  # bad input leaves the user's model as it was
                private.remove_hooks()
            raise
        private._privacy_accountant = self.accountant  # a second engine is refused (budget restart)
        self.optimizer = dp_optimizer
        if plan is not None:
            sampling.attach(dp_optimizer, plan, loader)
        self.accounting_analysis = sampling.describe(plan, sample_rate, correlated)
        if criterion is not None:
            return private, dp_optimizer, criterion, loader
        return private, dp_optimizer, loader

    def _optimizer(self, private, optimizer, distributed, poisson_sampling, expected,
                   optimizer_class, *, journal, loader, **kw) -> DPOptimizer:
        """The DP optimizer of ``make_private`` (its data loader and journal attached)."""
        cls = DPOptimizer
        if distributed:
            import torch.distributed as dist

            cls = DistributedDPOptimizer
            # the denominator is the global expected batch size: with Poisson sampling the loader's
            # is already global (q N, N the whole dataset); a fixed per-rank batch_size is not
            if not poisson_sampling and dist.is_available() and dist.is_initialized():
                expected *= dist.get_world_size()
        if optimizer_class is not None:
            cls = optimizer_class
        dp_optimizer = cls(optimizer, module=private, expected_batch_size=expected,
                           accountant=self.accountant, secure_mode=self.secure_mode, **kw)
        if journal is not None:  # first: a journal in use elsewhere is refused before anything else
            dp_optimizer.attach_journal(journal)
        if loader is not None:
            dp_optimizer.attach_data_loader(loader)
        previous = self.optimizer
        if previous is not None and previous.seed == dp_optimizer.seed:
            # the same engine again with the same noise seed: continue its noise stream (an
            # offset range is never used twice, DESIGN.md invariant 3)
            dp_optimizer.offset = max(dp_optimizer.offset, previous.offset)
        return dp_optimizer

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | Sequence[float],
        epsilon_tolerance: float = 0.01,
        **kwargs,
    ) -> tuple[PrivateModule, DPOptimizer, DataLoader]:
        """``make_private`` with the smallest noise multiplier whose epsilon after ``epochs``
        epochs (``epochs * len(data_loader)`` steps) is at most ``target_epsilon``. With
        ``noise_mechanism="tree"`` or ``"banded_mf"`` (in ``kwargs``) the run is planned for those
        epochs and sigma is calibrated to the strategy's events
        (:func:`ppml_fast.privacy.correlated_plan.calibrate`)."""
        if not isinstance(data_loader, DataLoader) or len(data_loader) == 0:
            raise ValueError("data_loader must be a non-empty torch DataLoader")
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1; got {epochs!r}")
        steps = int(epochs) * len(data_loader)
        if kwargs.get("noise_mechanism", "gaussian") != "gaussian":  # tree / banded MF: the plan's events
            correlated = correlated_plan.plan(
                noise_mechanism=kwargs["noise_mechanism"], bands=kwargs.get("bands"), epochs=epochs,
                steps=kwargs.get("steps"), data_loader=data_loader, noise_multiplier=1.0,
                poisson_sampling=kwargs.get("poisson_sampling", True),
                distributed=kwargs.get("distributed", False))[0]
            sigma = correlated_plan.calibrate(correlated, target_epsilon=target_epsilon,
                                              target_delta=target_delta, accountant=self.accountant_name,
                                              epsilon_tolerance=epsilon_tolerance)
            kwargs.setdefault("max_epsilon", None)
            return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                     noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                                     epochs=epochs, **kwargs)
        if kwargs.get("poisson_sampling", True) is False and kwargs.get("noise_mechanism", "gaussian") == "gaussian":
            plan = sampling.analyse(data_loader, distributed=bool(kwargs.get("distributed", False)))
            sigma = sampling.calibrate(plan, steps=steps,  # the honest account of the loader's batches
                                       target_epsilon=target_epsilon, target_delta=target_delta,
                                       accountant=self.accountant_name, epsilon_tolerance=epsilon_tolerance)
        else:
            sigma = calibration.get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta,
                sample_rate=1 / len(data_loader), steps=steps, accountant=self.accountant_name,
                epsilon_tolerance=epsilon_tolerance)
        kwargs.setdefault("max_epsilon", None)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (infinity once a step ran with noise_multiplier 0),
        for the sampling the run really does: ``accounting_analysis`` says which analysis that is
        (Poisson sampling by default; with ``poisson_sampling=False`` the loader's own batches,
        one Gaussian per epoch without amplification: :mod:`ppml_fast.privacy.sampling`)."""
        eps = self.accountant.get_epsilon(delta)
        if self.optimizer is not None and getattr(self.optimizer, "unnoised_steps", 0):
            return math.inf
        return eps

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Loads a ``state_dict()`` atomically: validated first, nothing changes on an error
        (privacy/checkpoint.py ``load_engine_state``)."""
        checkpoint.load_engine_state(self, state)

    def save_checkpoint(self, path, *, module, optimizer=None, noise_scheduler=None,
                        grad_clip_scheduler=None, checkpoint_dict=None,
                        module_state_dict_kwargs=None, torch_save_kwargs=None) -> None:
        """Opacus's ``save_checkpoint``: module, accountant, optimizer and scheduler states
        in one ``torch.save`` dict at ``path``, written atomically (privacy/checkpoint.py)."""
        checkpoint.save_checkpoint(
            self, path, module=module, optimizer=optimizer, noise_scheduler=noise_scheduler,
            grad_clip_scheduler=grad_clip_scheduler, checkpoint_dict=checkpoint_dict,
            module_state_dict_kwargs=module_state_dict_kwargs, torch_save_kwargs=torch_save_kwargs)

    def load_checkpoint(self, path, *, module, optimizer=None, noise_scheduler=None,
                        grad_clip_scheduler=None, module_load_dict_kwargs=None,
                        torch_load_kwargs=None) -> dict:
        """Opacus's ``load_checkpoint``, atomic; returns the checkpoint's other entries. With a
        journal (``make_private(journal=)``) the steps released after the checkpoint are counted
        and the noise continues after them (privacy/checkpoint.py)."""
        return checkpoint.load_checkpoint(
            self, path, module=module, optimizer=optimizer, noise_scheduler=noise_scheduler,
            grad_clip_scheduler=grad_clip_scheduler,
            module_load_dict_kwargs=module_load_dict_kwargs, torch_load_kwargs=torch_load_kwargs)

"""DPOptimizer: DP-SGD's step around any ``torch.optim.Optimizer``, in stages a subclass can
override one at a time (Abadi et al. 2016, Algorithm 1):

1. :meth:`clip_and_accumulate` — per-sample clipping of the captured batches, summed;
2. :meth:`add_noise` — N(0, (sigma C)^2) on each coordinate of the sums;
3. :meth:`scale_grad` — divide by the expected batch size (Poisson sampling: q N);
4. the wrapped optimizer's own ``step()`` on those gradients.
Stages 2 and 3 run as one native pass (``ppml_fast.ops.noisy_scale_``) unless a subclass
overrides either. Privacy state — the accountant's history, the noise seed and offset, the step
count — lives in this object and round-trips through ``state_dict()`` (validated and atomic:
:mod:`ppml_fast.privacy.state`). With a journal (:mod:`ppml_fast.privacy.journal`) each step's
event and noise range are durably recorded before its noise exists, and a loaded state counts
every step recorded after it. A step that fails after clipping leaves no un-noised gradient in
``p.grad`` and its state as before (:mod:`ppml_fast.privacy.release`); the budget stop asks the
accountant that reports epsilon (:mod:`ppml_fast.privacy.budget`).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch

from ppml_fast import noise_keys, ops
from ppml_fast.ops import noise
from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent
from ppml_fast.accounting.errors import PrivacyBudgetExceeded
from ppml_fast.privacy import release, state as _state
from ppml_fast.privacy.budget import BudgetStop
from ppml_fast.privacy.module import PrivateModule
from ppml_fast.privacy.one_batch import SampledBatches
from ppml_fast.privacy.per_sample import sum_dtype

CLIPPING = ("flat", "per_layer", "automatic")
NONFINITE = ("raise", "drop")


def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
    return float(v)


class DPOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` (whose parameters are ``module``'s) so that ``step()`` is a DP-SGD step.

    It is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are the
    wrapped optimizer's own objects, so learning-rate schedulers (torch's and transformers'),
    ``zero_grad(set_to_none=)``, step hooks and ``torch.amp.GradScaler`` work on it. Between
    ``backward()`` and ``step()`` the parameters' ``.grad`` stays None: the per-sample
    information lives in the captured batches, and the only gradient ever written is the noisy
    one (so ``clip_grad_norm_`` there sees nothing to clip: clipping is per sample, here).
    With a GradScaler, the loss scale is divided out before the per-sample norms are taken, and
    the scaler is told that no step overflowed (skipping a step because some record's gradient
    overflowed would release which batches held such a record): records whose gradient is not
    finite follow ``nonfinite`` (use ``nonfinite="drop"`` with float16 autocast).

    Args:
        optimizer: any torch optimizer over the module's trainable parameters.
        module: the :class:`PrivateModule` whose captured batches are clipped.
        noise_multiplier: sigma, the noise std as a multiple of the clipping norm (>= 0; 0 means
            no noise and no privacy: such steps are counted in ``unnoised_steps`` and the
            engine's ``get_epsilon`` reports infinity once one has run).
        max_grad_norm: C; for ``clipping="per_layer"`` either one per trainable parameter (bound
            to the parameters trainable now, in ``parameters()`` order, as Opacus takes them) or
            one number for every parameter. Per-layer noise uses the L2 norm of the norms of the
            parameters it is added to (one sample's clipped gradient has at most that norm), as
            Opacus does: one number C for K parameters gives noise std sigma * C * sqrt(K).
        expected_batch_size: the denominator of the average (q N for Poisson sampling).
        clipping: "flat", "per_layer" or "automatic" (Bu et al. 2023: C / (||g|| + gamma)).
        accountant, sample_rate: each step composes PoissonSampled(sample_rate, Gaussian(sigma)).
        max_epsilon, delta: the budget; the step that would pass it raises PrivacyBudgetExceeded
            before any parameter or state changes.
        seed: Philox key of the noise (None: from os.urandom); ``secure_mode``: ChaCha20 noise.
        nonfinite: "raise" (default) or "drop" (zero the samples whose gradient is not finite).
        correlated_noise: a :class:`~ppml_fast.privacy.correlated_noise.CorrelatedNoise` (tree
            aggregation / banded MF): step t adds sigma C w_t instead of a fresh Gaussian, the
            accountant composes its ``event`` (None: nothing), and a step past its plan, or at
            another noise std, is refused before anything changes. None: DP-SGD's noise.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        module: PrivateModule,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        expected_batch_size: float,
        clipping: str = "flat",
        accountant=None,
        sample_rate: Optional[float] = None,
        max_epsilon: Optional[float] = None,
        delta: Optional[float] = None,
        seed: Optional[int] = None,
        secure_mode: bool = False,
        nonfinite: str = "raise",
        gamma: float = 0.01,
        correlated_noise=None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer is already a DPOptimizer (clipping and noise twice); pass "
                            "its original_optimizer")
        if not isinstance(module, PrivateModule):
            raise TypeError(f"module must be a PrivateModule; got {type(module).__name__}")
        if clipping not in CLIPPING:
            raise ValueError(f"clipping must be one of {CLIPPING}; got {clipping!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}; got {nonfinite!r}")
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real) \
                or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier!r}")
        n_params = len(module.trainable_parameters())
        if clipping == "per_layer" and not isinstance(max_grad_norm, numbers.Real):
            norms = [_positive("max_grad_norm", c) for c in max_grad_norm]
            if len(norms) != n_params:
                raise ValueError(f"max_grad_norm must hold one norm per trainable parameter "
                                 f"({n_params}); got {len(norms)}")
            max_grad_norm = norms
        else:
            max_grad_norm = _positive("max_grad_norm", max_grad_norm)
        expected_batch_size = _positive("expected_batch_size", expected_batch_size)
        if correlated_noise is not None and noise_multiplier == 0:
            raise ValueError("noise_multiplier must be > 0 with correlated noise; got 0")
        if max_epsilon is not None:
            max_epsilon = _positive("max_epsilon", max_epsilon)
            if delta is None or accountant is None or sample_rate is None:
                raise ValueError("max_epsilon needs delta, an accountant and sample_rate")
        # a seed is an error in secure mode; None: a key from OS entropy (noise_keys)
        seed_given = noise_keys.noise_seed("seed", seed, secure=bool(secure_mode)) is not None
        seed = noise_keys.os_key() if seed is None else seed
        own = {id(p) for p in module.trainable_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in own and p.requires_grad:
                    raise ValueError("optimizer holds a parameter that is not a trainable parameter "
                                     "of module; build the optimizer on module.parameters()")
        self.original_optimizer = optimizer
        self.module = module
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = max_grad_norm
        # per_layer with a list: each norm bound to its parameter now (a parameter frozen or
        # unfrozen later must not shift the list onto other parameters)
        self._layer_norms: dict[int, float] = (
            {id(p): c for p, c in zip(module.trainable_parameters(), max_grad_norm)}
            if isinstance(max_grad_norm, list) else {})
        self.expected_batch_size = expected_batch_size
        self.clipping = clipping
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.max_epsilon = max_epsilon
        self.delta = delta
        self.seed = int(seed)
        self.offset = 0
        # a forked child (DataLoader worker, multiprocessing) gets its own key: fresh from OS
        # entropy, or derived from a user seed and the fork number (ppml_fast.noise_keys)
        noise_keys.rekey_after_fork(self, "seed", user_seeded=seed_given)
        self._seed_given = seed_given  # an OS-drawn key never leaves the process (state_dict)
        self.secure_mode = bool(secure_mode)
        self.nonfinite = nonfinite
        self.gamma = gamma
        self.steps = 0
        self.unnoised_steps = 0  # steps taken with noise_multiplier 0: epsilon is infinite
        self._summed: dict = {}
        self._samples = 0
        self._skip_next = False
        self._last_step_skipped = False
        self.step_hooks: list[Callable[["DPOptimizer"], None]] = []
        self._budget = BudgetStop()  # the budget stop's exact fast paths (privacy/budget.py)
        self.journal = None  # a PrivacyJournal: set by make_private(journal=) / attach_journal
        self.correlated = correlated_noise  # CorrelatedNoise or None (privacy/correlated_noise.py)
        self._optimizer_hooks()

    def _optimizer_hooks(self) -> None:
        """What ``torch.optim.Optimizer.__init__`` sets up besides the parameter groups (which
        are the wrapped optimizer's: not rebuilt here): hook registries and the step wrapper
        that runs step hooks (used by LR schedulers' step counting)."""
        from collections import OrderedDict

        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            self.__dict__.setdefault(name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # GradScaler calls step(grad_scaler=...) instead of unscaling .grad (which is None here)
    _step_supports_amp_scaling = True

    def __getstate__(self) -> dict:
        """pickle / deepcopy / torch.save: everything (Optimizer keeps 3 fields) except what would
        let a holder of the bytes regenerate released noise: an OS-drawn key is left out (the
        copy is re-keyed from OS entropy) and correlated noise's kept vectors are dropped (the
        copy starts a new segment, accounted on its own). A user seed travels: its noise is
        reproducible by design."""
        state = self.__dict__.copy()
        if not state.get("_seed_given", True):
            state["seed"] = None
            c = state.get("correlated")
            if c is not None:
                state["correlated"] = c.resumed(c.state_dict(), like=[], seed=None, exact=False)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.seed is None:
            self.seed = noise_keys.os_key()
        self._optimizer_hooks()

    # -- the torch.optim.Optimizer surface ------------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The optimizer's trainable parameters (frozen ones get no gradient, hence no noise)."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def add_param_group(self, group: dict) -> None:
        raise RuntimeError("adding parameter groups to a DPOptimizer is not supported")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients and the captured batches; the clipped sums of skipped (virtual)
        steps are kept until the real step."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.module.discard()
        if not self._last_step_skipped:
            self._summed, self._samples = {}, 0

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next ``step()`` only clips and accumulates (a physical part of a logical batch)."""
        self._skip_next = bool(do_skip)

    # -- the stages -----------------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        """sigma times the largest norm one sample's clipped gradient of the noised parameters
        can have: C, or for per-layer clipping the L2 norm of their per-parameter norms."""
        if self.clipping != "per_layer":
            return self.noise_multiplier * self.max_grad_norm
        norms = self._per_layer_norms(self.params)
        return self.noise_multiplier * math.sqrt(sum(c * c for c in norms.values()))

    def _per_layer_norms(self, params) -> dict[int, float]:
        """per_layer: id(parameter) -> its clipping norm, for ``params``."""
        if not isinstance(self.max_grad_norm, list):
            return {id(p): self.max_grad_norm for p in params}
        missing = [i for i, p in enumerate(params) if id(p) not in self._layer_norms]
        if missing:
            raise ValueError(
                f"step {self.steps}: per-layer max_grad_norm was given for the "
                f"{len(self._layer_norms)} parameters trainable when the optimizer was built; "
                f"trainable parameters {missing[:10]} (in parameters() order) were not among them "
                "(unfrozen since?); pass one max_grad_norm for all, or rebuild the optimizer")
        return {id(p): self._layer_norms[id(p)] for p in params}

    def clip_and_accumulate(self) -> None:
        norms = self.max_grad_norm
        if self.clipping == "per_layer":  # checked before anything changes
            norms = self._per_layer_norms(self.module.trainable_parameters())
            self._per_layer_norms(self.params)
        sums, seen = self.module.clipped_sums(
            max_grad_norm=norms, clipping=self.clipping, nonfinite=self.nonfinite,
            step=self.steps, gamma=self.gamma)
        for p, s in sums.items():
            if p in self._summed:
                self._summed[p].add_(s)
            else:
                self._summed[p] = s
        self._samples += seen

    def _grads(self) -> list[torch.Tensor]:
        """The summed clipped gradients, one per parameter (zeros where no sample touched it)."""
        out = []
        for p in self.params:
            s = self._summed.get(p)
            out.append(torch.zeros_like(p, dtype=sum_dtype(p)) if s is None else s)
        return out

    def add_noise(self, grads: list[torch.Tensor]) -> None:
        if self.correlated is not None:  # sigma C w_t from the offsets reserved for this step
            self.offset = self.correlated.add_(grads, self.noise_std, seed=self.seed,
                                               offset=self.offset, secure=self.secure_mode)
        elif self.noise_multiplier > 0:
            self.offset = ops.add_gaussian_noise_(grads, self.noise_std, seed=self.seed,
                                                  offset=self.offset, secure=self.secure_mode)

    def scale_grad(self, grads: list[torch.Tensor]) -> None:
        for g in grads:
            g.div_(self.expected_batch_size)

    def _noise_and_scale(self, grads: list[torch.Tensor]) -> None:
        cls = type(self)
        if (cls.add_noise is DPOptimizer.add_noise and cls.scale_grad is DPOptimizer.scale_grad
                and self.noise_multiplier > 0 and self.correlated is None):
            # the kernel itself, not the registered op: these are fresh, contiguous, same-device
            # tensors outside any autograd graph, and torch.library's dispatch costs ~0.1 ms a call
            # (~2% of a small model's step); ops.noisy_scale_ is the same computation
            noise.run_noise("sums", grads, self.noise_std, self.expected_batch_size, True,
                            self.seed, self.offset, self.secure_mode)
            self.offset += noise.blocks(grads)
        else:
            self.add_noise(grads)
            self.scale_grad(grads)

    def _noise_blocks(self, grads: list[torch.Tensor]) -> int:
        """Philox blocks this step's noise uses (reserved and journaled before it is drawn)."""
        return noise.blocks(grads) if self.correlated is None else self.correlated.blocks(grads)

    # -- accounting -----------------------------------------------------------------------------
    def _event(self):
        if self.correlated is not None:  # the strategy's per-step event (None: nothing)
            return self.correlated.event(self.steps, self.noise_multiplier)
        if getattr(self, "sampling", None) is not None:  # poisson_sampling=False: privacy/sampling.py
            return self.sampling.event(self)
        return PoissonSampledEvent(self.sample_rate, GaussianEvent(self.noise_multiplier))

    def _check_budget(self) -> None:
        release.check_settings(self)  # a NaN sigma or bad offset is refused before clipping
        if self.max_epsilon is None:
            return
        if self.noise_multiplier == 0:
            raise PrivacyBudgetExceeded(f"step {self.steps}: noise_multiplier is 0, so any step "
                                        "spends an infinite epsilon", epsilon=math.inf,
                                        epsilon_budget=self.max_epsilon, delta=self.delta)
        event = self._event()
        if event is not None:  # correlated noise: some steps release nothing new
            self._budget.check(self.accountant, event, max_epsilon=self.max_epsilon,
                               delta=self.delta, step=self.steps)

    def attach_data_loader(self, loader) -> None:
        """Ties this optimizer to the Poisson loader it steps on (``make_private`` does): a step
        that holds the records of more than one sampled batch of it is refused
        (:class:`~ppml_fast.privacy.one_batch.SampledBatches`). Correlated noise's loaders
        (cyclic Poisson, fixed batches) also fix which batch each step must use
        (:mod:`ppml_fast.privacy.fixed_batches`)."""
        from ppml_fast.privacy import fixed_batches

        self._order = fixed_batches.guard(loader)  # correlated noise: the accounted batch order
        if not isinstance(loader, fixed_batches.FixedBatchesDataLoader):
            self._batches = SampledBatches(loader)

    def _check_one_sampled_batch(self) -> None:
        """Refuses, before anything changes, a step holding more than one sampled batch."""
        batches = getattr(self, "_batches", None)
        if batches is not None:
            done = [b.size for b in self.module.recorder.batches if b.backpropagated]
            batches.check(self._samples + sum(done), self.steps, forwards=len(done))

    # -- step -----------------------------------------------------------------------------------
    def _reduce(self, grads: list[torch.Tensor]) -> None:
        """Hook between accumulation and noise: the distributed optimizer sums across ranks."""

    def pre_step(self) -> bool:
        """Clip and accumulate; for a real step also check the budget, add noise, scale and set
        ``p.grad``. Returns whether the wrapped optimizer should step."""
        skip = self._skip_next
        if self.correlated is not None:  # the plan and the std, before anything changes
            self.correlated.check_step(self.steps, self.noise_std, sigma=self.noise_multiplier)
        if not skip:
            self._check_one_sampled_batch()  # before anything changes
            if getattr(self, "_order", None) is not None:  # and at most that batch's records
                pending = sum(b.size for b in self.module.recorder.batches if b.backpropagated)
                self._order.check(self.steps, getattr(self.correlated, "segment_start", 0),
                                  records=self._samples + pending)
            self._check_budget()
        self.clip_and_accumulate()
        self._skip_next = False
        self._last_step_skipped = skip
        if skip:
            return False
        # reduce, journal, noise, account, then p.grad; fails closed (privacy/release.py)
        try:
            release.finish_step(self)
        except BaseException:
            if self.correlated is not None:  # a failed step's w_t is forgotten, never kept
                self.correlated.discard()
            raise
        if self.correlated is not None:
            self.correlated.commit(self.noise_std, self.noise_multiplier)
        if getattr(self, "_order", None) is not None:
            self._order.stepped()
        self.steps += 1
        self._summed, self._samples = {}, 0
        if getattr(self, "_batches", None) is not None:
            self._batches.stepped()
        for hook in self.step_hooks:
            hook(self)
        return True

    def step(self, closure: Optional[Callable[[], float]] = None, grad_scaler=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = 1.0 if grad_scaler is None else float(grad_scaler.get_scale())
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"grad_scaler's scale must be a finite number > 0; got {scale!r}")
        self.module.loss_scale = scale  # divided out of the captured gradients (clipping.py)
        try:
            stepped = self.pre_step()
        finally:
            self.module.loss_scale = 1.0
        if grad_scaler is not None:
            _no_overflow(grad_scaler, self)
        if stepped:
            self.original_optimizer.step()
        return loss

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Noise multiplier, noise key and offset, step counts, the accountant's and the wrapped
        optimizer's states, and the journal position (how many records the state counts)."""
        return _state.save(self)

    def load_state_dict(self, state: dict) -> None:
        """Loads a ``state_dict()`` atomically: every field is validated first and on an error
        nothing changes (not the wrapped optimizer, not the accountant). With a journal, every
        step recorded after the state was saved is counted and the noise continues after the
        last reserved offset; without one the noise is re-keyed (privacy/state.py)."""
        _state.load(self, state)

    def attach_journal(self, journal):
        """Records every later step in ``journal`` (a path or PrivacyJournal) before its noise
        exists; the records already in it are counted (privacy/state.py ``attach``)."""
        return _state.attach(self, journal)

    def __repr__(self) -> str:
        return (f"DPOptimizer({type(self.original_optimizer).__name__}, noise_multiplier="
                f"{self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, clipping={self.clipping!r})")


def _no_overflow(grad_scaler, optimizer: DPOptimizer) -> None:
    """Tells ``grad_scaler`` (``torch.amp.GradScaler``) that this step found no inf: its
    ``update()`` needs one check per optimizer, and the DP step never skips because of the data
    (non-finite records follow ``nonfinite``)."""
    device = next((p.device for p in optimizer.params), torch.device("cpu"))
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"] = {device: torch.zeros((), dtype=torch.float32, device=device)}


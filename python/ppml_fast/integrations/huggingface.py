"""Differentially private fine-tuning with the Hugging Face ``Trainer``: :class:`DPTrainer` and
:class:`PrivacyArguments`. DP-SGD (Abadi et al. 2016, Algorithm 1) runs on ppml_fast's engine
(:class:`~ppml_fast.privacy.PrivacyEngine`); the Trainer keeps its loop, logging, evaluation and
checkpoints::

    from ppml_fast.integrations.huggingface import DPTrainer, PrivacyArguments

    trainer = DPTrainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=32,
                        gradient_accumulation_steps=4, num_train_epochs=3),
                        train_dataset=train, data_collator=collator,
                        privacy=PrivacyArguments(target_epsilon=8.0, target_delta=1e-5,
                                                 max_grad_norm=1.0))
    trainer.train()            # logs "epsilon" with the loss at every logging step
    trainer.epsilon()          # the engine accountant's epsilon at target_delta

What the Trainer's pieces become (the hooks overridden; also ``create_optimizer``, so that a
later ``train()`` goes on with the same DP optimizer, and ``get_resumed_dataloader``):

- ``get_train_dataloader``: one Poisson sample (each record in it independently with
  probability q; the engine's :class:`~ppml_fast.privacy.data.DPDataLoader`, with the Trainer's
  collator) per optimizer step. The expected *logical* batch is
  ``per_device_train_batch_size * gradient_accumulation_steps`` records (q = 1 / ceil(N / that),
  Opacus's rule); the sample is handed to the Trainer as ``gradient_accumulation_steps`` parts,
  and each part runs in physical chunks of at most ``per_device_train_batch_size`` records that
  are clipped into the same step (:mod:`ppml_fast.integrations._hf_parts`). Accumulating k
  independently sampled batches would count one sampling for k (the engine refuses it).
  An empty sample is a step too: no forward runs, and the step releases noise alone and is
  accounted (skipping it would change the sampling the accountant assumes).
- ``create_scheduler`` (called by ``train()`` after the optimizer is built and prepared): makes
  the model and optimizer private (``PrivacyEngine.make_private``; the noise multiplier calibrated
  to ``target_epsilon`` over the run's optimizer steps, the Trainer's ``max_steps``), then builds
  the learning-rate scheduler on the wrapped torch optimizer (``dp_optimizer.original_optimizer``:
  their ``param_groups`` are the same), so every Trainer scheduler works.
- ``training_step``: per-record losses (:meth:`DPTrainer.compute_per_record_loss`, summed;
  ``loss_reduction="sum"``), backward, and the part's chunks clipped into the step
  (``signal_skip_step``); the Trainer's ``optimizer.step()`` is the DP step: clipped sum + noise,
  divided by the expected logical batch size q N. Why per-record losses: see
  :mod:`ppml_fast.integrations._hf_loss` (a token mean over the batch is not a per-record mean).
  The loss returned for logging is the mean per-record loss of the logical batch.
- ``log``: adds ``"epsilon"`` (the engine accountant's, at ``target_delta``) to every log;
  ``grad_norm`` is not logged (no gradient exists before the DP step: the pre-step norm the
  Trainer would log is not private, the Trainer's ``max_grad_norm`` clipping has nothing to act
  on; the DP clipping norm is ``PrivacyArguments.max_grad_norm``).
- Budget stop (``max_epsilon``, by default ``target_epsilon``): after each step, when the next
  one would make the accountant report more than ``max_epsilon``, training stops
  (``control.should_training_stop``) and a checkpoint is saved (unless ``save_strategy="no"``),
  with the privacy state in the optimizer's state dict. ``stopped_by_budget`` says it happened.

Checkpoints are secrets: ``optimizer.pt`` holds the DP optimizer's state, with the noise key and
offset (what resuming needs); whoever has it and two successive model checkpoints can remove the
noise of the steps between them. ``push_to_hub`` with ``hub_strategy`` "checkpoint" or
"all_checkpoints" (which upload optimizer states) is refused; the default ("every_save")
uploads model weights only.

What epsilon does not cover: the training loss the Trainer logs (and ``train_loss``,
``num_input_tokens_seen``, ``total_flos``) is computed from the sampled records without noise,
as in any DP-SGD loop that prints its loss; keep such logs private. Speed: the engine proves once
per input layout that rows are records (two extra forwards); a padding collator that pads each
batch to its longest record makes a new layout per length, so pad to a fixed length
(``padding="max_length"``) where lengths vary much.

Privacy state lives in the engine (``trainer.privacy_engine``, ``trainer.dp_optimizer``), not in
``TrainingArguments``. Not supported (refused at construction): several processes or GPUs,
fp16/bf16 mixed precision, ``torch_compile``, ``auto_find_batch_size``, ``model_init``
(hyperparameter search), iterable datasets, a ``compute_loss`` override without a
``compute_per_record_loss`` one and ``compute_loss_func`` (batch losses: training never calls
them; DP-SGD needs each record's loss), and (when ``train()`` starts) a trainable T5-style
``relative_attention_bias`` (an Embedding whose output every record shares: freeze it).
``TrainingArguments.max_grad_norm`` is ignored (warned when set): the DP clipping norm is
``PrivacyArguments.max_grad_norm``. The
Poisson sampler is keyed from OS entropy (``sampling_seed`` makes it reproducible, and then not
private against whoever knows the seed), never from ``TrainingArguments.seed`` (42 by default).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent, calibration
from ppml_fast.accounting.errors import PrivacyBudgetExceeded
from ppml_fast.integrations._hf_args import PrivacyArguments
from ppml_fast.integrations._hf_loss import per_record_loss
from ppml_fast.integrations._hf_parts import AsDict, Part, PoissonParts, records_in, slice_batch
from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy.budget import BudgetStop

__all__ = ["DPTrainer", "PrivacyArguments", "per_record_loss"]


def _transformer(model):
    """The transformers model under a peft wrapper (``get_base_model``: for LoRA-style tuners
    ``base_model.model``, for prompt learning ``base_model`` itself), else ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if hasattr(model, "peft_config") and callable(get) else model


def _virtual_tokens(model) -> int:
    """Virtual tokens a peft prompt-learning model puts before the input tokens (prompt tuning,
    p-tuning; 0 for prefix tuning, whose prefix is in the attention's keys and values)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    if str(getattr(config.peft_type, "value", config.peft_type)) == "PREFIX_TUNING":
        return 0
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


class _PrivacyCallback(TrainerCallback):
    """Refuses a run whose first step would pass the budget; stops (and saves) before the step
    that would pass it."""

    def __init__(self, trainer: "DPTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        if t.dp_optimizer is not None and not t.next_step_fits():
            raise PrivacyBudgetExceeded(
                f"the next step would spend more than max_epsilon {t.privacy.budget:g} at delta "
                f"{t.privacy.target_delta:g} (now epsilon {t.epsilon():.4g}); nothing was trained",
                epsilon=t.epsilon(), epsilon_budget=t.privacy.budget, delta=t.privacy.target_delta)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if t.dp_optimizer is not None and not t.next_step_fits():
            t.stopped_by_budget = True
            control.should_training_stop = True
            control.should_log = True
            control.should_save = args.save_strategy != "no"
        return control


def _refuse_ignored_losses(cls: type, compute_loss_func) -> None:
    """Training calls :meth:`DPTrainer.compute_per_record_loss`, never ``compute_loss`` nor
    ``compute_loss_func`` (a batch loss: its gradient is not a sum of per-record gradients, so
    it cannot be clipped per record). A loss given only through those would be silently
    replaced by the default per-record loss in training (and used in evaluation): refused."""
    how = ("override DPTrainer.compute_per_record_loss(self, model, inputs) to return the loss of "
           "each record, shape (B,), each from that record alone (DP-SGD clips per record, so a "
           "loss over the batch cannot be used)")
    if compute_loss_func is not None:
        raise ValueError(f"DPTrainer does not use compute_loss_func (training would silently use "
                         f"the default per-record loss instead); {how}")
    if cls.compute_loss is not Trainer.compute_loss and \
            cls.compute_per_record_loss is DPTrainer.compute_per_record_loss:
        raise TypeError(f"{cls.__name__} overrides compute_loss, which DPTrainer's training step does "
                        f"not call (only evaluation does); {how}. Override both where evaluation "
                        "should use your compute_loss too")


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD; ``privacy`` says how (see the module
    docstring). Every other argument is the Trainer's. After ``train()`` (or during it):
    ``privacy_engine``, ``dp_optimizer``, ``private_model`` (the model wrapped for clipping; the
    Trainer's ``model`` stays the user's) and :meth:`epsilon`."""

    def __init__(self, *args, privacy: PrivacyArguments, **kwargs) -> None:
        if not isinstance(privacy, PrivacyArguments):
            raise TypeError(f"privacy must be a PrivacyArguments; got {type(privacy).__name__}")
        training = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training, "push_to_hub", False) and str(getattr(
                training.hub_strategy, "value", training.hub_strategy)) in ("checkpoint", "all_checkpoints"):
            # before the Trainer's __init__, which would create the hub repository
            raise ValueError("DPTrainer does not support push_to_hub with hub_strategy "
                             f"{str(getattr(training.hub_strategy, 'value', training.hub_strategy))!r}: "
                             "a checkpoint's optimizer state holds the noise key; use 'every_save' "
                             "or 'end' (model weights only)")
        _refuse_ignored_losses(type(self), kwargs.get("compute_loss_func"))
        super().__init__(*args, **kwargs)
        _refuse_ignored_losses(type(self), getattr(self, "compute_loss_func", None))  # positional
        self._refuse_unsupported()
        self.privacy = privacy
        self._warn_ignored_arguments()
        engine_kwargs = {"secure_mode": privacy.secure_mode}
        if privacy.accountant is not None:
            engine_kwargs["accountant"] = privacy.accountant
        self.privacy_engine = PrivacyEngine(**engine_kwargs)
        self.dp_optimizer = None
        self.private_model = None
        self.stopped_by_budget = False
        self._parts: Optional[PoissonParts] = None
        self._budget = BudgetStop()
        self.add_callback(_PrivacyCallback(self))

    def _refuse_unsupported(self) -> None:
        a = self.args
        problems = [name for name, bad in (
            ("several processes (world_size > 1)", a.world_size > 1),
            ("several GPUs in one process (n_gpu > 1)", a.n_gpu > 1),
            ("fp16", a.fp16), ("bf16", a.bf16), ("torch_compile", a.torch_compile),
            ("auto_find_batch_size (the batch size fixes the sampling rate)", a.auto_find_batch_size),
            ("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled),
            ("model_init / hyperparameter_search (each trial is a new training to account)",
             self.model_init is not None),
        ) if bad]
        if isinstance(self.train_dataset, IterableDataset):
            problems.append("an IterableDataset (Poisson sampling needs a dataset with len and indices)")
        if problems:
            raise ValueError("DPTrainer does not support " + "; ".join(problems))

    def _warn_ignored_arguments(self) -> None:
        """TrainingArguments.max_grad_norm clips the summed gradient, which no DP step has: say
        that it is ignored when it is set (not the default 1.0, not 0 / None: no clipping)."""
        c = self.args.max_grad_norm
        if c is not None and c != 0 and c != 1.0:
            warnings.warn(
                f"DPTrainer ignores TrainingArguments.max_grad_norm={c:g}: DP-SGD clips each "
                f"record's gradient to PrivacyArguments.max_grad_norm (here "
                f"{self.privacy.max_grad_norm:g}); set that one", UserWarning, stacklevel=3)

    # -- data -----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> PoissonParts:
        """The Poisson loader, as ``gradient_accumulation_steps`` parts per logical batch (made
        once; the engine's DPDataLoader is attached by :meth:`create_scheduler`)."""
        if self._parts is not None:
            return self._parts
        if self.train_dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset")
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets  # optional: Hugging Face datasets lose their unused columns here
        except ImportError:
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        k = self.args.gradient_accumulation_steps
        logical = self._train_batch_size * k
        if logical > len(dataset):
            raise ValueError(f"the expected logical batch (per_device_train_batch_size x "
                             f"gradient_accumulation_steps = {logical}) must not exceed the "
                             f"{len(dataset)} training records")
        base = DataLoader(dataset, batch_size=logical, collate_fn=AsDict(collator),
                          num_workers=self.args.dataloader_num_workers,
                          pin_memory=self.args.dataloader_pin_memory)
        self._parts = PoissonParts(base, k)
        return self._parts

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """Resuming mid-epoch draws fresh Poisson samples (skipping batches of a random
        sampler would not restore anything); the Trainer still runs only the remaining steps."""
        return dataloader

    # -- privacy --------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The Trainer's optimizer; on a later ``train()``, the DP optimizer's wrapped one (so
        that accelerate prepares a plain torch optimizer, whose state it round-trips, not the DP
        optimizer, whose reload would re-key the noise); :meth:`create_scheduler` puts the DP
        optimizer back."""
        if self.dp_optimizer is not None:
            self.optimizer = self.dp_optimizer.original_optimizer
            return self.optimizer
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Makes model and optimizer private (once), then the scheduler on the wrapped torch
        optimizer (``optimizer`` is ignored: it is always ``dp_optimizer.original_optimizer``)."""
        self._make_private(num_training_steps)
        if self.lr_scheduler is None:
            super().create_scheduler(num_training_steps, optimizer=self.dp_optimizer.original_optimizer)
        return self.lr_scheduler

    def _make_private(self, steps: int) -> None:
        inner = self.optimizer
        while isinstance(inner, AcceleratedOptimizer):  # accelerate's wrapper: the torch optimizer
            inner = inner.optimizer
        if self.dp_optimizer is not None:  # a later train(): the same engine goes on accounting
            if inner is not self.dp_optimizer and inner is not self.dp_optimizer.original_optimizer:
                raise RuntimeError(
                    "the Trainer built a new optimizer after the model was made private; its "
                    "steps would not be private. A DPTrainer accounts one training of one model: "
                    "make a new DPTrainer for another")
            self.optimizer = self.dp_optimizer
            return
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"DPTrainer needs a torch optimizer to wrap; got {type(self.optimizer).__name__}")
        self._refuse_shared_embeddings()
        p, parts = self.privacy, self.get_train_dataloader()
        sample_rate = 1 / len(parts.base)
        sigma = p.noise_multiplier
        if sigma is None:  # the smallest sigma whose epsilon after the whole run is <= target
            sigma = calibration.get_noise_multiplier(
                target_epsilon=p.target_epsilon, target_delta=p.target_delta,
                sample_rate=sample_rate, steps=max(1, int(steps)),
                accountant=self.privacy_engine.accountant_name, epsilon_tolerance=p.epsilon_tolerance)
        generator = None
        if not p.secure_mode:  # never torch's global RNG: TrainingArguments.seed is 42 by default
            generator = torch.Generator()
            generator.manual_seed(p.sampling_seed if p.sampling_seed is not None
                                  else int.from_bytes(os.urandom(8), "little") >> 1)
        budget = p.budget
        private, dp_optimizer, dp_loader = self.privacy_engine.make_private(
            module=self.model, optimizer=inner, data_loader=parts.base, noise_multiplier=sigma,
            max_grad_norm=p.max_grad_norm, clipping=p.clipping, grad_sample_mode=p.grad_sample_mode,
            max_epsilon=budget, delta=p.target_delta if budget is not None else None,
            loss_reduction="sum", noise_seed=p.noise_seed, nonfinite=p.nonfinite,
            generator=generator)
        parts.dp_loader = dp_loader
        self.private_model, self.dp_optimizer, self.optimizer = private, dp_optimizer, dp_optimizer

    def epsilon(self) -> float:
        """The epsilon spent so far at ``target_delta`` (the engine accountant's)."""
        return self.privacy_engine.get_epsilon(self.privacy.target_delta)

    def next_step_fits(self) -> bool:
        """Whether one more step keeps the epsilon that the engine's accountant reports within
        the budget (always, with none). The engine's own budget check
        (:class:`~ppml_fast.privacy.budget.BudgetStop`: the accountant's history, with exact
        fast paths) on the event the next step composes (DESIGN.md invariant 5)."""
        dp, budget = self.dp_optimizer, self.privacy.budget
        if dp is None or budget is None:
            return True
        event = PoissonSampledEvent(dp.sample_rate, GaussianEvent(dp.noise_multiplier))
        try:
            self._budget.check(dp.accountant, event, max_epsilon=budget,
                               delta=self.privacy.target_delta, step=dp.steps)
        except PrivacyBudgetExceeded:
            return False
        return True

    # -- training -------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One part of a logical batch: per-record losses in chunks of at most
        ``per_device_train_batch_size`` records, each backpropagated and clipped into the current
        DP step. Returns the part's share of the logical batch's mean per-record loss."""
        if not isinstance(inputs, Part):
            raise TypeError("DPTrainer.training_step takes the parts of its own Poisson loader "
                            f"(get_train_dataloader); got {type(inputs).__name__}")
        if self.dp_optimizer is None:
            raise RuntimeError("DPTrainer.training_step runs inside train() (the model is made "
                               "private when train() builds the optimizer)")
        dp, private = self.dp_optimizer, self.private_model
        private.train()
        total = torch.zeros((), device=self.args.device)
        n, size = records_in(inputs), self.args.per_device_train_batch_size
        for start in range(0, n, size):  # an empty part runs nothing: the step is noise alone
            chunk = self._prepare_inputs(slice_batch(inputs, start, min(n, start + size)))
            with self.compute_loss_context_manager():
                losses = self.compute_per_record_loss(private, chunk)
            rows = min(n, start + size) - start
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (rows,):
                raise ValueError(f"compute_per_record_loss must return one loss per record, shape "
                                 f"({rows},); got {getattr(losses, 'shape', type(losses).__name__)}")
            losses.sum().backward()
            dp.signal_skip_step(True)  # clip this chunk into the step; the Trainer steps after the part
            dp.step()
            total += losses.detach().sum().to(total.device)
        return total / max(inputs.logical_size, 1)

    def compute_per_record_loss(self, model, inputs: dict) -> torch.Tensor:
        """The loss of each record of ``inputs``, shape (B,), each from that record alone
        (:func:`~ppml_fast.integrations._hf_loss.per_record_loss` on the model's logits and the
        ``labels``). Override for other heads; the sum of what it returns is differentiated.

        The labels are not passed to the model (its own batch-mean loss would go unused);
        an encoder-decoder model gets ``decoder_input_ids`` made from them
        (``prepare_decoder_input_ids_from_labels``, T5's ``_shift_right``) unless the batch has
        its own. peft models: the transformer is ``get_base_model()``; prompt and p-tuning put
        ``num_virtual_tokens`` before the input, so causal-LM labels get as many -100 first
        (as peft does)."""
        inputs = dict(inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DPTrainer needs 'labels' in the training batch (or an override of "
                             "compute_per_record_loss): the per-record loss is computed from them")
        base = self.accelerator.unwrap_model(self.model)
        config = getattr(base, "config", None)
        inner = _transformer(base)
        inputs.pop("labels")  # the model's own (batch-mean) loss is not used
        if getattr(config, "is_encoder_decoder", False) and inputs.get("decoder_input_ids") is None \
                and inputs.get("decoder_inputs_embeds") is None:
            # the decoder inputs the model would make from token labels itself (T5: _shift_right)
            prepare = getattr(inner, "prepare_decoder_input_ids_from_labels", None)
            if prepare is None or labels.dim() != 2:  # e.g. class labels: the model decides; its
                inputs["labels"] = labels             # own loss is left unused
            else:
                inputs["decoder_input_ids"] = prepare(labels=labels)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        causal = inner._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        virtual = _virtual_tokens(base) if causal else 0
        if virtual and logits.dim() == 3 and labels.dim() == 2 and \
                logits.shape[1] == labels.shape[1] + virtual:
            # peft prompt/p-tuning put the virtual tokens before the input (as peft does: -100)
            labels = torch.cat([labels.new_full((labels.shape[0], virtual), -100), labels], dim=1)
        return per_record_loss(logits, labels, causal_lm=causal,
                               problem_type=getattr(config, "problem_type", None),
                               label_smoothing=self.args.label_smoothing_factor)

    def _refuse_shared_embeddings(self) -> None:
        """T5-style relative attention biases (an Embedding called on a (T, T) table of position
        buckets that every record shares) have no per-record gradient the engine can compute:
        refused before training, with what to do, instead of at the first step."""
        shared = [name for name, mod in self.model.named_modules()
                  if name.rsplit(".", 1)[-1] == "relative_attention_bias"
                  and isinstance(mod, torch.nn.Embedding) and mod.weight.requires_grad]
        if shared:
            raise ValueError(
                f"DPTrainer cannot train {', '.join(shared)}: a relative attention bias is an "
                "Embedding over the (positions x positions) bucket table, one output shared by "
                "every record of the batch, whose per-record gradients the engine does not compute "
                "(it would refuse the first step). Freeze it before train(), e.g. "
                "`for n, p in model.named_parameters(): p.requires_grad_(p.requires_grad and "
                "'relative_attention_bias' not in n)` (its pretrained values are kept)")

    def _clip_grad_norm(self, model):
        """No pre-step clipping: no gradient exists before the DP step (which clips per record)."""
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        """Not logged: a norm of the gradient before the DP step's noise would not be private."""
        return None

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """The Trainer's log with ``"epsilon"`` (at ``target_delta``) once training has begun."""
        if self.dp_optimizer is not None:
            logs = {**logs, "epsilon": self.epsilon()}
        super().log(logs, start_time)

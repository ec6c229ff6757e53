"""Moving an Opacus training loop to ppml_fast: what maps to what, what differs, and
:func:`migration_report`, which tells before training whether a model (and optimizer) built for
Opacus goes through ``ppml_fast.privacy.PrivacyEngine``. Needs no Opacus install.

In most loops the change is the import: ``from ppml_fast.privacy import PrivacyEngine``; the
calls ``make_private(...)``, ``make_private_with_epsilon(...)`` and ``get_epsilon(delta)`` keep
Opacus's keyword names.

=========================================================  ===========================================================
Opacus 1.6                                                 ppml_fast
=========================================================  ===========================================================
``PrivacyEngine(accountant="prv", secure_mode=False)``     ``PrivacyEngine(accountant="pld", secure_mode=False)``:
                                                           accountants "pld" (default, tight as Opacus's PRV) and
                                                           "rdp"
accountant "rdp"                                           "rdp": more orders (to 1e4; Opacus's stop at 63) and
                                                           fractional orders by the exact series with a
                                                           certified tail: never above Opacus's RDP by more
                                                           than 5e-8 relative, up to 89% lower at small epsilon
accountant "prv" (Opacus's default)                        "pld" (numerical privacy-loss distributions, tight)
accountant "gdp"                                           none: Gaussian DP via the CLT is an approximation, not
                                                           a bound; use "rdp" or "pld"
``make_private(module=, optimizer=, data_loader=,          the same names; returns ``(PrivateModule, DPOptimizer,
noise_multiplier=, max_grad_norm=, ...)``                  DataLoader)``, or with ``criterion=`` ``(PrivateModule,
                                                           DPOptimizer, criterion, DataLoader)`` as Opacus's
                                                           ghost tutorials unpack it (the criterion unchanged;
                                                           its ``reduction`` sets ``loss_reduction``). Ghost
                                                           without ``criterion=`` returns three (Opacus: four)
``grad_sample_mode="hooks"`` (default), ``"functorch"``,   all accepted: ``"ghost"`` (default: per layer the
``"ew"``, ``"ghost"`` (+ ``criterion=``)                   cheaper of ghost norms and materialised per-sample
                                                           gradients, plain ``loss.backward()``) or
                                                           ``"materialize"``, which ``"hooks"``, ``"functorch"``
                                                           and ``"ew"`` name (the same exact per-sample
                                                           gradients); ``"no_op"`` and others raise ValueError
``accountant.history``, ``len(accountant)``                the same: ``(noise_multiplier, sample_rate,
                                                           num_steps)`` per entry, and their count
``clipping="flat" | "per_layer" | "adaptive"``             ``"flat" | "per_layer" | "automatic"`` (Bu et al.
                                                           2023); no "adaptive"
``noise_generator=torch.Generator``                        ``noise_seed=int`` (Philox key of the noise) and
                                                           ``generator=`` (the Poisson sampler's)
(none)                                                     ``max_epsilon=, delta=``: the step that would pass the
                                                           budget raises ``PrivacyBudgetExceeded`` first
``make_private_with_epsilon(target_epsilon=,               the same names; ours also takes ``epsilon_tolerance=``
target_delta=, epochs=, max_grad_norm=, ...)``
``get_epsilon(delta)``                                     ``get_epsilon(delta)``
``save_checkpoint`` / ``load_checkpoint``                  the same (atomic; with ``make_private(journal=)``
                                                           a crash's lost steps are counted on resume)
``GradSampleModule(model)``                                ``PrivateModule(model)``: no ``p.grad_sample``; hooks
                                                           keep activations and output gradients;
                                                           ``remove_hooks()`` returns the original model
``DPOptimizer``, a ``torch.optim.Optimizer``               also one (``param_groups``/``state`` are the wrapped
                                                           optimizer's): LR schedulers,
                                                           ``zero_grad(set_to_none=)``, ``torch.amp.GradScaler``;
                                                           ``p.grad`` stays None until ``step()`` writes the
                                                           noisy gradient
``DPOptimizer(optimizer, noise_multiplier=,                ``DPOptimizer(optimizer, module=PrivateModule, ...)``
max_grad_norm=, expected_batch_size=)``                    — the same stages (``clip_and_accumulate``,
                                                           ``add_noise``, ``scale_grad``) and
                                                           ``original_optimizer``; it also does the accounting
``BatchMemoryManager(data_loader=,                         ``ppml_fast.privacy.BatchMemoryManager`` with the same
max_physical_batch_size=, optimizer=)``                    arguments
``DPDataLoader.from_data_loader(loader)``                  ``ppml_fast.privacy.DPDataLoader.from_data_loader``
``ModuleValidator.fix(model)``                             ``fix_module(model)``: BatchNorm -> GroupNorm, **in
                                                           place** (Opacus returns a fixed copy); it does not
                                                           replace RNNs or MultiheadAttention
``ModuleValidator.validate(model)``                        :func:`migration_report` (or ``PrivateModule(model)``,
                                                           which raises ``UnsupportedModuleError``)
``ExponentialNoise`` / ``StepNoise`` / ``LambdaNoise``     the same classes and keywords in ``ppml_fast.privacy``
                                                           (no ``last_epoch``)
=========================================================  ===========================================================

Layers: Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, InstanceNorm1d/2d/3d and RMSNorm
have dedicated rules; plain ``nn.MultiheadAttention`` (self- and cross-attention, ``kdim``/``vdim``,
``add_bias_kv``, ``add_zero_attn``) is handled in place (no ``DPMultiheadAttention`` swap
needed, though Opacus's works too, through its Linear layers); any
other layer with parameters of its own goes through torch.func (exact for layers whose samples are
independent, but slower: it reruns the layer once per sample under ``vmap``). Refused:
BatchNorm (use ``fix_module``), InstanceNorm with ``track_running_stats=True``, Embedding with
``sparse``/``scale_grad_by_freq``/``max_norm``. torch's recurrent layers (``nn.RNN``/``LSTM``/``GRU``,
every option but ``PackedSequence`` inputs) need no swap: each weight matrix is a linear-rule call;
Opacus's ``DPRNN``/``DPLSTM``/``DPGRU`` work too: their parameters, registered again on the outer
module under torch's names, belong to the inner Linear layers whose calls use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ppml_fast.privacy import recurrent
from ppml_fast.privacy.layers import refusal, rule_for
from ppml_fast.privacy.ownership import is_container, owned_parameters

__all__ = ["LayerPlan", "MigrationReport", "migration_report"]



@dataclass(frozen=True)
class LayerPlan:
    """How the DP step treats one module: ``status`` is "rule" (per-sample norms by a dedicated
    rule; ``detail`` names it), "attention" (nn.MultiheadAttention's own path), "recurrent"
    (nn.LSTM / GRU / RNN: their weights as linear-rule calls), "torch.func" (the exact, slower
    fallback) or "refused" (``detail`` says why and what to do)."""

    name: str
    type: str
    status: str
    detail: str


@dataclass(frozen=True)
class MigrationReport:
    """What :func:`migration_report` found. ``problems`` stop ``make_private``; ``notes`` are
    changes an Opacus user makes but that do not stop it."""

    layers: tuple[LayerPlan, ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether ``PrivacyEngine().make_private`` accepts the model (and optimizer) as given."""
        return not self.problems

    def by_status(self, status: str) -> list[LayerPlan]:
        return [p for p in self.layers if p.status == status]

    def __str__(self) -> str:
        lines = [f"{'layer':<32} {'type':<24} {'status':<11} detail"]
        lines += [f"{p.name or '(model)':<32} {p.type:<24} {p.status:<11} {p.detail}" for p in self.layers]
        lines += [f"problem: {s}" for s in self.problems] + [f"note: {s}" for s in self.notes]
        lines.append("ok: make_private accepts this model" if self.ok else "not ok: fix the problems above")
        return "\n".join(lines)


def _from_opacus(obj: object) -> bool:
    return type(obj).__module__.split(".")[0] == "opacus"


def _unwrap(model: nn.Module, notes: list[str]) -> nn.Module:
    """The user's model inside an Opacus GradSampleModule (which ppml_fast must not get)."""
    inner = getattr(model, "_module", None)
    if _from_opacus(model) and isinstance(inner, nn.Module):
        notes.append(f"model is an Opacus {type(model).__name__}: pass the plain model "
                     "(model.to_standard_module() or model._module) to ppml_fast; reported below")
        return inner
    return model


def _plan(model: nn.Module) -> list[LayerPlan]:
    """The walk of ``PrivateModule`` (refusals, then one handler per module with parameters)."""
    plans: list[LayerPlan] = []
    claimed: set[int] = set()
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        why = refusal(name, mod)
        if why is not None:
            plans.append(LayerPlan(name, kind, "refused", why))
            continue
        if id(mod) in claimed:
            continue
        if isinstance(mod, nn.MultiheadAttention):
            claimed.update(id(m) for m in mod.modules())
            plans.append(LayerPlan(name, kind, "attention", "projections by the linear rule (any call)"))
            continue
        if recurrent.handles(mod) and "forward" not in mod.__dict__:
            plans.append(LayerPlan(name, kind, "recurrent", "weight matrices by the linear rule"))
            continue
        if is_container(mod):  # a ParameterDict/List: its parameters are its parent's
            continue
        owned = owned_parameters(mod)
        own = [n for n, p in owned.items() if p.requires_grad]
        if not own:
            continue
        in_containers = len(owned) > sum(p is not None for p in mod._parameters.values())
        spec = None if in_containers else rule_for(mod)
        if spec is not None:
            plans.append(LayerPlan(name, kind, "rule", spec[0]))
        else:
            plans.append(LayerPlan(name, kind, "torch.func",
                                   f"per-sample gradients of {', '.join(own)} by vmap (exact, slower)"))
    return plans


def _check_optimizer(model: nn.Module, optimizer: object, problems: list[str], notes: list[str]) -> None:
    inner = getattr(optimizer, "original_optimizer", None)
    if _from_opacus(optimizer) and isinstance(inner, torch.optim.Optimizer):
        notes.append(f"optimizer is an Opacus {type(optimizer).__name__}: pass "
                     "optimizer.original_optimizer (ppml_fast wraps it in its own DPOptimizer)")
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        problems.append(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        return
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"]
                  if p.requires_grad and id(p) not in trainable)
    if foreign:
        problems.append(f"optimizer holds {foreign} trainable parameter(s) that are not the model's; "
                        "build the optimizer on model.parameters()")


def migration_report(model: nn.Module, optimizer: Optional[object] = None) -> MigrationReport:
    """Checks whether ``model`` (and ``optimizer``), as built for Opacus, would train under
    ``ppml_fast.privacy.PrivacyEngine.make_private``, layer by layer; changes nothing.

    Args:
        model: the model (an Opacus ``GradSampleModule`` is looked into, with a note).
        optimizer: optionally the optimizer (an Opacus ``DPOptimizer`` is looked into).

    Returns:
        A :class:`MigrationReport`: one :class:`LayerPlan` per module that has trainable
        parameters of its own or is refused, the problems that stop ``make_private`` and notes.
        A layer whose ``forward`` returns something other than one tensor passes this check but
        fails on the torch.func path at the first step.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    notes: list[str] = []
    model = _unwrap(model, notes)
    layers = _plan(model)
    problems = [p.detail for p in layers if p.status == "refused"]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        notes.append("ppml_fast.privacy.fix_module(model) replaces BatchNorm by GroupNorm in place "
                     "(Opacus's ModuleValidator.fix returns a copy)")
    slow = [p.name or "(model)" for p in layers if p.status == "torch.func"]
    if slow:
        notes.append(f"{len(slow)} layer(s) use the torch.func fallback (exact, slower): {', '.join(slow)}")
    if optimizer is not None:
        _check_optimizer(model, optimizer, problems, notes)
    return MigrationReport(tuple(layers), tuple(problems), tuple(notes))

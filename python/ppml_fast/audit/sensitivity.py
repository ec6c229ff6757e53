"""check_sensitivity: measures, on the user's own model and loss, how far one record moves a DP
step — the quantity DP-SGD's epsilon assumes is at most C (Abadi et al. 2016, section 3.1:
each clipped per-example gradient has norm <= C, so adding or removing one example moves the
clipped sum by <= C, replacing one by <= 2C).

For neighbouring batches B and B' it runs one step of the real engine
(``PrivacyEngine().make_private`` with the user's settings) on each, from the same parameters,
with the noise removed, through a plain ``SGD(lr=1)`` so that Δθ = −grad = −(clipped sum) / E,
and reports ``||Δθ(B) − Δθ(B')|| · E / bound`` (:mod:`ppml_fast.audit.sensitivity_report`).

Noise removal: ``noise_multiplier=0``, not a shared noise seed. With a shared seed the two runs
add the same noise n, but ``fl(s + n) − fl(s' + n)`` differs from ``s − s'`` by the rounding of
``s + n`` (~u σ C √P over P coordinates), and for 16-bit parameters the gradient is rounded to
8 or 11 bits after the noise: the noise's rounding would swamp the measurement. With σ = 0 no
noise exists, so the difference is the clipped sums' alone. What this leaves unchecked: the
calibration of the noise (σ C) and the fused noise-and-scale kernel (σ > 0); the engine's own
noise tests and :func:`ppml_fast.audit.audit_dp_sgd` cover those.

Example::

    from ppml_fast.audit import check_sensitivity
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    report = check_sensitivity(model, nn.CrossEntropyLoss(), (x, y), max_grad_norm=1.0)
    print(report)             # max ratio, worst record and module, per trial
    assert report.ok

    # a Hugging Face model computing its loss from labels inside the inputs
    batch = ({"input_ids": ids, "attention_mask": mask, "labels": ids}, None)
    check_sensitivity(hf_model, lambda out: out.loss, batch, max_grad_norm=1.0,
                      grad_sample_mode="materialize")
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import numbers
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.audit import sensitivity_reference as reference
from ppml_fast.audit.neighbours import Records
from ppml_fast.audit.sensitivity_report import UNIT_ROUNDOFF, SensitivityReport, tolerance
from ppml_fast.privacy.engine import PrivacyEngine
from ppml_fast.privacy.module import PrivateModule
from ppml_fast.privacy.optimizer import DPOptimizer

NEIGHBOURS = ("remove", "replace")
_SET_BY_CHECKER = ("module", "optimizer", "data_loader", "poisson_sampling", "max_grad_norm",
                   "optimizer_class")
_IGNORED = ("noise_multiplier", "noise_seed", "max_epsilon", "delta", "generator")
_RANKED = 64  # records whose gradient norm is measured to pick the largest first


def model_loss(model: nn.Module, loss_fn: Callable, batch: tuple) -> torch.Tensor:
    """``loss_fn(model(inputs), target)`` (``loss_fn(model(inputs))`` when target is None);
    inputs a tensor, a tuple (``model(*inputs)``) or a dict (``model(**inputs)``)."""
    inputs, target = batch
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    loss = loss_fn(out) if target is None else loss_fn(out, target)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a scalar tensor (reduced over the batch as "
                         f"loss_reduction says); got {type(loss).__name__}"
                         + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    return loss


def _check_args(module, loss_fn, max_grad_norm, trials, neighbours, optimizer_class, kwargs) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"neighbours must be one of {NEIGHBOURS}; got {neighbours!r}")
    if isinstance(trials, bool) or not isinstance(trials, numbers.Integral) or trials < 1:
        raise ValueError(f"trials must be an int >= 1; got {trials!r}")
    norms = [max_grad_norm] if isinstance(max_grad_norm, numbers.Real) else max_grad_norm
    try:
        norms = list(norms)
    except TypeError:
        norms = [None]
    if not norms or any(isinstance(c, bool) or not isinstance(c, numbers.Real)
                        or not (math.isfinite(c) and c > 0) for c in norms):
        raise ValueError(f"max_grad_norm must be a finite number > 0 (or, with "
                         f"clipping='per_layer', a list of them); got {max_grad_norm!r}")
    if optimizer_class is not None and not (isinstance(optimizer_class, type)
                                            and issubclass(optimizer_class, DPOptimizer)):
        raise TypeError(f"optimizer_class must be a subclass of DPOptimizer; got {optimizer_class!r}")
    known = set(inspect.signature(PrivacyEngine.make_private).parameters) - {"self"}
    for k in kwargs:
        if k in _SET_BY_CHECKER:
            raise TypeError(f"{k} is set by check_sensitivity (pass max_grad_norm and "
                            "optimizer_class as its own arguments); remove it from the keywords")
        if k not in known:
            raise TypeError(f"unknown keyword {k!r}: check_sensitivity passes its other keywords to "
                            f"PrivacyEngine.make_private, which takes {sorted(known - set(_SET_BY_CHECKER))}")
    if kwargs.get("distributed"):
        raise ValueError("distributed=True is not supported: the checker runs one process")


def _bound(max_grad_norm, clipping: str, n_params: int, neighbours: str) -> float:
    """The largest move of the clipped sum by one record: C, or for per-layer clipping the L2
    norm of the per-parameter norms (C sqrt(K) for one C over K parameters); doubled for replace."""
    if clipping == "per_layer":
        c = (math.sqrt(sum(float(x) ** 2 for x in max_grad_norm))
             if not isinstance(max_grad_norm, numbers.Real) else float(max_grad_norm) * math.sqrt(n_params))
    else:
        c = float(max_grad_norm)
    return c if neighbours == "remove" else 2 * c


def _plan(records: Records, order: list[int], neighbours: str, trials: int) -> list[tuple[str, int]]:
    """The trials, most telling first: the largest-gradient records removed, and crafted records
    made from them added (remove) or put in their place (replace)."""
    floats = ["scaled", "negated"] if records.has_float() else []
    crafted = floats[:1] + (["cancel"] if records.has_sequence() else []) \
        + (["repeat", "mixed"] if records.has_tokens() else [])
    out: list[tuple[str, int]] = []
    for k, r in enumerate(order):
        if neighbours == "remove":
            out += [("remove", r)] + [(f"add {c}", r) for c in crafted]
            if k == 0:
                out += [("remove", j) for j in order[1:3]] + [("add copy", r)]
        else:
            out += [(f"replace {c}", r) for c in floats + crafted[len(floats[:1]):]]
            out += [("replace other", r)]
    seen, plan = set(), []
    for t in out:
        if t not in seen:
            seen.add(t)
            plan.append(t)
    return plan[:trials]


def _neighbour(records: Records, kind: str, r: int, order: list[int], gen: torch.Generator) -> tuple:
    if kind == "remove":
        return records.without(r)
    how, what = kind.split(" ", 1)
    if what == "other":
        other = next(j for j in order + list(range(records.size)) if j != r)
        rec = records.record(other)
    else:
        rec = records.crafted(what, r, gen)
    return records.plus(rec) if how == "add" else records.replaced(r, rec)


class _Stepper:
    """One wrapped deep copy of the user's model and its DP optimizer; ``run(batch)`` takes one
    step from the saved parameters and returns (parameter name -> −Δθ in float64, names read
    after a 16-bit rounding)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, records: Records, max_grad_norm,
                 optimizer_class, seed: int, kwargs: dict) -> None:
        self.loss_fn, self.seed = loss_fn, seed
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.dtypes = {n: p.dtype for n, p in model.named_parameters()}
        self.tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
        self.start = {n: t.detach().clone() for n, t in self.tensors.items()}
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        loader = DataLoader(list(range(records.size)), batch_size=records.size)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="poisson_sampling=False", category=UserWarning)
            self.private, self.opt, _ = PrivacyEngine().make_private(
                module=model, optimizer=sgd, data_loader=loader, noise_multiplier=0.0,
                max_grad_norm=max_grad_norm, poisson_sampling=False,
                optimizer_class=optimizer_class, **kwargs)
        self.model = model
        self.captured: dict[int, torch.Tensor] = {}
        scale_grad = self.opt.scale_grad  # the subclass's, if it has one

        def capture(grads):  # the values before a 16-bit parameter's gradient is rounded
            scale_grad(grads)
            for p, g in zip(self.opt.params, grads):
                self.captured[id(p)] = g.detach().to(torch.float64, copy=True)

        self.opt.scale_grad = capture
        self.moved_elsewhere: set[str] = set()

    def run(self, batch: tuple) -> tuple[dict[str, torch.Tensor], set[str]]:
        with torch.no_grad():  # parameters and buffers (non-persistent ones too) as they started
            for n, v in self.start.items():
                self.tensors[n].copy_(v)
        self.opt.zero_grad(set_to_none=True)
        self.captured.clear()
        torch.manual_seed(self.seed)
        model_loss(self.private, self.loss_fn, batch).backward()
        self.opt.step()
        out, rounded = {}, set()
        for p in self.opt.params:
            name = self.names[id(p)]
            g = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            c = self.captured.get(id(p))
            if c is not None and torch.equal(c.to(p.dtype), g):
                val = c
            else:
                val = g.to(torch.float64)
                if p.dtype in (torch.bfloat16, torch.float16):
                    rounded.add(name)
            # SGD(lr=1) moved p by -g up to p's rounding; more than that: something else moved it
            moved = p.detach().double() - self.start[name].double()
            u = UNIT_ROUNDOFF.get(p.dtype, 2.0**-24)
            slack = 2 * u * (self.start[name].double() - g.double()).abs() + torch.finfo(p.dtype).tiny
            if bool(((moved + g.double()).abs() > slack).any()):
                self.moved_elsewhere.add(name)
                val = -moved
                if p.dtype in (torch.bfloat16, torch.float16, torch.float32):
                    rounded.add(name)
            out[name] = val
        return out, rounded


def _rank(model: nn.Module, loss_fn: Callable, records: Records, notes: list):
    """(record indices, largest per-record gradient norm first; each record's gradient or None).
    Measured without the engine, one record at a time: on every record where the float64 copies
    fit (:mod:`~ppml_fast.audit.sensitivity_reference`), else on the first 64 (no reference).
    Raises ValueError if the model and loss fail on the batch without the engine."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("module has no trainable parameter: nothing to check")
    try:
        model_loss(model, loss_fn, records.batch()).backward()
    except Exception as e:
        raise ValueError(f"module and loss_fn fail on batch without the engine: "
                         f"{type(e).__name__}: {e}") from e
    keep = reference.keep_grads(records.size, sum(p.numel() for p in params.values()))
    norms, grads = [], []
    try:
        for i in range(records.size if keep else min(records.size, _RANKED)):
            for p in params.values():
                p.grad = None
            model_loss(model, loss_fn, records.select([i])).backward()
            g = reference.per_record_grad(params)
            sq = sum(float(v.pow(2).sum()) for v in g.values())
            norms.append((-sq if math.isfinite(sq) else -math.inf, i))
            if keep:
                grads.append(g)
    except Exception as e:  # a model that needs more than one record: the batch's order
        notes.append(f"records taken in batch order, no per-record reference (a one-record "
                     f"batch failed: {type(e).__name__})")
        norms, keep = [(0.0, i) for i in range(records.size)], False
    for p in params.values():
        p.grad = None
    ranked = [i for _, i in sorted(norms)]
    return ranked + [i for i in range(records.size) if i not in ranked], (grads if keep else None)


def _least_precise(params: Sequence[torch.Tensor]) -> torch.dtype:
    dtypes = {p.dtype for p in params}
    return max(dtypes, key=lambda d: UNIT_ROUNDOFF.get(d, 1.0))


def _norm(d: dict[str, torch.Tensor], names=None) -> float:
    return math.sqrt(sum(float(v.pow(2).sum()) for k, v in d.items() if names is None or k in names))


def check_sensitivity(
    module: nn.Module,
    loss_fn: Callable,
    batch: tuple,
    *,
    max_grad_norm: float | Sequence[float],
    trials: int = 8,
    neighbours: str = "remove",
    optimizer_class: Optional[type] = None,
    train: bool = False,
    seed: int = 0,
    **make_private_kwargs: Any,
) -> SensitivityReport:
    """Measures how far one record moves a DP step of ``module`` under the real engine.

    Args:
        module: the model (a plain module, or a :class:`PrivateModule`: its model and settings
            are used). Never changed: the checker works on a deep copy, and restores torch's RNG.
        loss_fn: ``loss_fn(output, target)``, or ``loss_fn(output)`` when target is None.
        batch: ``(inputs, target)``; inputs a tensor (``module(inputs)``), a tuple of tensors
            (``module(*inputs)``) or a dict (``module(**inputs)``); target a tensor or None (e.g.
            a Hugging Face model returning ``.loss`` from ``labels`` inside the inputs dict:
            ``loss_fn=lambda out: out.loss``). Records: see :mod:`ppml_fast.audit.neighbours`.
            At least 2 records.
        max_grad_norm: C (a list per trainable parameter with ``clipping="per_layer"``).
        trials: how many neighbouring batches to compare (largest-gradient records first).
        neighbours: "remove" (B' = B minus one record, or B plus one crafted record; bound C)
            or "replace" (one record replaced by a crafted one; bound 2C).
        optimizer_class: a :class:`DPOptimizer` subclass to check instead of the default.
        train: run the copy in train mode (default: eval, so dropout is off: the bound must hold
            for each fixed draw of the model's randomness, and with dropout on, removing a record
            shifts the other records' masks). torch's RNG is seeded alike for every step.
        seed: seeds the crafted records' random directions and the steps' torch RNG.
        **make_private_kwargs: passed to ``PrivacyEngine.make_private`` (grad_sample_mode,
            clipping, batch_first, loss_reduction, nonfinite, ...). noise_multiplier, noise_seed,
            max_epsilon, delta and generator are ignored (the noise is removed; see the module
            docstring); poisson_sampling is False (one fixed batch, E = its size).

    Returns:
        A :class:`SensitivityReport`; ``report.ok`` when every ratio is at most 1 + tol, and
        ``report.refused`` holds the engine's message when it refuses the model;
        ``report.matches_reference`` compares the engine's clipped sum on the batch with each
        record's own gradient, computed alone and clipped in float64
        (:mod:`~ppml_fast.audit.sensitivity_reference`; None with ``train=True``).
    Raises:
        TypeError, ValueError: bad arguments, or module/loss_fn failing on batch without the engine.
    """
    _check_args(module, loss_fn, max_grad_norm, trials, neighbours, optimizer_class, make_private_kwargs)
    kwargs = dict(make_private_kwargs)
    notes = [f"{k} ignored: the checker removes the noise (noise_multiplier=0)"
             for k in _IGNORED if kwargs.pop(k, None) is not None]
    if isinstance(module, PrivateModule):
        kwargs.setdefault("grad_sample_mode", module.grad_sample_mode)
        kwargs.setdefault("batch_first", module.recorder.batch_first)
        kwargs.setdefault("loss_reduction", module.loss_reduction)
        module = module.module
    records = Records(batch, batch_first=kwargs.get("batch_first", True))
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)
        model = copy.deepcopy(module)
        model.train(train)
        if train and any(getattr(m, "p", 0) or getattr(m, "dropout", 0) for m in model.modules()
                         if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention))):
            notes.append("train=True with dropout: B and B' draw different masks for the records "
                         "they share, so a ratio above 1 may be the masks, not a leak; train=False "
                         "checks each fixed draw")
        order, grads = _rank(model, loss_fn, records, notes)
        trainable = [p for p in model.parameters() if p.requires_grad]
        bound = _bound(max_grad_norm, kwargs.get("clipping", "flat"), len(trainable), neighbours)
        report = SensitivityReport(
            max_ratio=math.nan, tol=tolerance(_least_precise(trainable)), bound=bound,
            max_grad_norm=max_grad_norm if isinstance(max_grad_norm, numbers.Real) else list(max_grad_norm),
            neighbours=neighbours, trials=0, expected_batch_size=float(records.size), notes=notes)
        try:
            stepper = _Stepper(model, loss_fn, records, max_grad_norm, optimizer_class, seed, kwargs)
        except PrivacyError as e:
            report.refused = f"make_private: {type(e).__name__}: {e}"
            return report
        try:
            base, base_rounded = stepper.run(records.batch())
            again, _ = stepper.run(records.batch())
        except Exception as e:  # ran without the engine (_rank): the engine refuses it
            report.refused = f"step on the batch: {type(e).__name__}: {e}"
            return report
        if grads is not None and not train:  # dropout on: a one-record pass draws other masks
            e, c = report.expected_batch_size, report.bound / (1 if neighbours == "remove" else 2)
            ref = reference.clipped_sum(grads, list(base), max_grad_norm=max_grad_norm,
                                        clipping=kwargs.get("clipping", "flat"), gamma=stepper.opt.gamma)
            report.reference_gap = reference.gap({k: v * e for k, v in base.items()}, ref, c)
        _measure(report, stepper, records, order, base, base_rounded, again, trials, seed)
    return report


def _measure(report: SensitivityReport, stepper: _Stepper, records: Records, order: list[int],
             base: dict, base_rounded: set, again: dict, trials: int, seed: int) -> None:
    scale = report.expected_batch_size / report.bound
    drift = _norm({k: base[k] - again[k] for k in base}) * scale
    if drift > report.tol:
        report.notes.append(f"the batch run twice gives steps {drift:.3g} bounds apart: the model is "
                            "not deterministic, ratios include that")
    gen = torch.Generator().manual_seed(seed)
    extra, worst = 0.0, None
    for kind, r in _plan(records, order, report.neighbours, trials):
        res = {"kind": kind, "record": r, "ratio": None, "error": None}
        report.results.append(res)
        try:
            other, rounded = stepper.run(_neighbour(records, kind, r, order, gen))
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            continue
        diff = {k: base[k] - other[k] for k in base}
        res["ratio"] = ratio = _norm(diff) * scale
        read_rounded = base_rounded | rounded
        if read_rounded:  # 16-bit gradients read after their rounding: allow that rounding
            u = max(UNIT_ROUNDOFF[stepper.dtypes[n]] for n in read_rounded)
            extra = max(extra, u * (_norm(base, read_rounded) + _norm(other, read_rounded)) * scale)
        if worst is None or ratio > worst[0]:
            worst = (ratio, kind, r, diff)
    report.trials = sum(res["ratio"] is not None for res in report.results)
    report.tol += extra
    if stepper.moved_elsewhere:
        report.notes.append(f"parameters moved by more than the inner SGD(lr=1) step: "
                            f"{sorted(stepper.moved_elsewhere)[:5]} (their actual change was measured)")
    if extra:
        report.notes.append(f"16-bit gradients read after rounding: tolerance raised by {extra:.3g}")
    if worst is None:
        report.notes.append("no trial completed")
        return
    report.max_ratio, report.worst_kind, report.worst_record, diff = worst
    report.per_parameter = {k: math.sqrt(float(v.pow(2).sum())) * scale for k, v in diff.items()}
    by_module: dict[str, float] = {}
    for k, v in report.per_parameter.items():
        by_module[k.rpartition(".")[0]] = by_module.get(k.rpartition(".")[0], 0.0) + v * v
    report.worst_module = max(by_module, key=by_module.get)

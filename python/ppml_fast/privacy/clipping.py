"""The clipping half of :class:`~ppml_fast.privacy.module.PrivateModule`: from the calls the
recorder captured (:mod:`ppml_fast.privacy.capture`), each sample's squared gradient norm per
parameter (ghost or materialised, by the rules of :mod:`ppml_fast.privacy.per_sample`, or by
torch.func for other modules), the clip factors, and the clipped sums (book-keeping), per batch.

Parameters used by several calls on disjoint parts (packed attention projections) add their
parts' squared norms and write each part's sum into its elements; a parameter used by
overlapping or repeated calls is materialised (its per-sample gradients summed over the calls).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.privacy import fallback, vit_embeddings
from ppml_fast.privacy.capture import Batch, Call, changed_in_place
from ppml_fast.privacy.layers import UnsupportedModuleError
from ppml_fast.privacy.per_sample import Captured, grouped, sum_dtype, tied, weighted_sum
from ppml_fast.privacy.per_sample.linear import FLAGGED, LinearRule
from ppml_fast.privacy.per_sample.workspace import Workspace
from ppml_fast.privacy.profiling import phase


class NonFiniteGradientError(PrivacyError, FloatingPointError):
    """A per-sample gradient is NaN or infinite (``nonfinite="raise"``)."""


def _factor_dtype(f: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Clip factors in float64 for float64 gradients, else float32: never rounded to a 16-bit
    type, whose 2^-8 rounding could let a clipped gradient exceed the clipping norm."""
    return f if grad.dtype == torch.float64 else f.float()


def _disjoint(parts: list) -> bool:
    """Whether the element ranges ``parts`` ([start, stop), None = the whole parameter) overlap nowhere."""
    if any(s is None for s in parts):
        return False
    parts = sorted(parts)
    return all(a[1] <= b[0] for a, b in zip(parts, parts[1:]))


def _embed(g: torch.Tensor, p: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """Per-sample gradients ``g`` (B, *part) of a part of ``p`` as (B, *p.shape), zero elsewhere."""
    full = g.new_zeros((g.shape[0], p.numel()))
    full[:, span[0]:span[1]] = g.reshape(g.shape[0], -1)
    return full.view((g.shape[0],) + tuple(p.shape))


def check_records(batches: list[Batch], step: int) -> None:
    """Raises (before anything changes) unless the backpropagated forwards since the last step
    are one batch of records whose layers' rows were tied to them (DESIGN.md invariant 1)."""
    for b in batches:
        if b.refusal:
            raise UnsupportedModuleError(f"step {step}: {b.refusal}")
        for c in b.calls:
            if c.grad is not None and changed_in_place(c):
                raise UnsupportedModuleError(
                    f"step {step}: {type(c.module).__name__}: its input was modified in place "
                    "after the layer used it (e.g. x.add_(...) or an inplace activation on a "
                    "tensor a layer already consumed), so its per-sample gradients would be "
                    "computed from values the layer never saw; use an out-of-place operation")
    if len(batches) > 1:
        raise PrivacyError(
            f"step {step}: {len(batches)} forward passes of the model were backpropagated before "
            "one optimizer step, and ppml_fast cannot tell whether they hold the same records "
            "(two views of one batch) or different ones. Accumulating several sampled batches "
            "into one step would put a record in it twice while the accountant counts one "
            "sampling: use BatchMemoryManager (or optimizer.signal_skip_step() and step() after "
            "each part of one sampled batch) instead. For several forwards of the same records "
            "(two views, a consistency loss), run them inside `with model.same_records():` so "
            "that each record's gradients are clipped together.")


def _kept_all(rule, state, params: dict) -> bool:
    """Whether a linear call's state holds every role's per-sample gradients (the materialise
    path: its clipped sums are ``factors @ kept``, its captured tensors are no longer read)."""
    return (type(rule) is LinearRule and isinstance(state, dict) and FLAGGED not in state
            and all(isinstance(state.get(r), torch.Tensor) for r in params))


def _release_capture(c: Call) -> None:
    """Drops what call ``c`` captured once its kept per-sample gradients hold all its clipped
    sums need (issue 16: peak memory): the activation and output gradient become stand-ins of
    the same shapes and dtypes without storage (what the rules' batch checks read), the
    torch.func inputs and output gradients go. Its in-place check already ran (check_records)."""
    if c.cap is not None:
        a = c.cap.activation
        c.cap = Captured(c.cap.op, a.new_empty(()).expand(a.shape), c.cap.params, c.cap.kwargs)
    if isinstance(c.grad, torch.Tensor):
        c.grad = c.grad.new_empty(()).expand(c.grad.shape)
    elif isinstance(c.grad, list):
        c.grad = [None] * len(c.grad)
    c.inputs = c.kwargs = c.rerun = c.versions = None


def _releasing(batch: Batch, plan: dict):
    """Yields each call of ``batch`` with its state, and releases what the call kept (its captured
    activation and output gradient, or its torch.func inputs, its kept per-sample gradients, its
    share of a group) once the loop has moved on to the next call: the clipped sums no longer
    need them, and holding every layer's until the last sum put the step's peak memory at all
    captures + all kept per-sample gradients + all sums (issue 16: ResNet-18-GN's step peaked at
    1.77x the non-private step's live tensor bytes, 0.95x with this; models bench)."""
    states = plan["states"]
    for i, c in enumerate(batch.calls):
        yield c, states[i]
        state = states[i][1] if states[i] is not None else None
        grp = state.get(grouped.GROUP) if isinstance(state, dict) else None
        if grp is not None:
            grp[0].release(grp[1])
        states[i] = None
        c.cap = c.grad = c.inputs = c.kwargs = c.rerun = None


class ClippedSums:
    """Mixin of :class:`~ppml_fast.privacy.module.PrivateModule` (which provides ``recorder``,
    ``parameter_watch``, ``rules``, ``loss_reduction``, ``parameters()`` and
    ``trainable_parameters()``)."""

    def clipped_sums(
        self,
        *,
        max_grad_norm: float | Sequence[float] | dict[int, float],
        clipping: str = "flat",
        nonfinite: str = "raise",
        step: int = 0,
        gamma: float = 0.01,
    ) -> tuple[dict[nn.Parameter, torch.Tensor], int]:
        """Clips every captured sample's gradient and sums them, batch by batch; forgets the
        batches. Returns (param -> clipped sum, number of samples seen). Raises
        NonFiniteGradientError (nothing forgotten) for a non-finite per-sample gradient unless
        ``nonfinite="drop"``, which zeroes those samples, and UnownedParameterError (nothing
        forgotten) when a trainable parameter got a gradient outside its module's calls."""
        # a parameter used outside its module's calls (ppml_fast.privacy.ownership): refused
        # before anything is forgotten or changed
        self.parameter_watch.check(step)
        batches = [b for b in self.recorder.batches if b.backpropagated]
        check_records(batches, step)
        for b in batches:  # an earlier step failed inside the norms, after releasing captures
            if getattr(b, "released", False) and getattr(b, "plan", None) is None:
                raise PrivacyError(
                    f"step {step}: an earlier step on this batch failed while computing the "
                    "per-sample norms, after some layers' captured tensors were released; run "
                    "the forward and backward pass of the batch again")
        if clipping == "per_layer":  # every captured parameter needs its clipping norm
            thresholds = self._thresholds(max_grad_norm, clipping)
            lost = {id(p): (role, p) for b in batches for c in b.calls if c.grad is not None
                    for role, p in c.params.items() if id(p) not in thresholds}
            if lost:  # nothing forgotten: the batches stay for a retry after a new forward
                names = {id(p): n for n, p in self.named_parameters(remove_duplicate=False)}
                missing = sorted({names.get(pid, role) for pid, (role, _) in lost.items()})
                raise PrivacyError(
                    f"step {step}: parameter(s) {missing[:5]} took part in this step's forward but "
                    "have no per-layer clipping norm now (frozen, or replaced, between the forward "
                    "and the step); run the forward again")
        with phase("ppml::norms"):  # profile phases (benchmarks/profile_step.py)
            # a batch's plan is kept on it when the step raised below: _norms released the
            # captures of materialised calls, so the retry reuses their kept gradients
            with self.workspace.arena():  # the kept per-sample tensors: reused CPU memory
                plans = [getattr(b, "plan", None) or self._norms(b, release=True) for b in batches]
        if nonfinite == "raise":
            for plan in plans:
                if bool(torch.isfinite(plan["total"]).all()):
                    plan["finite"] = True
                    continue
                bad = ~torch.isfinite(plan["total"])
                if bad.any():
                    for b, kept in zip(batches, plans):  # nothing forgotten
                        b.plan = kept
                    raise NonFiniteGradientError(
                        f"step {step}: the per-sample gradients of samples "
                        f"{bad.nonzero().flatten().tolist()[:10]} of a batch are not finite; "
                        "pass nonfinite='drop' to drop such samples"
                    )
        self.recorder.take()
        sums: dict[nn.Parameter, torch.Tensor] = {}
        seen = 0
        for batch, plan in zip(batches, plans):
            seen += batch.size
            with phase("ppml::clipped_sums"):
                self._accumulate(batch, plan, sums, max_grad_norm, clipping, gamma)
        return sums, seen

    @property
    def workspace(self) -> Workspace:
        """The memory the DP step's per-sample tensors reuse between steps (per_sample.workspace)."""
        ws = self.__dict__.get("_per_sample_workspace")
        if ws is None:
            ws = self.__dict__["_per_sample_workspace"] = Workspace()
        return ws

    def _scale(self, batch: Batch) -> float:
        """What turns the captured gradients of the loss into per-sample gradients: the batch
        size for a mean loss, divided by a mixed-precision loss scale (``loss_scale``, set by
        the DP optimizer for a ``torch.amp.GradScaler`` step)."""
        scale = float(batch.size) if self.loss_reduction == "mean" else 1.0
        return scale / getattr(self, "loss_scale", 1.0)

    def _norms(self, batch: Batch, release: bool = False) -> dict:
        """Per-sample squared norms: ``total`` (float64, of the true per-sample gradients) and
        ``per_param`` (float32 or float64, of the loss's gradients: times ``scale2`` for the true
        ones). With ``release`` (the step's own call), the captures of calls whose kept per-sample
        gradients hold all their clipped sums need are released on the way."""
        scale2 = self._scale(batch) ** 2
        uses: dict[int, list] = {}  # parameter -> the part each call used (None: all of it)
        for c in batch.calls:
            if c.grad is not None:
                spans = c.spans or {}
                for role, p in c.params.items():
                    uses.setdefault(id(p), []).append(spans.get(role))
        shared_ids = {pid for pid, parts in uses.items() if len(parts) > 1 and not _disjoint(parts)}
        per_param: dict[int, torch.Tensor] = {}
        materialised: dict[int, torch.Tensor] = {}  # shared parameters: summed per-sample grads
        states = []
        released: set[int] = set()  # id(call): captures dropped, its state holds its gradients
        # calls of one kind and shape: their norms in one batched step (per_sample.grouped)
        pre = grouped.norms(batch.calls, self.rules, lambda c: not c.spans and not any(
            id(p) in shared_ids for p in c.params.values()))
        # tied embedding / linear weights: cross term instead of materialising (per_sample.tied)
        pairs = tied.pairs(batch.calls, shared_ids, self.rules)
        paired = {i for pair in pairs.values() for i in pair}
        for i, c in enumerate(batch.calls):
            if c.grad is None or i in paired:  # a pair's states are filled in below
                states.append(None)
                continue
            if i in pre:
                norms, state = pre[i]
                for role, n in norms.items():
                    per_param[id(c.params[role])] = n  # not shared, no parts: one call each
                states.append(("rule", state))
                continue
            shared = any(id(p) in shared_ids for p in c.params.values())
            if c.cap is None or shared:
                grads = self._per_sample(c)
                for role, g in grads.items():
                    pid = id(c.params[role])
                    if c.spans and role in c.spans:  # a part: placed in a full-size gradient
                        g = _embed(g, c.params[role], c.spans[role])
                    materialised[pid] = g if pid not in materialised else materialised[pid] + g
                states.append(("materialised", None))  # _accumulate sums materialised[pid]
                if release:
                    _release_capture(c)
                    released.add(id(c))
                    batch.released = True
                continue
            rule = self.rules[c.cap.op]
            norms, state = rule.norms_sq(c.cap, c.grad)
            for role, n in norms.items():
                pid = id(c.params[role])  # disjoint parts of one parameter: squared norms add up
                per_param[pid] = n if pid not in per_param else per_param[pid] + n
            states.append(("rule", state))
            if release and _kept_all(rule, state, c.params):  # captures no longer read: freed
                _release_capture(c)
                released.add(id(c))
                batch.released = True
        for ie, il in pairs.values():
            e, lin = batch.calls[ie], batch.calls[il]
            norms, st_e, st_l = tied.norms(e.cap, e.grad, lin.cap, lin.grad, self.rules)
            states[ie], states[il] = ("rule", st_e), ("rule", st_l)
            for role, n in norms.items():
                pid = id(lin.params[role])
                per_param[pid] = n if pid not in per_param else per_param[pid] + n
        for pid, g in materialised.items():
            flat = g.reshape(g.shape[0], -1)
            flat = flat if flat.dtype == torch.float64 else flat.float()
            n = torch.linalg.vecdot(flat, flat)
            per_param[pid] = n if pid not in per_param else per_param[pid] + n  # + disjoint rule parts
        b = batch.size
        if per_param:  # float64 sum of the (float32 or float64) norms, scaled once
            total = torch.stack(list(per_param.values())).sum(0, dtype=torch.float64).mul_(scale2)
        else:  # no parameter took a gradient in this batch: zero norms, on the model's device
            first = next(self.parameters(), None)
            total = torch.zeros(b, dtype=torch.float64, device=None if first is None else first.device)
        return {"per_param": per_param, "scale2": scale2, "total": total, "states": states,
                "materialised": materialised, "pairs": pairs, "released": released}

    def _per_sample(self, c: Call) -> dict[str, torch.Tensor]:
        if c.cap is not None:
            return self.rules[c.cap.op].per_sample(c.cap, c.grad)
        with self.recorder.paused():
            with torch.enable_grad():  # the closed form's one-time check runs autograd
                fast = vit_embeddings.per_sample(c.module, c.params, c.rerun, c.grad)
            if fast is not None:
                return fast
            return fallback.per_sample_grads(c.module, c.params, c.rerun, c.grad)

    def _accumulate(self, batch, plan, sums, max_grad_norm, clipping, gamma) -> None:
        scale = self._scale(batch)
        per_param, total = plan["per_param"], plan["total"]
        known_finite = plan.get("finite", False)  # checked by clipped_sums (nonfinite="raise")
        finite = None if known_finite else torch.isfinite(total)
        drop = not known_finite and not bool(finite.all())
        c_of: dict[int, torch.Tensor] = {}

        def factors(n: torch.Tensor, threshold: float) -> torch.Tensor:
            """Clip factors (times ``scale``) from the norms ``n`` (a fresh float64 tensor:
            changed in place)."""
            if clipping == "automatic":  # Bu et al. 2023, "automatic clipping": C / (||g|| + gamma)
                f = threshold / n.add_(gamma)
            else:  # Abadi et al. 2016, Alg. 1: min(1, C / ||g||) (1e-6 guards ||g|| = 0)
                f = (threshold / n.add_(1e-6)).clamp_(max=1.0)
            if drop:
                f = torch.where(finite, f, torch.zeros_like(f))
            return f.mul_(scale) if scale != 1.0 else f

        thresholds = self._thresholds(max_grad_norm, clipping)
        if clipping == "per_layer":
            scale2 = plan["scale2"]
            norms_by_param = {pid: (n.double() * scale2).sqrt_() for pid, n in per_param.items()}
            common = None
        else:
            with phase("ppml::factors"):
                common = factors(total.sqrt(), float(max_grad_norm))
        as_dtype: dict[tuple, torch.Tensor] = {}

        def factor_for(f: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            """``_factor_dtype(f, grad)``, converted once per factor tensor and dtype."""
            key = (id(f), grad.dtype == torch.float64)
            if key not in as_dtype:
                as_dtype[key] = _factor_dtype(f, grad)
            return as_dtype[key]

        # tied pairs under nonfinite="drop": their states recomputed jointly (per_sample.tied)
        redo = tied.drop_states(batch.calls, plan.get("pairs") or {}, self.rules, finite) if drop else {}
        done: set[int] = set()
        for c, st in _releasing(batch, plan):
            if st is None:
                continue
            kind, state = st
            for role, p in c.params.items():
                pid = id(p)
                if pid not in c_of:
                    c_of[pid] = common if common is not None else factors(norms_by_param[pid], thresholds[pid])
            if kind == "materialised":
                for role, p in c.params.items():
                    pid = id(p)
                    if pid in done:
                        continue
                    done.add(pid)
                    g = plan["materialised"].pop(pid)  # summed once (done): released after
                    if drop:
                        g = torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, torch.zeros_like(g))
                    self._add(sums, p, weighted_sum(g, c_of[pid], p))
                continue
            cap, grad = c.cap, c.grad
            if drop and id(c) in plan["released"]:  # the kept per-sample gradients, rows zeroed
                state = {r: torch.where(finite.view(-1, *[1] * (v.dim() - 1)), v, torch.zeros_like(v))
                         for r, v in state.items()}
            elif drop:
                keep = finite.view(-1, *[1] * (grad.dim() - 1))
                grad = torch.where(keep, grad, torch.zeros_like(grad))
                if cap.activation.is_floating_point():
                    a_keep = finite.view(-1, *[1] * (cap.activation.dim() - 1))
                    cap = Captured(cap.op, torch.where(a_keep, cap.activation, torch.zeros_like(cap.activation)),
                                   cap.params, cap.kwargs)
                state = None if kind == "rule" else state
                if state is None:
                    state = redo[id(c)] if id(c) in redo else self.rules[cap.op].norms_sq(cap, grad)[1]
            roles = list(c.params)
            if not roles:  # every parameter of the layer was frozen after wrapping
                continue
            fs = [c_of[id(c.params[r])] for r in roles]
            grp = state.get(grouped.GROUP) if isinstance(state, dict) and not drop else None
            if grp is not None and common is not None and grp[0].can_sum(grp[1], c.params):
                # the group's clipped sums in one matmul (flat clipping: one factor vector)
                out = grp[0].clipped(grp[1], factor_for(common, grad), c.params)
                for role, t in out.items():
                    self._add_call(sums, c, role, t)
            elif all(f is fs[0] for f in fs):
                out = self.rules[cap.op].clipped_sum(cap, grad, factor_for(fs[0], grad), state)
                for role, t in out.items():
                    self._add_call(sums, c, role, t)
            else:
                for role, f in zip(roles, fs):
                    sub = Captured(cap.op, cap.activation, {role: cap.params[role]}, cap.kwargs)
                    out = self.rules[cap.op].clipped_sum(sub, grad, factor_for(f, grad), state)
                    self._add_call(sums, c, role, out[role])

    def _thresholds(self, max_grad_norm, clipping) -> dict[int, float]:
        """per_layer: id(parameter) -> its clipping norm: ``max_grad_norm`` as such a dict (what
        the DP optimizer passes), or one per trainable parameter, in ``parameters()`` order, as
        Opacus takes them, or a single number for each."""
        if clipping != "per_layer":
            return {}
        if isinstance(max_grad_norm, dict):
            return {k: float(v) for k, v in max_grad_norm.items()}
        params = self.trainable_parameters()
        if isinstance(max_grad_norm, (int, float)):
            max_grad_norm = [float(max_grad_norm)] * len(params)
        return {id(p): float(c) for p, c in zip(params, max_grad_norm)}

    def _add_call(self, sums: dict, c: Call, role: str, t: torch.Tensor) -> None:
        """Adds call ``c``'s clipped sum ``t`` for ``role`` (into its part's elements if it has one)."""
        span = c.spans.get(role) if c.spans else None
        p = c.params[role]
        if span is None:
            self._add(sums, p, t)
            return
        if p not in sums:
            sums[p] = torch.zeros(p.shape, dtype=sum_dtype(p), device=p.device)
        sums[p].view(-1)[span[0]:span[1]].add_(t.reshape(-1).to(sums[p].dtype))

    @staticmethod
    def _add(sums: dict, p: nn.Parameter, t: torch.Tensor) -> None:
        """Adds ``t`` to ``p``'s clipped sum, kept in ``sum_dtype(p)`` (float32 for a 16-bit
        parameter: it is rounded to ``p``'s dtype only after the noise)."""
        t = t.to(sum_dtype(p))
        if p in sums:
            sums[p].add_(t)
        else:
            sums[p] = t.contiguous() if t.data_ptr() != p.data_ptr() else t.clone()

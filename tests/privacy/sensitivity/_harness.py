"""Shared machinery of the adversarial sensitivity suite (issue 14): a float64 per-record
reference, one DP step of the engine with the noise removed, and neighbouring batches.

What every configuration asserts:

(1) **Clipped sum = reference.** For each record i, the gradient of record i's loss term with
    respect to every trainable parameter is computed on a float64 copy of the model (a loop over
    records, each a batch of one: the definition, with no per-sample machinery), clipped
    (flat: min(1, C / (||g_i|| + 1e-6)), Abadi et al. 2016 Alg. 1 with the engine's documented
    guard; per_layer: the same per parameter; automatic: C / (||g_i|| + gamma), Bu et al. 2023)
    and summed. The engine's sum is ``p.grad * expected_batch_size`` read right after
    ``optimizer.step()`` with ``noise_multiplier=0``. The error is measured normwise over all
    parameters, relative to sum_i ||clipped g_i|| (the size of the terms summed, never of a sum
    that may cancel).
(2) **Sensitivity.** For neighbouring batches B, B' (one record removed; or replaced),
    ||sum(B) - sum(B')|| <= bound * (1 + tol), bound = C for flat/automatic (2C when replacing),
    sqrt(sum_p C_p^2) for per_layer (also each parameter alone: <= C_p).

Tolerances come from the unit roundoff u of the dtype the engine computes in (:func:`rtol`,
:func:`sens_tol`). A configuration the engine may refuse (``refuse_ok``) passes if a
:class:`~ppml_fast.privacy.PrivacyError` is raised before any parameter changed, else its sums
must be correct.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import BatchMemoryManager, PrivacyEngine, PrivacyError

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24,
                 torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FLAT_EPS = 1e-6  # the engine's guard in min(1, C / (||g|| + eps)) (clipping.py)


def rtol(dtype: torch.dtype, kappa: float = 1.0) -> float:
    """Normwise relative tolerance of a clipped sum against the float64 reference.

    A forward and backward of depth L <= 16 with reductions of length n <= 256 in unit roundoff
    u gives errors ~ (L + log2 n) u kappa_model relative to the terms (Higham, Accuracy and
    Stability, 2nd ed., ch. 3); with kappa_model <= 2^6 for these tiny models that is <= 2^11 u.
    A record whose gradient is the cancellation of terms ``kappa`` times larger than itself
    (x1 = M r + a, x2 = -M r + a: kappa = M / |a|) adds 2^4 u kappa: any order of summation,
    the reference's included, rounds at the size of the cancelled terms; and its norm, if taken
    from a Gram matrix, may be over-estimated by that sum's proven rounding bound (sound: it clips
    more; ~u kappa^2 of the norm, Higham Lemma 3.1), up to 2^-7 (past which a sound engine
    recomputes the record on a stable path; ppml_fast's threshold is 1e-2). float64 is floored at
    1e-9; the 16-bit types, whose every activation is rounded, get 16 u per layer of a <= 4-layer
    model instead of 2^11 u: bf16 6%, fp16 0.8%. Where the result exceeds 1/4 the computed
    gradient of such a record carries no digit (that dtype cannot represent the record's
    gradient); :func:`check_case` then asserts only the sensitivity, which holds in any dtype.
    """
    u = UNIT_ROUNDOFF[dtype]
    model = 16 * u if dtype in (torch.bfloat16, torch.float16) else 2.0**11 * u
    gram = min(2.0**-7, 2.0**4 * u * kappa * kappa) if kappa > 1 else 0.0
    return max(model + 2.0**4 * u * kappa + gram, 1e-9)


def sens_tol(dtype: torch.dtype, sums_norm: float, bound: float) -> float:
    """Relative slack of ||sum(B) - sum(B')|| <= bound (1 + tol): the clip factor's rounding
    (float32 factors for 16-bit models: 2^8 u32; float64: 1e-9), the other records' clipped
    gradients, which the two runs may round differently (batch-size dependent matmul blocking:
    2^4 u (||S|| + ||S'||) / bound), and for 16-bit parameters the rounding of both sums to the
    parameter's dtype when p.grad is written (u (||S|| + ||S'||) / bound). No allowance for
    cancellation records: however the engine computed a record's gradient, the contribution it
    sums must be clipped by the norm of that very contribution, and a record's contribution must
    not depend on which other records share its batch beyond rounding at the size of C."""
    u = UNIT_ROUNDOFF[dtype]
    base = 1e-9 if dtype == torch.float64 else 2.0**8 * 2.0**-24
    rounding = 2.0**4 * u * sums_norm / bound
    grad_round = u * sums_norm / bound if dtype in (torch.bfloat16, torch.float16) else 0.0
    return base + rounding + grad_round


def default_loss(out, target):
    return nn.functional.cross_entropy(out, target)


def call_model(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


@dataclass
class Case:
    """One model/loop configuration.

    ``build()`` returns the float64 model (seeded inside); ``inputs`` a tuple (positional) or a
    dict (keyword) of tensors whose record dimension is ``record_dim`` (0 unless seq-first);
    ``target`` has records on dim 0. ``forward_loss(model, inputs, target)`` is one forward and
    the loss (default: ``loss(model(*inputs), target)``). ``chunk``: virtual batches of that many
    records (:class:`BatchMemoryManager`). ``make``: extra ``make_private`` keyword arguments.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Any
    target: torch.Tensor
    forward_loss: Optional[Callable] = None
    loss: Callable = default_loss
    mode: str = "ghost"
    clipping: str = "flat"
    C: Any = 1.0  # per_layer: also a list, one per trainable parameter in named_parameters() order
    dtype: torch.dtype = torch.float64
    record_dim: int = 0
    loss_reduction: str = "mean"
    batch_first: bool = True
    chunk: Optional[int] = None
    refuse_ok: bool = False  # the engine may refuse this setup instead of computing it
    kappa: float = 1.0  # the largest cancellation in a record's gradient (see rtol)
    rules: Optional[str] = None  # "ghost": force the ghost path of every rule (tiny shapes pick materialise)
    adversarial: tuple = ()  # record indices crafted to break the bound (removed as neighbours)
    make: dict = field(default_factory=dict)

    def run_loss(self, model, inputs, target):
        if self.forward_loss is not None:
            return self.forward_loss(model, inputs, target)
        return self.loss(call_model(model, inputs), target)

    @property
    def size(self) -> int:
        return int(self.target.shape[0])

    def with_(self, **kw) -> "Case":
        return replace(self, **kw)


# -- batches ------------------------------------------------------------------------------------
def _map(inputs, fn):
    if isinstance(inputs, dict):
        return {k: fn(v) for k, v in inputs.items()}
    return tuple(fn(v) for v in inputs)


def cast(inputs, dtype):
    """Floating-point tensors to ``dtype`` (indices unchanged)."""
    return _map(inputs, lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)


def select(case: Case, inputs, target, idx: list[int]):
    """The records ``idx`` of a batch (inputs along ``case.record_dim``, target along 0)."""
    ix = torch.tensor(idx, dtype=torch.long)

    def take(v):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        return v.index_select(case.record_dim if v.dim() > case.record_dim else 0, ix)

    return _map(inputs, take), target.index_select(0, ix)


# -- the engine ---------------------------------------------------------------------------------
def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lowered(case: Case, model64: nn.Module) -> nn.Module:
    """The engine's copy of the model, in the case's dtype."""
    return copy.deepcopy(model64).to(case.dtype)


def engine_sums(case: Case, model: nn.Module, inputs, target) -> dict[str, torch.Tensor]:
    """One DP step with noise_multiplier 0 on ``model`` (changed) for the batch; returns
    name -> p.grad * B (float64). Raises what the engine raises; a PrivacyError must leave every
    parameter as it was (checked here)."""
    b = int(target.shape[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    index = DataLoader(TensorDataset(torch.arange(b)), batch_size=max(b, 1))  # expected size B
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poisson_sampling=False warns about the accounting
            private, dp, _ = PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=index, noise_multiplier=0.0,
                max_grad_norm=case.C, poisson_sampling=False, clipping=case.clipping,
                grad_sample_mode=case.mode, batch_first=case.batch_first,
                loss_reduction=case.loss_reduction, **case.make)
        assert dp.expected_batch_size == b
        if case.rules is not None:  # the rules' own ghost path, whatever the cost model picks
            from ppml_fast.privacy.per_sample import make_rules

            private.rules = make_rules(case.rules)
        if case.chunk is None:
            dp.zero_grad()
            case.run_loss(private, inputs, target).backward()
            dp.step()
        else:  # virtual batches: the logical batch in physical chunks of case.chunk records
            assert not isinstance(inputs, dict) and case.record_dim == 0
            logical = DataLoader(TensorDataset(*inputs, target), batch_size=b)
            with BatchMemoryManager(data_loader=logical, max_physical_batch_size=case.chunk,
                                    optimizer=dp) as physical:
                for *x, y in physical:
                    dp.zero_grad()
                    case.run_loss(private, tuple(x), y).backward()
                    dp.step()
    except PrivacyError:
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n]), f"{case.name}: refused after changing {n}"
        raise
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            out[n] = torch.zeros(p.shape, dtype=torch.float64) if g is None else g.double() * b
    private.remove_hooks()
    return out


# -- the reference ------------------------------------------------------------------------------
def per_record_grads(case: Case, model64: nn.Module, inputs, target) -> dict[str, torch.Tensor]:
    """name -> (B, *shape) float64: each record's gradient, computed on that record alone."""
    params = {n: p for n, p in model64.named_parameters() if p.requires_grad}
    rows: dict[str, list] = {n: [] for n in params}
    for i in range(int(target.shape[0])):
        x, y = select(case, inputs, target, [i])
        for p in params.values():
            p.grad = None
        case.run_loss(model64, x, y).backward()  # not autograd.grad: reentrant checkpointing refuses it
        for n, p in params.items():
            rows[n].append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return {n: torch.stack(r) for n, r in rows.items()}


def layer_norms(case: Case, names: list[str]) -> dict[str, float]:
    """per_layer: name -> C_p; ``case.C`` one number for all, or a list in the order of the
    trainable parameters (``named_parameters()``, as the engine binds it)."""
    if isinstance(case.C, (list, tuple)):
        assert len(case.C) == len(names), f"{case.name}: {len(case.C)} norms for {len(names)} parameters"
        return {n: float(c) for n, c in zip(names, case.C)}
    return {n: float(case.C) for n in names}


def clip_and_sum(case: Case, per_record: dict[str, torch.Tensor], gamma: float = 0.01):
    """(name -> clipped sum, per-record norms of the clipped gradients), float64."""
    sq = {n: g.flatten(1).pow(2).sum(1) for n, g in per_record.items()}
    total = torch.stack(list(sq.values())).sum(0).sqrt()
    factors = {}
    thresholds = layer_norms(case, list(per_record))
    for n in per_record:
        if case.clipping == "flat":
            factors[n] = (case.C / (total + FLAT_EPS)).clamp(max=1.0)
        elif case.clipping == "automatic":
            factors[n] = case.C / (total + gamma)
        else:
            factors[n] = (thresholds[n] / (sq[n].sqrt() + FLAT_EPS)).clamp(max=1.0)
    sums = {n: torch.einsum("b,b...->...", factors[n], g) for n, g in per_record.items()}
    clipped_sq = sum(factors[n] ** 2 * sq[n] for n in per_record)
    return sums, clipped_sq.sqrt()


def flat_norm(d: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))


# -- the checks ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    refused: Optional[str] = None  # the engine's error message
    sum_error: float = 0.0  # normwise error / sum of clipped norms
    ratio: float = 0.0  # worst ||sum(B) - sum(B')|| / bound
    worst: str = ""


def check_sum(case: Case, model64: nn.Module, inputs=None, target=None) -> tuple[dict, float, str]:
    """Measures (1): returns (the engine's sums, the error relative to sum_i ||clipped g_i||,
    a description of the error)."""
    inputs = case.inputs if inputs is None else inputs
    target = case.target if target is None else target
    model = lowered(case, model64)
    ref_model = copy.deepcopy(model).double()  # the very weights the engine sees, exactly
    x = cast(inputs, case.dtype)
    want, clipped_norms = clip_and_sum(case, per_record_grads(case, ref_model, cast(x, torch.float64), target))
    got = engine_sums(case, model, x, target)
    assert set(got) == set(want), f"{case.name}: parameters {sorted(set(got) ^ set(want))}"
    err = math.sqrt(sum(float((got[n] - want[n]).pow(2).sum()) for n in want))
    scale = max(float(clipped_norms.sum()), 1e-30)
    worst = max(want, key=lambda n: float((got[n] - want[n]).norm()))
    detail = (f"clipped sum off the float64 per-record reference by {err / scale:.3e} of "
              f"sum_i ||clipped g_i|| = {scale:.3e} (tol {rtol(case.dtype, case.kappa):.1e}; worst {worst}; "
              f"||engine sum|| {flat_norm(got):.4g} vs ||reference|| {flat_norm(want):.4g})")
    return got, err / scale, detail


def neighbour_ratio(case: Case, model64: nn.Module, full: dict, drop: int,
                    replace_with: Optional[tuple] = None) -> tuple[float, float, str]:
    """||sum(B) - sum(B')|| / bound for B' = B without record ``drop`` (or with it replaced by
    the single record ``replace_with`` = (inputs, target)); returns (ratio, tol, detail)."""
    idx = [i for i in range(case.size) if i != drop]
    x, y = select(case, case.inputs, case.target, idx)
    if replace_with is not None:
        x = _cat(case, x, replace_with[0])
        y = torch.cat([y, replace_with[1]])
    other = engine_sums(case, lowered(case, model64), cast(x, case.dtype), y)
    delta = {n: full[n] - other[n] for n in full}
    k = 2.0 if replace_with is not None else 1.0
    if case.clipping == "per_layer":
        cs = layer_norms(case, list(full))
        bound = k * math.sqrt(sum(c * c for c in cs.values()))
        per = {n: float(d.norm()) / (k * cs[n]) for n, d in delta.items()}
        worst_p = max(per, key=per.get)
        detail = f"worst parameter {worst_p}: {per[worst_p]:.4f} C_p"
    else:
        bound, per, detail = k * case.C, {}, ""
    ratio = flat_norm(delta) / bound
    tol = sens_tol(case.dtype, flat_norm(full) + flat_norm(other), bound)
    if per:
        ratio = max(ratio, max(per.values()))
    return ratio, tol, detail


def _cat(case: Case, a, b):
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]], dim=case.record_dim if a[k].dim() > case.record_dim else 0)
                for k in a}
    return tuple(torch.cat([u, v], dim=case.record_dim if u.dim() > case.record_dim else 0)
                 for u, v in zip(a, b))


def check_case(case: Case, *, replace: bool = False) -> Outcome:
    """Assertions (1) and (2) for ``case``: the sum against the reference, then each
    adversarial record (and record 0) removed; with ``replace`` also the first adversarial
    record put in place of a clean one. Both are measured before either is asserted (the
    failure message gives both). A refusal passes only for ``refuse_ok`` cases."""
    model64 = case.build()
    try:
        full, rel, sum_detail = check_sum(case, model64)
        out = Outcome(sum_error=rel)
        tol = None
        for j in sorted(set(case.adversarial) | {0}):
            ratio, t, detail = neighbour_ratio(case, model64, full, j)
            if tol is None or ratio - t > out.ratio - tol:
                out.ratio, tol, out.worst = ratio, t, f"record {j} removed {detail}"
        if replace and case.adversarial:
            a = case.adversarial[0]
            rec = select(case, case.inputs, case.target, [a])
            x, y = select(case, case.inputs, case.target, [i for i in range(case.size) if i != a])
            base = case.with_(inputs=x, target=y, adversarial=())
            full_b, _, _ = check_sum(base, model64)
            ratio, t, detail = neighbour_ratio(base, model64, full_b, 0, replace_with=rec)
            if ratio - t > out.ratio - tol:
                out.ratio, tol, out.worst = ratio, t, f"clean record 0 replaced by record {a} {detail}"
    except PrivacyError as e:
        if not case.refuse_ok:
            raise
        return Outcome(refused=f"{type(e).__name__}: {e}")
    msg = (f"{case.name}: sensitivity {out.ratio:.4f} x the bound ({out.worst}; tol {tol:.1e}); "
           f"{sum_detail}")
    sum_ok = rel <= rtol(case.dtype, case.kappa) or rtol(case.dtype, case.kappa) > 0.25
    assert sum_ok and out.ratio <= 1 + tol, msg
    return out


# -- adversarial records ------------------------------------------------------------------------
def cancellation_pair(d: int, M: float = 2.0**30, a_scale: float = 8.0, gen=None) -> tuple:
    """(x1, x2) = (M r + a, -M r + a) with r on the first half of the d features and a on the
    second (so both are exact in every dtype whose range holds M): the rows' M parts cancel in a
    record's gradient when two positions share an output gradient, while the Gram matrix
    ||x1||^2 = M^2 + |a|^2 loses |a|^2 in rounding (issue 14, item 2)."""
    g = gen or torch.Generator().manual_seed(7)
    h = d // 2
    r = torch.zeros(d, dtype=torch.float64)
    a = torch.zeros(d, dtype=torch.float64)
    r[:h] = torch.randn(h, generator=g, dtype=torch.float64).sign()
    a[h:] = a_scale * torch.randn(d - h, generator=g, dtype=torch.float64).sign()
    return M * r + a, -M * r + a


CANCEL_M, CANCEL_A = 2.0**30, 8.0
CANCEL_KAPPA = CANCEL_M / CANCEL_A


def with_cancellation(x: torch.Tensor, i: int, M: float = CANCEL_M, a_scale: float = CANCEL_A,
                      positions: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """``x`` (B, T, d) with record i's positions set to a cancellation pair (others: a)."""
    x = x.clone()
    x1, x2 = cancellation_pair(x.shape[-1], M, a_scale)
    x[i] = (x1 + x2) / 2  # a at every other position
    x[i, positions[0]], x[i, positions[1]] = x1, x2
    return x


def scaled(x: torch.Tensor, i: int, s: float) -> torch.Tensor:
    x = x.clone()
    x[i] = x[i] * s
    return x

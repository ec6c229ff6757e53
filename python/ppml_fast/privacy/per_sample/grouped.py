"""Grouped per-sample norms and clipped sums: the calls of one batch that a rule would treat alike
(same op, path, shapes, dtypes and roles) computed in one batched step instead of one rule call
per layer (issue 16, item 2).

Why: on small and medium models the DP step's extra cost was ~0.2 ms per parameterised layer,
mostly small torch ops per layer (views, norms, sums, dtype conversions, matvecs) and, on the
ghost path, the ~20 small ops of the rounding bound (bounds.py). Here each call of a group still
runs its own compute ops (the Gram ``bmm``s, the layer norm's pass), writing into one
``(L, B, ...)`` buffer of the group (``out=``: the inputs are never copied), and everything after
runs once per group: the ghost norms with their bounds and flags, one norm reduction, one matmul
for all the materialised clipped sums (flat clipping: one factor vector for all).

What is grouped (the rest goes through its rule, one call at a time, as before):

- ``linear`` / ``linear_t`` calls on the ghost path (``T >= 2`` positions where
  :func:`linear.choose_path` picks it) with the same ``(B, T, d, p)``, dtypes and roles, and
  bias-only calls; BERT's q/k/v/o projections at short sequences, GPT-2's Conv1D layers;
- ``layer_norm`` calls with the same input shape, dtypes, ``normalized_shape``, eps and roles.

Not grouped: materialise-path linears (measured no faster grouped: their per-sample ``bmm`` and
the passes over ``B d p`` numbers dominate, and one large fresh ``(L, B, p, d)`` buffer cost page
faults: BERT-tiny's clipping 1.02-1.06x slower grouped), the ``T = 1`` linear norm (two norms),
calls whose parameter is shared between calls or used in parts (the engine's materialised, tied
and span paths), calls whose rule object is not the stock rule, and calls whose shapes fail the
rule's checks (the rule then raises its own error).

Equal results: every record's Gram matrices (or normalised activations) are computed by the same
op on the same operands as the rule's per-call path (``out=`` a slice of the group's buffer) and
its norm, bound and flag by the same elementwise and row operations
(:func:`linear.norms_from_grams`, whatever the number of rows), so the norms are bit-identical;
flagged records are materialised in float64 per call exactly as :func:`linear.ghost_weight_norms`
does, and their state (``FLAGGED``, ``BOUND``) goes to their own call, so the rounding
guarantees of :mod:`bounds` hold unchanged. Clipped sums of kept per-sample gradients come from
one ``(B,) @ (L, B, n)`` matmul instead of ``L`` matvecs, and a ghost weight's book-keeping is
the rule's own formula (:func:`linear.book_keeping`, one matmul per call, IEEE precision), so the
sums equal the per-call path up to float summation order (1.5e-7 relative at most on a tiny BERT
in float32: the matmul kernels' choice; bit-identical in the tests' float64 cases to 1e-12).

Memory: the per-call path frees a call's Gram matrices before the next call, a group holds its
calls' at once; groups are split so that one holds at most :data:`MAX_GROUP_ELEMENTS`.

:data:`GROUPING` switches the grouping off (``False``: the per-call path; tests compare both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps
from ppml_fast.privacy.per_sample import bounds, workspace
from ppml_fast.privacy.per_sample import linear as _lin
from ppml_fast.privacy.per_sample import normalization as _norm

# Module switch: False computes every call through its rule (the reference the tests compare to).
GROUPING = True

# Largest buffers of one group, in elements (Gram matrices, kept per-sample gradients); larger
# groups are split into chunks (64 MB in float64: BERT-base's q/k/v/o at T = 128, B = 32 go in
# chunks of 8 calls, at T = 512 not at all).
MAX_GROUP_ELEMENTS = 1 << 23

# State key of a grouped call: (its Group, its index in the group).
GROUP = "group"


class Group:
    """``L`` calls computed together; ``stacked[role]`` holds their per-sample gradients as
    ``(L, B, ...)`` where they were materialised."""

    def __init__(self, batch: int, stacked: dict[str, Tensor], params: dict[str, Tensor],
                 ghost: tuple | None = None) -> None:
        self.batch = batch
        self.stacked = stacked
        # ghost linear groups: (each call's (x (B, T, d), g (B, T, p)), T, transposed) for their
        # weights' book-keeping, and the calls holding flagged records (their rule sums them)
        self.ghost = ghost
        self.flagged: set[int] = set()
        self._repeated: Tensor | None = None
        # the clipped sums' dtypes (the key holds the parameters' dtypes: equal in the group)
        self.dtypes = {r: _ps.sum_dtype(p) for r, p in params.items()}
        self._factors: Tensor | None = None
        self._sums: dict[str, Tensor] = {}

    def clipped(self, index: int, factors: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Call ``index``'s clipped sums ``sum_i factors[i] g_i`` for the roles of ``params``
        (computed for the whole group at the first call with these factors; ``factors`` must be
        a tensor the caller does not change during the step)."""
        if self._factors is not factors:
            self._factors = factors
            self._sums = {}
            for role, s in self.stacked.items():
                flat = s.reshape(s.shape[0], s.shape[1], math.prod(s.shape[2:]))  # also B = 0
                dt = self.dtypes[role]  # as per_sample.weighted_sum converts
                if flat.dtype != dt and flat.dtype != torch.float64:
                    flat = flat.to(dt)
                # (B,) @ (L, B, n) -> (L, n): one matmul for the L weighted sums
                self._sums[role] = torch.matmul(factors.to(flat.dtype), flat)
            self._repeated = None
        out = {}
        for role, p in params.items():
            if role in self._sums:
                out[role] = self._sums[role][index].reshape(p.shape).to(_ps.sum_dtype(p))
                continue
            # ghost weight: book-keeping as LinearRule.clipped_sum does it, the factors repeated
            # over the T positions once for the group
            (x, g), seq, transposed = self.ghost[0][index], self.ghost[1], self.ghost[2]
            if self._repeated is None:
                f = factors if factors.dtype == x.dtype else factors.to(x.dtype)
                self._repeated = f.repeat_interleave(seq)
            f = self._repeated
            x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
            gf = g * f[:, None] if (g.shape[-1] <= x.shape[-1] or "bias" in params) else None
            out[role] = _lin.book_keeping(x, g, f, gf, transposed).to(_ps.sum_dtype(p))
        return out

    def release(self, index: int) -> None:
        """Forgets call ``index``'s captured (x, g) once its clipped sums are taken (the group
        would otherwise keep every member's until the last one's sum: peak memory)."""
        if self.ghost is not None:
            self.ghost[0][index] = None

    def can_sum(self, index: int, params: dict[str, Tensor]) -> bool:
        """Whether :meth:`clipped` covers every role of call ``index``'s ``params``: kept
        per-sample gradients, or a ghost weight without flagged records."""
        return all(r in self.stacked or (r == "weight" and self.ghost is not None
                                         and index not in self.flagged) for r in params)


def _roles(cap: _ps.Captured) -> tuple:
    """The roles of a call with their parameters' dtypes (part of every group key)."""
    return tuple(sorted((r, p.dtype) for r, p in cap.params.items()))


def _linear_key(rule, cap: _ps.Captured, grad: Tensor):
    """(key, x (B, T, d), g (B, T, p), params) of a groupable linear call (ghost path, or no
    weight), or None."""
    if type(rule) is not _lin.LinearRule:
        return None
    transposed = bool(getattr(rule, "transposed", False))
    x = cap.activation
    if "weight" in cap.params and x.dim() >= 2 and grad.dim() == x.dim():
        # the path from the shapes alone first: a materialise-path call (not grouped) costs
        # no second round of the rule's checks and views
        seq = math.prod(x.shape[1:-1])
        if seq <= 1 or rule.mode == "materialize" or (rule.mode == "auto" and _lin.choose_path(
                x.shape[0], seq, x.shape[-1], grad.shape[-1]) != "ghost"):
            return None
    try:
        _ps.check_batch(cap, grad)
        x, g, seq = _lin._views(cap, grad)
    except ValueError:
        return None  # the rule raises its own error for this call
    mode = rule.mode
    if seq == 1 and mode != "materialize":
        return None  # ||g|| ||x||: two norms, nothing to gain
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    b, d, p = x.shape[0], x.shape[-1], g.shape[-1]
    path = mode
    if "weight" in cap.params and mode == "auto":
        path = _lin.choose_path(b, seq, d, p)
    if path != "ghost" and "weight" in cap.params:
        return None  # measured no faster grouped (module docstring)
    key = ("linear", path, transposed, b, seq, d, p, x.dtype, _roles(cap))
    return key, x, g, cap.params


def _linear_group(items: list) -> list[tuple[dict, dict]]:
    """LinearRule.norms_sq (ghost path) for calls of one key: each call's Gram matrices written
    into ``(L, B, T, T)`` buffers, then the norms, their rounding bounds and the flags once for
    all (one check for flagged records per group); biases into one ``(L, B, p)`` buffer."""
    path, transposed, b, seq, d, p, dtype, roles = items[0][0][1:]
    roles = dict(roles)
    L = len(items)
    stacked: dict[str, Tensor] = {}
    x0 = items[0][1]
    if "bias" in roles:
        stacked["bias"] = workspace.empty((L, b, p), like=x0)
        for i, it in enumerate(items):
            torch.sum(it[2], 1, out=stacked["bias"][i])
    if "weight" not in roles:
        return _finish(items, b, stacked, dtype)
    gram = bounds.gram_dtype(dtype, seq, (d, p))
    xx = x0.new_empty((L, b, seq, seq), dtype=gram)
    gg = x0.new_empty((L, b, seq, seq), dtype=gram)
    for i, (_, x, g, _) in enumerate(items):
        _lin.ghost_grams(x, g, out=(xx[i], gg[i]))
    norms, flags, bound = _lin.norms_from_grams(xx.view(L * b, seq, seq), gg.view(L * b, seq, seq),
                                                d, p, dtype)
    ghost = ([(it[1], it[2]) for it in items], seq, transposed)
    out = _finish(items, b, stacked, dtype, {"weight": norms.view(L, b)}, bound.view(L, b), ghost)
    if bool(flags.any()):  # rare (bounds.py): materialised per call, as ghost_weight_norms does
        flags = flags.view(L, b)
        for i, (_, x, g, _) in enumerate(items):
            rows = flags[i].nonzero().flatten()
            if rows.numel() == 0:
                continue
            grads = _lin.materialise_flagged(x, g, rows)
            exact = bounds.exact_sq_norms(grads, dtype)
            n, state = out[i]
            n["weight"] = n["weight"].clone()
            n["weight"][rows] = exact
            state[_lin.BOUND] = state[_lin.BOUND].clone()
            rel = 2 * bounds.gamma(grads[0].numel() + 1, bounds.U64)  # as ghost_weight_norms
            state[_lin.BOUND][rows] = exact.double() * rel
            state[_lin.FLAGGED] = (rows, grads.transpose(1, 2) if transposed else grads)
            state[GROUP][0].flagged.add(i)
    return out


def _finish(items: list, b: int, stacked: dict[str, Tensor], dtype, norms: dict | None = None,
            bound: Tensor | None = None, ghost: tuple | None = None) -> list[tuple[dict, dict]]:
    """Each call's (norms, state) from the group's per-sample gradients ``stacked`` (and the
    ghost weight norms ``norms`` (L, B) with their error bounds ``bound``)."""
    L = len(items)
    # the rules' order (bias before a ghost weight): the float64 sum of the norms adds alike
    norms = {**{r: _ps.sq_norms(s.reshape(L * b, math.prod(s.shape[2:])), dtype).view(L, b)
                 for r, s in stacked.items()},  # (L, B, ...): also for B = 0
             **(norms or {})}
    group = Group(b, stacked, items[0][3], ghost)
    out = []
    for i in range(L):
        state: dict = {r: s[i] for r, s in stacked.items()}
        if bound is not None:
            state[_lin.BOUND] = bound[i]
        state[GROUP] = (group, i)
        out.append(({r: n[i] for r, n in norms.items()}, state))
    return out


def _layer_norm_key(rule, cap: _ps.Captured, grad: Tensor):
    """(key, x, g, params) of a groupable layer_norm call, or None."""
    if type(rule) is not _norm.LayerNormRule:
        return None
    x = cap.activation
    try:
        _ps.check_batch(cap, grad)
    except ValueError:
        return None
    if tuple(grad.shape) != tuple(x.shape):
        return None
    ns = _norm._normalized_shape(cap)
    if (any(tuple(p.shape) != ns for p in cap.params.values())
            or tuple(x.shape[x.dim() - len(ns):]) != ns):
        return None  # the rule reports the mismatch
    dt = _ps.acc_dtype(x, grad)
    key = ("layer_norm", tuple(x.shape), dt, ns, float(cap.kwargs.get("eps", 1e-5)), _roles(cap))
    return key, x.to(dt), grad.to(dt), cap.params


def _layer_norm_group(items: list) -> list[tuple[dict, dict]]:
    """LayerNormRule.norms_sq for calls of one key: each call's per-sample gradients reduced
    into one ``(L, B, *normalized_shape)`` buffer, then one norm reduction for all."""
    _, shape, dtype, ns, eps, roles = items[0][0]
    roles = dict(roles)
    L, b = len(items), shape[0]
    lead = tuple(range(1, len(shape) - len(ns)))  # positions between record and normalized dims
    x0 = items[0][1]
    stacked = {r: workspace.empty((L, b) + ns, like=x0) for r in ("weight", "bias") if r in roles}
    for i, (_, x, g, _) in enumerate(items):
        if "weight" in roles:
            t = g * F.layer_norm(x, ns, None, None, eps)
            if lead:
                torch.sum(t, lead, out=stacked["weight"][i])
            else:
                stacked["weight"][i].copy_(t)
        if "bias" in roles:
            if lead:
                torch.sum(g, lead, out=stacked["bias"][i])
            else:
                stacked["bias"][i].copy_(g)
    return _finish(items, b, stacked, dtype)


_KINDS = {"linear": (_linear_key, _linear_group), "linear_t": (_linear_key, _linear_group),
          "layer_norm": (_layer_norm_key, _layer_norm_group)}


def norms(calls: list, rules: dict, eligible) -> dict[int, tuple[dict, dict]]:
    """index of a call in ``calls`` -> ``(norms, state)`` as its rule's ``norms_sq`` would return
    them (the state also holds ``GROUP``), for the calls ``eligible(call)`` allows that fall in a
    group of two or more; the other calls are left to their rules."""
    if not GROUPING:
        return {}
    found: dict[tuple, list] = {}
    for i, c in enumerate(calls):
        kind = _KINDS.get(c.cap.op) if c.cap is not None else None
        if kind is None or c.grad is None or not eligible(c):
            continue
        k = kind[0](rules.get(c.cap.op), c.cap, c.grad)
        if k is not None:
            found.setdefault(k[0], []).append((i, k))
    out: dict[int, tuple[dict, dict]] = {}
    for key, members in found.items():
        # chunks whose buffers stay under MAX_GROUP_ELEMENTS (the per-call path frees each
        # call's Gram matrices before the next call; a group holds its chunk's at once)
        size = max(1, MAX_GROUP_ELEMENTS // max(_elements(key), 1))
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            if len(chunk) < 2:
                continue
            results = _KINDS[key[0]][1]([k for _, k in chunk])
            for (i, _), r in zip(chunk, results):
                out[i] = r
    return out


def _elements(key: tuple) -> int:
    """Elements of the group buffers one call of ``key`` adds."""
    if key[0] == "linear":
        _, path, _, b, seq, d, p, _, roles = key
        grams = 2 * b * seq * seq if any(r == "weight" for r, _ in roles) else 0
        return grams + b * p
    _, shape, _, ns, _, roles = key
    return len(roles) * shape[0] * math.prod(ns)

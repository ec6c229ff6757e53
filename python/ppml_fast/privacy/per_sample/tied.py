"""Per-sample norms of a parameter shared by an embedding and a linear layer: tied input/output
embeddings (GPT-2's ``wte`` and ``lm_head``, BERT's word embeddings and MLM decoder), without
materialising the two (B, V, D) per-sample gradients where the rules would not.

Record i's gradient of the shared ``W`` (V x D) is the sum of the two uses' gradients,
``G_i = E_i + H_i`` with ``E_i = sum_t e_{idx_t} delta_t^T`` (embedding: rows of ``W`` looked up at
the indices, ``delta_t`` the gradient of the looked-up row; padding positions contribute nothing)
and ``H_i = sum_s g_s x_s^T`` (linear: ``x_s`` its input rows, ``g_s`` in R^V its output gradients).
Its squared norm is **not** the sum of the two norms (that sum is neither an upper nor a lower
bound):

    ||G_i||^2 = ||E_i||^2 + ||H_i||^2 + 2 <E_i, H_i>,
    <E_i, H_i> = sum_{t,s} <e_{idx_t} delta_t^T, g_s x_s^T> = sum_{t,s} g_s[idx_t] (delta_t . x_s)

(the ghost cross term: a (T_e, T_l) matrix of dots of length D and a gather of the output
gradients at the looked-up indices, ``B T_e T_l D`` multiply-adds; the idea of Li et al. 2021,
arXiv 2110.05679, sec. 4, applied to the sum of two layers' gradients). Two paths:

- **fold** (the linear rule materialised ``H_i``, its cost model or ``mode="materialize"``): the
  embedding's rows are added into the kept ``H_i`` (``index_add`` of ``B T_e`` rows), whose norm
  and weighted sum are then those of ``G_i`` itself; the embedding call adds nothing more.
- **ghost** (the linear rule kept no ``H_i``): the rules' norms (upper bounds with their error
  bounds, :mod:`bounds`) plus ``2 X'`` and the cross term's rounding bound
  ``|X' - X| <= coef * sum_{t,s} |g_s[idx_t]| ||delta_t|| ||x_s||`` (Higham Lemma 3.1 on each
  dot of length D, the gathered factor exact; ``bounds.gram_coef(D, 0, T_l, T_e, u)``), the
  norms' own rounding by :func:`bounds.norm_slack`. As in :mod:`bounds`, a record whose total
  error bound exceeds ``TAU`` of its computed squared norm (its two parts cancel: ``E_i ~ -H_i``),
  whose book-keeping terms are too large against its norm (``BOOK_TAU``), or that a rule flagged,
  is materialised on its own in float64 (``E_i + H_i``, one (V, D) matrix per such record): its
  norm is that matrix's and the linear call's clipped sum adds it (factor exactly 0 in both
  book-keeping sums), the embedding call's adds nothing for it.

The clipped sum is then each call's own (book-keeping) sum with the same factor, which add up to
``sum_i f_i G_i``. Used by :class:`~ppml_fast.privacy.clipping.ClippedSums` for a parameter
whose only uses in a batch are one embedding call (weight only) and one linear call (its weight,
whole, not a part); other sharing patterns materialise every use as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps
from ppml_fast.privacy.per_sample import bounds
from ppml_fast.privacy.per_sample import embedding as _emb
from ppml_fast.privacy.per_sample import linear as _lin

# State key of an embedding call whose records were all folded into the linear call's kept
# per-sample gradients: its clipped sum is zero.
FOLDED = _emb.FOLDED


def supported(emb_cap: _ps.Captured, lin_cap: _ps.Captured, rules: dict) -> bool:
    """Whether the pair can take this module's paths: an embedding call holding only the shared
    weight, a linear call holding it as its whole weight, both by the stock rules."""
    emb_rule, lin_rule = rules.get("embedding"), rules.get("linear")
    return (emb_cap.op == "embedding" and lin_cap.op == "linear"
            and type(emb_rule) is _emb.EmbeddingRule and type(lin_rule) is _lin.LinearRule
            and not lin_rule.transposed and set(emb_cap.params) == {"weight"}
            and "weight" in lin_cap.params
            and tuple(emb_cap.params["weight"].shape) == tuple(lin_cap.params["weight"].shape))


def pairs(calls: list, shared_ids: set, rules: dict) -> dict[int, tuple[int, int]]:
    """id(parameter) -> (index of its embedding call, index of its linear call) in ``calls``
    (:class:`~ppml_fast.privacy.capture.Call` objects of one batch) for each shared parameter
    whose uses in the batch are exactly one embedding call and one linear call that
    :func:`supported` accepts, neither using a part of it nor another shared parameter."""
    users: dict[int, list[int]] = {}
    for i, c in enumerate(calls):
        if c.grad is None:
            continue
        for p in c.params.values():
            if id(p) in shared_ids:
                users.setdefault(id(p), []).append(i)
    out: dict[int, tuple[int, int]] = {}
    for pid, idx in users.items():
        if len(idx) != 2:
            continue
        a, b = (calls[i] for i in idx)
        if a.cap is None or b.cap is None or a.spans or b.spans:
            continue
        if a.cap.op == "linear":
            a, b, idx = b, a, idx[::-1]
        if not supported(a.cap, b.cap, rules) or id(a.params.get("weight")) != pid:
            continue
        if id(b.params["weight"]) != pid or any(
                id(p) in shared_ids for r, p in b.params.items() if r != "weight"):
            continue
        out[pid] = (idx[0], idx[1])
    return out


def _inputs(emb_cap, emb_grad, lin_cap, lin_grad):
    """(idx (B, T_e), delta (B, T_e, D) with padding rows zeroed, x (B, T_l, D), g (B, T_l, V)),
    all in one accumulation dtype."""
    idx, delta, pad, _ = _emb._prepare(emb_cap, emb_grad)
    x, g, _ = _lin._views(lin_cap, lin_grad)
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    dt = _ps.acc_dtype(delta, x, g)
    delta, x, g = delta.to(dt), x.to(dt), g.to(dt)
    if pad is not None:
        delta = delta.masked_fill((idx == pad)[..., None], 0)
    return idx, delta, x, g


def _fold(idx: Tensor, delta: Tensor, kept: Tensor) -> Tensor:
    """``H + E`` per record: the embedding rows (padding rows already zero) added into a copy of
    the kept linear gradients ``kept`` (B, V, D)."""
    batch, num, dim = kept.shape
    keys = (torch.arange(batch, device=idx.device)[:, None] * num + idx).reshape(-1)
    out = kept.reshape(batch * num, dim).clone()
    out.index_add_(0, keys, delta.reshape(-1, dim).to(out.dtype))
    return out.view(batch, num, dim)


def _materialised(idx, delta, x, g, rows: Tensor) -> Tensor:
    """Float64 ``E_r + H_r`` (k, V, D) of the records ``rows``."""
    h = torch.bmm(g[rows].double().transpose(1, 2), x[rows].double())
    return _fold(idx[rows], delta[rows].double(), h)


def _interval(state, norm: Tensor, out_dtype: torch.dtype, lengths: tuple[int, ...] | None):
    """[low, up] (float64) holding a part's true squared norm, from the norm a rule returned.

    Ghost paths return ``U = N'^2 + b`` rounded up to out_dtype (relative 2 u_out, and 2^-50) with
    ``|N'^2 - N^2| <= b`` (the rule's BOUND): ``N^2 in [U (1 - 4 u_out) - 2 b, U]``. The linear
    rule's one-position path (``lengths`` = (d, p)) returns ``||g||^2 ||x||^2`` as computed: two
    norms of relative error ``gamma_{n+1}`` on the square (:func:`bounds.norm_slack`) and a
    product and square, ``N^2 in U [1 - r, 1 + r]``. Else the widest an unflagged record has."""
    u_norm = norm.double()
    u = bounds.unit_roundoff(out_dtype)
    b = state.get(_lin.BOUND) if isinstance(state, dict) else None
    if b is not None:
        return u_norm * (1 - 4 * u) - 2 * b.double(), u_norm
    if lengths is not None:
        r = bounds._up(sum(bounds.gamma(n + 1, u) for n in lengths) + 8 * u)
        return u_norm * (1 - r), u_norm * (1 + r)
    return u_norm * (1 - 2 * bounds.TAU - 4 * u), u_norm


def norms(emb_cap, emb_grad, lin_cap, lin_grad, rules: dict, mode: str | None = None):
    """(norms, emb_state, lin_state): the linear call's norms by role with ``"weight"`` the shared
    parameter's combined squared norms (upper bounds, see the module docstring), and the two
    calls' states for ``clipped_sum`` (the embedding's may be ``{FOLDED: True}``: add nothing)."""
    _ps.check_batch(emb_cap, emb_grad)
    _ps.check_batch(lin_cap, lin_grad)
    lin_rule, emb_rule = rules["linear"], rules["embedding"]
    mode = _ps.check_mode(lin_rule.mode if mode is None else mode)
    idx, delta, x, g = _inputs(emb_cap, emb_grad, lin_cap, lin_grad)
    batch, seq_e, dim = delta.shape
    seq_l, vocab = g.shape[1], g.shape[2]
    if mode == "materialize" or (mode == "auto" and seq_l > 1
                                 and _lin.choose_path(batch, seq_l, dim, vocab) == "materialize"):
        # fold path: the linear rule's materialise branch, the embedding rows added in place
        kept = lin_rule._outer(x, g)  # (B, V, D)
        keys = (torch.arange(batch, device=idx.device)[:, None] * vocab + idx).reshape(-1)
        kept.view(batch * vocab, dim).index_add_(0, keys, delta.reshape(-1, dim))
        lin_state = {"weight": kept}
        lin_norms = {"weight": _ps.sq_norms(kept, x.dtype)}
        if "bias" in lin_cap.params:
            lin_state["bias"] = g.sum(1)
            lin_norms["bias"] = _ps.sq_norms(lin_state["bias"], x.dtype)
        return lin_norms, {FOLDED: True}, lin_state
    lin_norms, lin_state = lin_rule.norms_sq(lin_cap, lin_grad, mode=mode)
    out_dtype = lin_norms["weight"].dtype
    emb_norms, emb_state = emb_rule.norms_sq(emb_cap, emb_grad, mode=mode)
    u = bounds.unit_roundoff(delta.dtype)
    with bounds.full_precision():
        a = torch.bmm(delta, x.transpose(1, 2))  # (B, T_e, T_l): delta_t . x_s
    gsel = torch.gather(g, 2, idx[:, None, :].expand(batch, seq_l, seq_e))  # g_s[idx_t]
    cross = torch.linalg.vecdot(a, gsel.transpose(1, 2), dim=-1).double().sum(1)
    n_delta = bounds.row_norms(delta)  # (B, T_e) float64
    n_x = bounds.row_norms(x)
    s_cross = torch.bmm(torch.bmm(n_delta[:, None, :], gsel.double().abs().transpose(1, 2)),
                        n_x[:, :, None]).reshape(batch)
    e_cross = s_cross * (bounds.gram_coef(dim, 0, seq_l, seq_e, u)
                         * bounds.norm_slack((dim, dim), u, seq_e * seq_l + 2))
    low_e, up_e = _interval(emb_state, emb_norms["weight"], out_dtype, None)
    one = lin_cap.activation.dim() == 2 or seq_l == 1
    low_l, up_l = _interval(lin_state, lin_norms["weight"], out_dtype, (dim, vocab) if one else None)
    upper = up_e + up_l + 2 * cross + 2 * e_cross
    lower = low_e + low_l + 2 * cross - 2 * e_cross
    centre, half = (upper + lower) / 2, (upper - lower) / 2
    s_book = n_delta.sum(1) + (bounds.row_norms(g) * n_x).sum(1)
    combined, flags = bounds.upper_and_flags(
        centre, half, out_dtype, s=s_book * bounds.norm_slack((dim, vocab), u, seq_l + seq_e),
        u_book=bounds.book_roundoff(out_dtype))
    for st in (emb_state, lin_state):  # records a rule flagged: recomputed together below
        if isinstance(st, dict) and _lin.FLAGGED in st:
            flags[st[_lin.FLAGGED][0]] = True
    emb_state = dict(emb_state) if isinstance(emb_state, dict) else {}
    lin_state = dict(lin_state) if isinstance(lin_state, dict) else {}
    for st in (emb_state, lin_state):
        st.pop(_lin.FLAGGED, None)
        st.pop(_lin.BOUND, None)
    if bool(flags.any()):
        rows = flags.nonzero().flatten()
        grads = _materialised(idx, delta, x, g, rows)
        combined[rows] = bounds.exact_sq_norms(grads, out_dtype)
        lin_state[_lin.FLAGGED] = (rows, grads)
        empty = grads.new_zeros((0, dim))
        none = rows.new_zeros(0)
        emb_state[_emb.FLAGGED] = (rows, (none, none, empty))
    return {**lin_norms, "weight": combined}, emb_state, lin_state


def drop_states(calls: list, pairs: dict, rules: dict, finite: Tensor) -> dict[int, object]:
    """id(call) -> the state of each paired call recomputed jointly (:func:`norms`) with the
    records that are not ``finite`` zeroed, as the DP step zeroes them (``nonfinite="drop"``:
    their output gradients, and a floating-point activation): the pair's states must stay joint
    (a record whose parts cancel stays out of both book-keeping sums)."""
    out: dict[int, object] = {}
    for ie, il in pairs.values():
        e, lin = calls[ie], calls[il]

        def zero(t: Tensor) -> Tensor:
            return torch.where(finite.view(-1, *[1] * (t.dim() - 1)), t, torch.zeros_like(t))

        lcap = _ps.Captured(lin.cap.op, zero(lin.cap.activation), lin.cap.params, lin.cap.kwargs)
        _, out[id(e)], out[id(lin)] = norms(e.cap, zero(e.grad), lcap, zero(lin.grad), rules)
    return out


def per_sample(emb_cap, emb_grad, lin_cap, lin_grad) -> Tensor:
    """The shared weight's per-sample gradients ``E_i + H_i`` (B, V, D) (reference path)."""
    idx, delta, x, g = _inputs(emb_cap, emb_grad, lin_cap, lin_grad)
    return _fold(idx, delta, torch.bmm(g.transpose(1, 2), x))


__all__ = ["FOLDED", "drop_states", "norms", "pairs", "per_sample", "supported"]

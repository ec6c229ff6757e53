"""Per-sample norms and clipped sums for ``F.embedding(indices (B, T...), weight (V, D))``.

Sample i's gradient is ``sum_t e_{idx_t} g_t^T``: row v holds the sum of the g_t whose index is v.
Its squared norm, never building the (V, D) gradient:

- ghost (Li et al. 2021): ``sum_{t,s} [idx_t == idx_s] (g_t.g_s)``, a T x T Gram matrix per
  sample, ``B T^2 D``;
- rows: sort the (sample, index) keys, add each sample's rows with the same index
  (``index_add``), and sum the squares of those row sums: ``O(B T D + B T log(B T))``.

Both are exact in exact arithmetic; in floating point both can cancel (``g_s = -g_t`` on one
index), so each returns an upper bound (Gram: Higham's dot-product bound; rows: the rounding of the
row sums) and materialises in float64 the records it cannot vouch for, which then leave the
batch's ``index_add`` (:mod:`bounds`). ``"auto"`` takes the Gram formula below
``GRAM_MAX_SEQ`` = 32 indices per sample,
else rows; ``"ghost"`` forces the Gram formula and ``"materialize"`` builds the dense (B, V, D)
gradients (reference path: B V D numbers). Measured on the 2-core dev box (torch 2.13, one thread,
thread CPU time, min of 10 calls; rows vs Gram norms, ms), B=32 V=10k D=128:
T=16 0.19 vs 0.14, T=32 0.25 vs 0.27, T=64 0.49 vs 0.78, T=256 1.6 vs 20.9; B=8 T=512 V=32k
D=512: 3.3 vs 38.9. The native embedding backward of the same call: 0.19, 0.23, 0.58, 1.2, 44 ms.

Positions whose index is ``padding_idx`` contribute nothing (F.embedding gives that row no
gradient). The clipped sum is one ``index_add`` of factor-scaled ``grad_out`` into a (V, D) zero
tensor, padding row zeroed after (0.53 ms vs 0.58 for the native backward at B=32 T=64).

kwargs: ``padding_idx`` (None or an int, negative counts from the end, as F.embedding),
``scale_grad_by_freq`` and ``sparse`` (True is refused), ``max_norm`` (accepted: F.embedding
renormalises the rows in place before the lookup, which leaves the gradient formula unchanged).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps
from ppml_fast.privacy.per_sample import bounds, embedding_rows

# State key of the records whose norm the error bound could not vouch for: (record indices (k,),
# (row record (m,) as an index into those, vocabulary row (m,), summed gradient rows (m, D))).
FLAGGED = "weight:flagged"

# State key of a call whose gradient another call's state already holds (per_sample.tied: the
# embedding half of a tied weight folded into the linear half's kept per-sample gradients): its
# clipped sum is zero.
FOLDED = "weight:folded"

# State key of each record's error bound b (float64 (B,)): |N'^2 - N^2| <= b, the norm returned
# being N'^2 + b rounded upward (per_sample.tied combines two uses of a tied weight with it).
BOUND = "weight:bound"

# "auto" uses the Gram formula below this many indices per sample, else rows.
GRAM_MAX_SEQ = 32


def _padding_idx(cap: _ps.Captured, num: int) -> int | None:
    if cap.kwargs.get("scale_grad_by_freq", False):
        raise ValueError(
            "embedding: scale_grad_by_freq=True is not supported (it couples the samples of a "
            "batch, so per-sample gradients are not defined); got scale_grad_by_freq=True"
        )
    if cap.kwargs.get("sparse", False):
        raise ValueError("embedding: sparse=True is not supported for DP training; got sparse=True")
    pad = cap.kwargs.get("padding_idx")
    if pad is None:
        return None
    pad = int(pad)
    if not -num <= pad < num:
        raise ValueError(f"embedding: padding_idx must be in [-{num}, {num}); got {pad}")
    return pad + num if pad < 0 else pad


def _prepare(cap: _ps.Captured, grad_out: Tensor):
    idx = cap.activation
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"embedding: activation must be the int64/int32 indices; got {idx.dtype}")
    weight = cap.params.get("weight")
    if weight is None:
        return None
    num, dim = weight.shape
    batch = idx.shape[0]
    if tuple(grad_out.shape) != tuple(idx.shape) + (dim,):
        raise ValueError(
            f"embedding: grad_out must be {tuple(idx.shape) + (dim,)}; got {tuple(grad_out.shape)}"
        )
    pad = _padding_idx(cap, num)
    seq = math.prod(idx.shape[1:])
    dt = _ps.acc_dtype(grad_out)
    idx2 = idx.reshape(batch, seq).long()
    g2 = grad_out.reshape(batch, seq, dim).to(dt)
    return idx2, g2, pad, num


def _keys(idx2: Tensor, num: int) -> Tensor:
    """Flat keys ``sample * V + index`` (B T,)."""
    batch = idx2.shape[0]
    return (torch.arange(batch, device=idx2.device)[:, None] * num + idx2).reshape(-1)


def distinct(cap: _ps.Captured, idx2: Tensor, pad: int | None) -> bool:
    """Whether no record looks up a row twice (padding positions aside): then each record's
    gradient rows are its own ``g_t``, unsummed, and its squared norm is ``sum_t ||g_t||^2``.
    Indices shared by the batch (stride 0 in the batch dimension: Hugging Face's (1, T)
    position_ids expanded to one row per record, PrivateModule._broadcast) are checked on one
    row; others by one sort of each record's indices."""
    act = cap.activation
    shared = act.dim() >= 1 and act.shape[0] > 1 and act.stride(0) == 0
    rows = idx2[:1] if shared else idx2
    if rows.shape[0] == 0 or rows.shape[1] < 2:
        return True
    s = rows.sort(1).values
    dup = s[:, 1:] == s[:, :-1]
    if pad is not None:
        dup &= s[:, 1:] != pad
    return not bool(dup.any())


def choose_path(seq: int) -> str:
    """"ghost" (T x T Gram) or "rows" (sort and add rows) for ``seq`` indices per sample."""
    return "ghost" if seq < GRAM_MAX_SEQ else "rows"


class EmbeddingRule:
    """``F.embedding``; see the module docstring for kwargs."""

    def __init__(self, mode: str = "auto") -> None:
        self.mode = _ps.check_mode(mode)

    def norms_sq(
        self, cap: _ps.Captured, grad_out: Tensor, *, mode: str | None = None
    ) -> tuple[dict[str, Tensor], object]:
        mode = _ps.check_mode(self.mode if mode is None else mode)
        _ps.check_batch(cap, grad_out)
        prep = _prepare(cap, grad_out)
        if prep is None:
            return {}, None
        idx2, g2, pad, num = prep
        batch = idx2.shape[0]
        if mode == "materialize":
            dense = self._dense(idx2, g2, pad, num)
            return {"weight": _ps.sq_norms(dense, g2.dtype)}, {"weight": dense}
        if mode == "auto" and embedding_rows.usable(idx2, g2):  # one native call: any T
            computed, bound, s = embedding_rows.norms(idx2, g2, pad)
            norms, flags = bounds.upper_and_flags(computed, bound, g2.dtype, s=s,
                                                  u_book=bounds.book_roundoff(g2.dtype))
            return self._vouched(norms, flags, bound, idx2, g2, pad, num)
        if mode == "auto" and distinct(cap, idx2, pad):
            # no row looked up twice in a record (position ids): its gradient's rows are its
            # g_t, its squared norm a float64 norm of them (no cancellation possible: relative
            # error gamma_{n+4}(2^-53) on the square, sqrt and square included), rounded up
            rows = g2 if pad is None else g2.masked_fill((idx2 == pad)[..., None], 0)
            flat = rows.reshape(batch, rows[0].numel() if batch else 0).double()
            rel = bounds.gamma(flat.shape[1] + 4, bounds.U64)
            sq = torch.linalg.vector_norm(flat, dim=1).square()
            norms = bounds.round_up(sq * bounds._up(1.0 + rel), g2.dtype)
            return {"weight": norms}, {BOUND: sq * (2 * rel)}
        path = "ghost" if mode == "ghost" else choose_path(idx2.shape[1])
        u = bounds.unit_roundoff(g2.dtype)
        seq, dim = idx2.shape[1], g2.shape[-1]
        if path == "ghost":
            same = idx2[:, :, None] == idx2[:, None, :]
            if pad is not None:
                same &= (idx2 != pad)[:, :, None]
            gg2, u_gram = g2, u
            if bounds.gram_dtype(g2.dtype, seq, (dim,)) != g2.dtype:  # wide rows: float64 Gram
                gg2, u_gram = g2.double(), bounds.U64
            with bounds.full_precision():
                gram = torch.bmm(gg2, gg2.transpose(1, 2))
            # Higham Lemma 3.1 on each g_s.g_t (the 0/1 mask is exact), float64 sums of T then T
            # terms (gram_coef's inner sum assumes the Gram's precision: conservative):
            # |N'^2 - N^2| <= coef * sum_{s,t same} ||g_s|| ||g_t|| (bounds module).
            computed = (gram * same).sum(2, dtype=torch.float64).sum(1)
            nrm = bounds.diag_norms(gram)  # (B, T) float64
            if pad is not None:
                nrm = nrm.masked_fill(idx2 == pad, 0.0)
            s2 = ((nrm[:, :, None] * nrm[:, None, :]) * same).sum(2).sum(1)
            slack = bounds.norm_slack((dim,), u_gram, seq)
            scale = bounds.gram_coef(dim, 0, seq, seq, u_gram) * slack**2
            bound = s2 * scale
            norms, flags = bounds.upper_and_flags(
                computed, bound, g2.dtype, s=nrm.sum(1) * slack,
                u_book=bounds.book_roundoff(g2.dtype))
        else:
            uniq, inverse = torch.unique(_keys(idx2, num), return_inverse=True)
            rows = g2.reshape(-1, g2.shape[-1])
            sums = rows.new_zeros(uniq.shape[0], rows.shape[1])
            sums.index_add_(0, inverse.reshape(-1), rows)
            sq = torch.linalg.vector_norm(sums, dim=1).double().square()
            if pad is not None:
                sq = sq.masked_fill(uniq % num == pad, 0)
            computed = sq.new_zeros(batch).index_add_(0, uniq // num, sq)
            # The row sums r'_v are rounded: ||r' - r|| <= gamma_T sum_t ||g_t|| (Higham Lemma 3.1
            # per element, any order: CUDA atomics too), so N <= ||r'|| + gamma_T S, with ||r'||
            # from a float32 norm (gamma_{D+1}) and a float64 sum.
            nrm = bounds.row_norms(g2)  # (B, T) float64
            if pad is not None:
                nrm = nrm.masked_fill(idx2 == pad, 0.0)
            low = ((1.0 - bounds.gamma(dim + 1, u)) * (1.0 - u) ** 2
                   * (1.0 - bounds.gamma(seq, bounds.U64)))
            up = (computed / low).sqrt() + nrm.sum(1) * (
                bounds.gamma(seq, u) * bounds.norm_slack((dim,), u, seq))
            bound = up.square() - computed
            norms, flags = bounds.upper_and_flags(
                computed, bound, g2.dtype,
                s=nrm.sum(1) * bounds.norm_slack((dim,), u, seq),
                u_book=bounds.book_roundoff(g2.dtype))
        return self._vouched(norms, flags, bound, idx2, g2, pad, num)

    def _vouched(self, norms: Tensor, flags: Tensor, bound: Tensor, idx2: Tensor, g2: Tensor,
                 pad: int | None, num: int) -> tuple[dict[str, Tensor], dict]:
        """(norms, state) of a bounded path: the flagged records' norms recomputed from their
        float64 row sums (they then leave the batch's index_add: :mod:`bounds`)."""
        if not bool(flags.any()):
            return {"weight": norms}, {BOUND: bound}
        flagged = self._flagged(idx2, g2, pad, num, flags.nonzero().flatten())
        norms[flagged[0]] = bounds.exact_sq_norms_rows(flagged[1], flagged[0].shape[0], g2.dtype)
        return {"weight": norms}, {FLAGGED: flagged, BOUND: bound}

    @staticmethod
    def _flagged(idx2: Tensor, g2: Tensor, pad: int | None, num: int, recs: Tensor):
        """The flagged records' gradients as summed rows (float64): (recs, (row record in
        0..k-1, vocabulary row, rows)); padding positions dropped (they contribute nothing)."""
        idx, g = idx2[recs], g2[recs].double()  # float64: see linear.ghost_weight_norms
        keys = _keys(idx, num)
        rows = g.reshape(-1, g.shape[-1])
        if pad is not None:
            keep = idx.reshape(-1) != pad
            keys, rows = keys[keep], rows[keep]
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = rows.new_zeros(uniq.shape[0], rows.shape[1]).index_add_(0, inverse, rows)
        return recs, (uniq // num, uniq % num, sums)

    @staticmethod
    def _dense(idx2: Tensor, g2: Tensor, pad: int | None, num: int) -> Tensor:
        batch, dim = idx2.shape[0], g2.shape[-1]
        dense = g2.new_zeros(batch * num, dim).index_add_(0, _keys(idx2, num), g2.reshape(-1, dim))
        dense = dense.reshape(batch, num, dim)
        if pad is not None:
            dense[:, pad] = 0
        return dense

    def clipped_sum(
        self, cap: _ps.Captured, grad_out: Tensor, factors: Tensor, state: object
    ) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out, factors)
        if isinstance(state, dict) and "weight" in state:
            return _ps.clipped_from({"weight": state["weight"]}, factors, cap.params)
        if isinstance(state, dict) and state.get(FOLDED) and "weight" in cap.params:
            weight = cap.params["weight"]
            return {"weight": torch.zeros(weight.shape, dtype=_ps.sum_dtype(weight), device=weight.device)}
        prep = _prepare(cap, grad_out)
        if prep is None:
            return {}
        idx2, g2, pad, num = prep
        weight = cap.params["weight"]
        dim = g2.shape[-1]
        f = factors.to(g2.dtype)
        flagged = state.get(FLAGGED) if isinstance(state, dict) else None
        if flagged is not None:
            # Flagged records: factor exactly 0 in the batch's index_add, their summed rows
            # (clipped) added on their own (bounds module docstring).
            recs, (rec, vocab, rows) = flagged
            f_rows = f[recs][rec]
            f = bounds.split_factors(f, recs)
        scaled = (g2 * f[:, None, None]).reshape(-1, dim)
        total = scaled.new_zeros(num, dim).index_add_(0, idx2.reshape(-1), scaled)
        if flagged is not None:
            extra = rows.new_zeros(num, dim).index_add_(0, vocab, rows * f_rows.double()[:, None])
            total = (total.double() + extra).to(total.dtype)
        if pad is not None:
            total[pad] = 0
        return {"weight": total.to(_ps.sum_dtype(weight))}

    def per_sample(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out)
        prep = _prepare(cap, grad_out)
        if prep is None:
            return {}
        idx2, g2, pad, num = prep
        return {"weight": self._dense(idx2, g2, pad, num).to(cap.params["weight"].dtype)}

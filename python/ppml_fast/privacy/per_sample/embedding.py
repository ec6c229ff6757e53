"""Per-sample norms and clipped sums for ``F.embedding(indices (B, T...), weight (V, D), padding_idx)``.

Sample i's gradient is ``sum_t e_{idx_t} g_t^T``: row v holds the sum of the g_t whose index is v.
Its squared norm, never building the (V, D) gradient:

- ghost (Li et al. 2021): ``sum_{t,s} [idx_t == idx_s] (g_t.g_s)``, a T x T Gram matrix per
  sample, ``B T^2 D``;
- rows: sort the (sample, index) keys, add each sample's rows with the same index
  (``index_add``), and sum the squares of those row sums: ``O(B T D + B T log(B T))``.

Both are exact; ``"auto"`` uses rows (see :data:`AUTO_PATH` for the measurement), ``"ghost"`` forces
the Gram formula and ``"materialize"`` builds the dense (B, V, D) gradients. Positions whose index
is ``padding_idx`` contribute nothing (F.embedding gives that row no gradient). The clipped sum
is one native ``embedding_dense_backward`` (an index_add) of factor-scaled ``grad_out``.

kwargs: ``padding_idx`` (None or an int, negative counts from the end, as F.embedding),
``scale_grad_by_freq`` and ``sparse`` (True is refused), ``max_norm`` (accepted: F.embedding
renormalises the rows in place before the lookup, which leaves the gradient formula unchanged).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps

AUTO_PATH = "rows"


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


def _keys(idx2: Tensor, num: int, pad: int | None, g2: Tensor) -> tuple[Tensor, Tensor]:
    """Flat keys ``sample * V + index`` and the matching rows of grad_out, padding dropped."""
    batch, seq = idx2.shape
    keys = (torch.arange(batch, device=idx2.device)[:, None] * num + idx2).reshape(-1)
    rows = g2.reshape(batch * seq, g2.shape[-1])
    if pad is not None:
        keep = idx2.reshape(-1) != pad
        keys, rows = keys[keep], rows[keep]
    return keys, rows


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
        if mode == "ghost":
            same = idx2[:, :, None] == idx2[:, None, :]
            if pad is not None:
                same &= (idx2 != pad)[:, :, None]
            gram = torch.bmm(g2, g2.transpose(1, 2))
            return {"weight": (gram * same).flatten(1).sum(1)}, None
        keys, rows = _keys(idx2, num, pad, g2)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = rows.new_zeros(uniq.shape[0], rows.shape[1]).index_add_(0, inverse, rows)
        norms = rows.new_zeros(batch).index_add_(0, uniq // num, torch.linalg.vecdot(sums, sums))
        return {"weight": norms}, None

    @staticmethod
    def _dense(idx2: Tensor, g2: Tensor, pad: int | None, num: int) -> Tensor:
        keys, rows = _keys(idx2, num, pad, g2)
        dense = rows.new_zeros(idx2.shape[0] * num, rows.shape[1]).index_add_(0, keys, rows)
        return dense.reshape(idx2.shape[0], num, rows.shape[1])

    def clipped_sum(
        self, cap: _ps.Captured, grad_out: Tensor, factors: Tensor, state: object
    ) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out, factors)
        if isinstance(state, dict) and "weight" in state:
            return _ps.clipped_from(state, factors, cap.params)
        prep = _prepare(cap, grad_out)
        if prep is None:
            return {}
        idx2, g2, pad, num = prep
        weight = cap.params["weight"]
        scaled = g2 * factors.to(g2.dtype)[:, None, None]
        total = torch.ops.aten.embedding_dense_backward(
            scaled, idx2, num, -1 if pad is None else pad, False
        )
        return {"weight": total.to(weight.dtype)}

    def per_sample(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out)
        prep = _prepare(cap, grad_out)
        if prep is None:
            return {}
        idx2, g2, pad, num = prep
        return {"weight": self._dense(idx2, g2, pad, num).to(cap.params["weight"].dtype)}

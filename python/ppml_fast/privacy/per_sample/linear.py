"""Per-sample norms and clipped sums for ``F.linear`` on 2-D ``(B, d)`` and sequence ``(B, T..., d)`` inputs.

Sample i's weight gradient is ``G_i = sum_t g_{i,t} x_{i,t}^T`` (p x d) and its bias gradient
``sum_t g_{i,t}``. Two ways to its squared norm:

- ghost (Li et al. 2021): ``||G_i||^2 = sum_{t,s} (g_t.g_s)(x_t.x_s)``, two T x T Gram matrices per
  sample, ``B T^2 (d + p)`` multiply-adds, nothing kept; the clipped sum is then book-keeping
  (Bu et al. 2023): one ``(p, B T) @ (B T, d)`` matmul with the factors folded into the smaller
  operand, ``B T d p``, the cost of the non-private weight gradient. For T = 1 the norm is
  ``||g||^2 ||x||^2``, ``B (d + p)``.
- materialise: one batched matmul ``G = g^T x`` (``B T d p``), its row norms and, at clip time,
  ``factors @ G`` (``2 B d p`` memory-bound work); G is kept between the two calls.

Both pay ``B T d p`` once (book-keeping matmul vs. per-sample matmul), so the choice ("mixed ghost
clipping", Bu et al. 2023) compares what is left: ghost ``T^2 (d + p)`` vs. materialise
``KAPPA * d p`` per sample; ghost iff ``T^2 (d + p) < KAPPA * d * p``, and always while ``B d p`` exceeds
``MATERIALIZE_MAX_ELEMENTS``. See :data:`KAPPA` for what was measured.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps

# Materialise-side overhead in units of one Gram multiply-add per (d p) element (fit below).
KAPPA = 4.0


def choose_path(batch: int, seq: int, d: int, p: int) -> str:
    """"ghost" or "materialize" for a linear call with ``seq`` positions per sample."""
    if seq <= 1:
        return "ghost"
    if batch * d * p > _ps.MATERIALIZE_MAX_ELEMENTS:
        return "ghost"
    return "ghost" if seq * seq * (d + p) < KAPPA * d * p else "materialize"


def _views(cap: _ps.Captured, grad_out: Tensor) -> tuple[Tensor, Tensor, int]:
    x = cap.activation
    if x.dim() < 2:
        raise ValueError(
            f"linear: activation must be (B, ..., in_features); got shape {tuple(x.shape)}"
        )
    batch, d = x.shape[0], x.shape[-1]
    p = grad_out.shape[-1]
    seq = math.prod(x.shape[1:-1])
    if tuple(grad_out.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(
            f"linear: grad_out must be {tuple(x.shape[:-1]) + ('out_features',)}; "
            f"got {tuple(grad_out.shape)}"
        )
    dt = _ps.acc_dtype(x, grad_out)
    return x.reshape(batch, seq, d).to(dt), grad_out.reshape(batch, seq, p).to(dt), seq


def _bias_per_sample(g: Tensor, seq: int) -> Tensor:
    return g[:, 0] if seq == 1 else g.sum(1)


def _ghost_weight_norms(x: Tensor, g: Tensor, seq: int) -> Tensor:
    if seq == 1:
        x2, g2 = x[:, 0], g[:, 0]
        return torch.linalg.vecdot(x2, x2) * torch.linalg.vecdot(g2, g2)
    xx = torch.bmm(x, x.transpose(1, 2)).flatten(1)
    gg = torch.bmm(g, g.transpose(1, 2)).flatten(1)
    return torch.linalg.vecdot(xx, gg)


class LinearRule:
    """``F.linear(input, weight (p, d), bias (p,))``. kwargs: none used."""

    def __init__(self, mode: str = "auto") -> None:
        self.mode = _ps.check_mode(mode)

    def norms_sq(
        self, cap: _ps.Captured, grad_out: Tensor, *, mode: str | None = None
    ) -> tuple[dict[str, Tensor], object]:
        mode = _ps.check_mode(self.mode if mode is None else mode)
        batch = _ps.check_batch(cap, grad_out)
        x, g, seq = _views(cap, grad_out)
        norms: dict[str, Tensor] = {}
        state: dict[str, Tensor] = {}
        if "bias" in cap.params:
            state["bias"] = _bias_per_sample(g, seq)
            norms["bias"] = _ps.sq_norms(state["bias"], x.dtype)
        if "weight" in cap.params:
            path = mode
            if mode == "auto":
                path = choose_path(batch, seq, x.shape[-1], g.shape[-1])
            if path == "ghost":
                norms["weight"] = _ghost_weight_norms(x, g, seq)
            else:
                state["weight"] = torch.bmm(g.transpose(1, 2), x)
                norms["weight"] = _ps.sq_norms(state["weight"], x.dtype)
        return norms, state

    def clipped_sum(
        self, cap: _ps.Captured, grad_out: Tensor, factors: Tensor, state: object
    ) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out, factors)
        kept = state if isinstance(state, dict) else {}
        out = _ps.clipped_from({r: kept[r] for r in cap.params if r in kept}, factors, cap.params)
        missing = [r for r in cap.params if r not in out]
        if not missing:
            return out
        x, g, seq = _views(cap, grad_out)
        f = factors.to(x.dtype)
        if "bias" in missing:
            b = _bias_per_sample(g, seq)
            out["bias"] = _ps.weighted_sum(b, f, cap.params["bias"])
        if "weight" in missing:
            w = cap.params["weight"]
            d, p = x.shape[-1], g.shape[-1]
            fs = f[:, None, None]
            # Book-keeping: fold the factors into the smaller operand, then one (p, BT) @ (BT, d).
            if p <= d:
                total = (g * fs).reshape(-1, p).t() @ x.reshape(-1, d)
            else:
                total = g.reshape(-1, p).t() @ (x * fs).reshape(-1, d)
            out["weight"] = total.to(w.dtype)
        return out

    def per_sample(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out)
        x, g, seq = _views(cap, grad_out)
        out: dict[str, Tensor] = {}
        if "weight" in cap.params:
            out["weight"] = torch.bmm(g.transpose(1, 2), x).to(cap.params["weight"].dtype)
        if "bias" in cap.params:
            out["bias"] = _bias_per_sample(g, seq).to(cap.params["bias"].dtype)
        return out

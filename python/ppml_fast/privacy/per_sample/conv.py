"""Per-sample norms and clipped sums for ``F.conv1d/2d/3d`` (stride, padding int/tuple/'same'/'valid',
dilation, groups).

With the input unfolded (im2col) to ``U_i`` (per group: ``d = C_in/groups * prod(kernel)`` rows,
``L = prod(output spatial)`` columns) and ``grad_out`` viewed as ``g_i`` (``p = C_out/groups`` x L),
the convolution is a linear layer over L positions, and the choice is the linear one:

- ghost: ``||G_i||^2 = sum_{t,s} (g_t.g_s)(u_t.u_s)``, ``B L^2 (d + p)`` per group; the clipped sum
  is then one native weight-gradient call (``aten.convolution_backward``, output_mask
  ``[False, True, bias]``) with the factors folded into ``grad_out``: no per-sample copy.
- materialise: ``G_i = g_i U_i^T`` by one batched matmul, kept for ``factors @ G``.

Ghost iff ``L^2 (d + p) < KAPPA * d * p`` and the kept gradients would fit
``MATERIALIZE_MAX_ELEMENTS`` (see :data:`KAPPA` for the measurements). Bias per-sample gradients
(``grad_out`` summed over space) are always materialised.

kwargs: ``stride``, ``padding``, ``dilation``, ``groups`` as ``F.conv*d`` takes them (defaults 1, 0,
1, 1). ``padding_mode`` other than zeros is the module padding the input before the functional call:
capture the padded input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps

KAPPA = 4.0


def choose_path(batch: int, groups: int, positions: int, d: int, p: int) -> str:
    """"ghost" or "materialize" for a convolution with ``positions`` output positions."""
    if batch * groups * d * p > _ps.MATERIALIZE_MAX_ELEMENTS:
        return "ghost"
    return "ghost" if positions * positions * (d + p) < KAPPA * d * p else "materialize"


def _tuple(name: str, value: object, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)  # type: ignore[union-attr]
    if len(out) == 1:
        out = out * n
    if len(out) != n:
        raise ValueError(f"conv{n}d: {name} must be an int or {n} ints; got {value!r}")
    return out


class _Geometry:
    """Normalised arguments of one convolution call."""

    def __init__(self, n: int, weight_shape: tuple[int, ...], kwargs: dict) -> None:
        self.n = n
        self.kernel = tuple(weight_shape[2:])
        self.stride = _tuple("stride", kwargs.get("stride", 1), n)
        self.dilation = _tuple("dilation", kwargs.get("dilation", 1), n)
        self.groups = int(kwargs.get("groups", 1))
        padding = kwargs.get("padding", 0)
        if padding == "valid":
            pads = [(0, 0)] * n
        elif padding == "same":
            if any(s != 1 for s in self.stride):
                raise ValueError(f"conv{n}d: padding='same' needs stride 1; got {self.stride}")
            pads = []
            for k, dil in zip(self.kernel, self.dilation):
                total = dil * (k - 1)
                pads.append((total // 2, total - total // 2))
        elif isinstance(padding, str):
            raise ValueError(f"conv{n}d: padding must be 'same', 'valid', an int or ints; got {padding!r}")
        else:
            pads = [(q, q) for q in _tuple("padding", padding, n)]
        self.pads = pads
        self.symmetric = all(lo == hi for lo, hi in pads)

    def padded(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """The input and the symmetric padding to pass to a native op (asymmetric: padded here)."""
        if self.symmetric:
            return x, tuple(lo for lo, _ in self.pads)
        flat = [v for lo, hi in reversed(self.pads) for v in (lo, hi)]
        return F.pad(x, flat), (0,) * self.n


def _check(cap: _ps.Captured, n: int) -> None:
    x = cap.activation
    if x.dim() != n + 2:
        raise ValueError(
            f"conv{n}d: activation must be batched (B, C_in, {n} spatial dims); got shape "
            f"{tuple(x.shape)}"
        )


def unfold(x: Tensor, geo: _Geometry) -> Tensor:
    """im2col: (B, C_in, *S) -> (B, groups, C_in/groups * prod(kernel), L), rows ordered as the
    weight's (C_in/groups, *kernel)."""
    batch, cin = x.shape[:2]
    if geo.n == 2:
        xp, pad = geo.padded(x)
        cols = F.unfold(xp, geo.kernel, dilation=geo.dilation, padding=pad, stride=geo.stride)
    elif geo.n == 1:
        xp, pad = geo.padded(x)
        cols = F.unfold(
            xp.unsqueeze(2), (1, geo.kernel[0]), dilation=(1, geo.dilation[0]),
            padding=(0, pad[0]), stride=(1, geo.stride[0]),
        )
    else:
        flat = [v for lo, hi in reversed(geo.pads) for v in (lo, hi)]
        xp = F.pad(x, flat) if any(flat) else x
        for i, (k, dil, st) in enumerate(zip(geo.kernel, geo.dilation, geo.stride)):
            xp = xp.unfold(2 + i, dil * (k - 1) + 1, st)
        xp = xp[(...,) + tuple(slice(None, None, dil) for dil in geo.dilation)]
        n = geo.n
        order = (0, 1) + tuple(range(2 + n, 2 + 2 * n)) + tuple(range(2, 2 + n))
        positions = math.prod(xp.shape[2 : 2 + n])
        cols = xp.permute(order).reshape(batch, cin * math.prod(geo.kernel), positions)
    return cols.reshape(batch, geo.groups, cols.shape[1] // geo.groups, cols.shape[2])


class ConvRule:
    """``F.conv{n}d(input, weight (C_out, C_in/groups, *kernel), bias (C_out,), stride, padding,
    dilation, groups)``."""

    def __init__(self, n: int, mode: str = "auto") -> None:
        if n not in (1, 2, 3):
            raise ValueError(f"n must be 1, 2 or 3; got {n!r}")
        self.n = n
        self.mode = _ps.check_mode(mode)

    def _prepare(self, cap: _ps.Captured, grad_out: Tensor):
        shape = tuple(cap.params["weight"].shape)
        geo = _Geometry(self.n, shape, cap.kwargs)
        dt = _ps.acc_dtype(cap.activation, grad_out)
        return geo, shape, cap.activation.to(dt), grad_out.to(dt)

    def _per_sample_weight(self, x: Tensor, g: Tensor, geo: _Geometry, shape) -> Tensor:
        batch = x.shape[0]
        cols = unfold(x, geo)
        g3 = g.reshape(batch, geo.groups, shape[0] // geo.groups, cols.shape[-1])
        return torch.matmul(g3, cols.transpose(-1, -2)).reshape((batch,) + tuple(shape))

    @staticmethod
    def _bias_per_sample(grad_out: Tensor, dtype: torch.dtype) -> Tensor:
        g = grad_out.to(dtype)
        return g.flatten(2).sum(2)

    def norms_sq(
        self, cap: _ps.Captured, grad_out: Tensor, *, mode: str | None = None
    ) -> tuple[dict[str, Tensor], object]:
        mode = _ps.check_mode(self.mode if mode is None else mode)
        batch = _ps.check_batch(cap, grad_out)
        _check(cap, self.n)
        dt = _ps.acc_dtype(cap.activation, grad_out)
        norms: dict[str, Tensor] = {}
        state: dict[str, Tensor] = {}
        if "bias" in cap.params:
            state["bias"] = self._bias_per_sample(grad_out, dt)
            norms["bias"] = _ps.sq_norms(state["bias"], dt)
        if "weight" in cap.params:
            geo, shape, x, g = self._prepare(cap, grad_out)
            positions = math.prod(g.shape[2:])
            d = math.prod(shape[1:])
            p = shape[0] // geo.groups
            path = mode
            if mode == "auto":
                path = choose_path(batch, geo.groups, positions, d, p)
            if path == "ghost":
                cols = unfold(x, geo)
                g3 = g.reshape(batch, geo.groups, p, positions)
                uu = torch.matmul(cols.transpose(-1, -2), cols).flatten(1)
                gg = torch.matmul(g3.transpose(-1, -2), g3).flatten(1)
                norms["weight"] = torch.linalg.vecdot(uu, gg)
            else:
                state["weight"] = self._per_sample_weight(x, g, geo, shape)
                norms["weight"] = _ps.sq_norms(state["weight"], dt)
        return norms, state

    def clipped_sum(
        self, cap: _ps.Captured, grad_out: Tensor, factors: Tensor, state: object
    ) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out, factors)
        _check(cap, self.n)
        kept = state if isinstance(state, dict) else {}
        out = _ps.clipped_from({r: kept[r] for r in cap.params if r in kept}, factors, cap.params)
        want_bias = "bias" in cap.params and "bias" not in out
        if "weight" not in cap.params or "weight" in out:
            if want_bias:
                b = self._bias_per_sample(grad_out, _ps.acc_dtype(cap.activation, grad_out))
                out["bias"] = _ps.weighted_sum(b, factors, cap.params["bias"])
            return out
        geo, shape, x, g = self._prepare(cap, grad_out)
        w = cap.params["weight"]
        if x.shape[0] == 0:
            out["weight"] = torch.zeros_like(w)
            if want_bias:
                out["bias"] = torch.zeros_like(cap.params["bias"])
            return out
        # Book-keeping: the factors folded into grad_out, one native weight-gradient call.
        gf = g * factors.to(g.dtype).reshape((-1,) + (1,) * (g.dim() - 1))
        xp, pad = geo.padded(x)
        _, gw, gb = torch.ops.aten.convolution_backward(
            gf, xp, w.detach().to(x.dtype), [shape[0]] if want_bias else None,
            list(geo.stride), list(pad), list(geo.dilation), False, [0] * self.n, geo.groups,
            [False, True, want_bias],
        )
        out["weight"] = gw.to(w.dtype)
        if want_bias:
            out["bias"] = gb.to(cap.params["bias"].dtype)
        return out

    def per_sample(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out)
        _check(cap, self.n)
        out: dict[str, Tensor] = {}
        if "weight" in cap.params:
            geo, shape, x, g = self._prepare(cap, grad_out)
            out["weight"] = self._per_sample_weight(x, g, geo, shape).to(cap.params["weight"].dtype)
        if "bias" in cap.params:
            dt = _ps.acc_dtype(cap.activation, grad_out)
            out["bias"] = self._bias_per_sample(grad_out, dt).to(cap.params["bias"].dtype)
        return out

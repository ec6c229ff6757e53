"""Per-sample norms and clipped sums for the affine parameters of ``F.layer_norm``,
``F.group_norm``, ``F.instance_norm`` and ``F.rms_norm``.

Their per-sample gradients are as small as the parameters (C or prod(normalized_shape) numbers per
sample) and cost one pass over the activation: ``weight_i = sum (g_i * x_hat_i)`` and
``bias_i = sum g_i`` over the positions the parameter is broadcast over, with ``x_hat`` recomputed
by the functional op itself (no affine). So these rules always materialise (whatever the mode),
keep the per-sample gradients as the state, and the clipped sum is one ``factors @ G``.
Measured (2-core dev box, one thread, thread CPU time): LayerNorm(128) at B=32 T=64, norms_sq +
clipped_sum 0.52-0.61 ms against 0.44-0.48 ms for the plain weight and bias gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps


def _sum_leading(t: Tensor, keep: int) -> Tensor:
    """Sum ``t`` (B, ..., *last ``keep`` dims) over the dims between the batch and the last
    ``keep``."""
    dims = tuple(range(1, t.dim() - keep))
    return t.sum(dims) if dims else t


def _sum_spatial(t: Tensor) -> Tensor:
    """Sum ``t`` (B, C, *spatial) over the spatial dims."""
    dims = tuple(range(2, t.dim()))
    return t.sum(dims) if dims else t


class _AffineNormRule:
    """Per-sample gradients from ``x_hat`` and ``grad_out``, then norms or a weighted sum."""

    op = ""

    def __init__(self, mode: str = "auto") -> None:
        self.mode = _ps.check_mode(mode)

    def _normalised(self, cap: _ps.Captured, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _reduce(self, cap: _ps.Captured, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _compute(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out)
        x = cap.activation
        if tuple(grad_out.shape) != tuple(x.shape):
            raise ValueError(
                f"{self.op}: grad_out must have the activation's shape {tuple(x.shape)}; "
                f"got {tuple(grad_out.shape)}"
            )
        dt = _ps.acc_dtype(x, grad_out)
        x, g = x.to(dt), grad_out.to(dt)
        out: dict[str, Tensor] = {}
        if "weight" in cap.params:
            out["weight"] = self._reduce(cap, g * self._normalised(cap, x))
        if "bias" in cap.params:
            out["bias"] = self._reduce(cap, g)
        for role, t in out.items():
            shape = (t.shape[0],) + tuple(cap.params[role].shape)
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{self.op}: per-sample {role} gradient came out as {tuple(t.shape)}, expected "
                    f"{shape}; check the captured kwargs against the parameter"
                )
        return out

    def norms_sq(
        self, cap: _ps.Captured, grad_out: Tensor, *, mode: str | None = None
    ) -> tuple[dict[str, Tensor], object]:
        _ps.check_mode(self.mode if mode is None else mode)
        grads = self._compute(cap, grad_out)
        return _ps.norms_from(grads, _ps.acc_dtype(cap.activation, grad_out)), grads

    def clipped_sum(
        self, cap: _ps.Captured, grad_out: Tensor, factors: Tensor, state: object
    ) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out, factors)
        grads = state if isinstance(state, dict) and set(state) >= set(cap.params) else None
        if grads is None:
            grads = self._compute(cap, grad_out)
        return _ps.clipped_from({r: grads[r] for r in cap.params}, factors, cap.params)

    def per_sample(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        grads = self._compute(cap, grad_out)
        return {r: t.to(cap.params[r].dtype) for r, t in grads.items()}


def _normalized_shape(cap: _ps.Captured) -> tuple[int, ...]:
    ns = cap.kwargs.get("normalized_shape")
    if ns is None:
        if "weight" in cap.params:
            return tuple(cap.params["weight"].shape)
        return tuple(cap.params["bias"].shape)
    return (ns,) if isinstance(ns, int) else tuple(ns)


class LayerNormRule(_AffineNormRule):
    """``F.layer_norm(input, normalized_shape, weight, bias, eps)``; kwargs ``normalized_shape``
    (default: the parameter's shape), ``eps`` (default 1e-5)."""

    op = "layer_norm"

    def _normalised(self, cap: _ps.Captured, x: Tensor) -> Tensor:
        return F.layer_norm(x, _normalized_shape(cap), None, None, cap.kwargs.get("eps", 1e-5))

    def _reduce(self, cap: _ps.Captured, t: Tensor) -> Tensor:
        return _sum_leading(t, len(_normalized_shape(cap)))


class RMSNormRule(_AffineNormRule):
    """``F.rms_norm(input, normalized_shape, weight, eps)``; kwargs ``normalized_shape`` (default:
    the weight's shape), ``eps`` (default None: ``torch.finfo(input.dtype).eps``, as F.rms_norm;
    pass the forward's eps when the activation is not float64 or float32)."""

    op = "rms_norm"

    def _normalised(self, cap: _ps.Captured, x: Tensor) -> Tensor:
        eps = cap.kwargs.get("eps")
        if eps is None:
            eps = torch.finfo(cap.activation.dtype).eps
        return F.rms_norm(x, list(_normalized_shape(cap)), None, eps)

    def _reduce(self, cap: _ps.Captured, t: Tensor) -> Tensor:
        return _sum_leading(t, len(_normalized_shape(cap)))


class GroupNormRule(_AffineNormRule):
    """``F.group_norm(input (B, C, *), num_groups, weight (C,), bias (C,), eps)``; kwargs
    ``num_groups`` (required), ``eps`` (default 1e-5)."""

    op = "group_norm"

    def _normalised(self, cap: _ps.Captured, x: Tensor) -> Tensor:
        if "num_groups" not in cap.kwargs:
            raise ValueError("group_norm: kwargs must hold num_groups")
        eps = cap.kwargs.get("eps", 1e-5)
        return F.group_norm(x, int(cap.kwargs["num_groups"]), None, None, eps)

    def _reduce(self, cap: _ps.Captured, t: Tensor) -> Tensor:
        return _sum_spatial(t)


class InstanceNormRule(_AffineNormRule):
    """``F.instance_norm(input (B, C, *), running_mean, running_var, weight (C,), bias (C,),
    use_input_stats, momentum, eps)``; kwargs ``use_input_stats`` (default True: statistics per
    (sample, channel)), ``running_mean`` / ``running_var`` (used only when ``use_input_stats`` is
    False, never updated here), ``eps`` (default 1e-5)."""

    op = "instance_norm"

    def _normalised(self, cap: _ps.Captured, x: Tensor) -> Tensor:
        eps = cap.kwargs.get("eps", 1e-5)
        if cap.kwargs.get("use_input_stats", True):
            return F.instance_norm(x, None, None, None, None, True, 0.0, eps)
        mean, var = cap.kwargs.get("running_mean"), cap.kwargs.get("running_var")
        if mean is None or var is None:
            raise ValueError(
                "instance_norm: use_input_stats=False needs running_mean and running_var"
            )
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = mean.to(x.dtype).reshape(shape), var.to(x.dtype).reshape(shape)
        return (x - mean) * torch.rsqrt(var + eps)

    def _reduce(self, cap: _ps.Captured, t: Tensor) -> Tensor:
        return _sum_spatial(t)

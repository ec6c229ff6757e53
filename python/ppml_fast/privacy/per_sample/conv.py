"""Per-sample norms and clipped sums for ``F.conv1d/2d/3d`` (stride, dilation, groups, padding
int/tuple/'same'/'valid').

With the input unfolded (im2col) to ``U_i`` (per group ``d = C_in/groups * prod(kernel)`` rows and
``L = prod(output spatial)`` columns) and ``grad_out`` viewed as ``g_i`` (``p = C_out/groups`` x L),
a convolution is a linear layer over L positions:

- ghost: ``||G_i||^2 = sum_{t,s} (g_t.g_s)(u_t.u_s)`` per group, ``B L^2 (d + p)``; the clipped sum
  is then one native weight-gradient call (``aten.convolution_backward``, output_mask
  ``[False, True, bias]``) with the factors folded into ``grad_out``: no per-sample copy.
  The Gram norm is returned as an upper bound, with records it cannot vouch for materialised
  on their own (:meth:`ConvRule._ghost`, :mod:`bounds`).
- materialise: per-sample weight gradients kept for ``factors @ G``, built by one native grouped
  ``convolution_backward`` with the batch folded into the channels (groups = B * groups), or by
  unfold + batched matmul where that is faster (few positions or many channels:
  :func:`grouped_is_faster`).

Cost model, fitted on the 2-core dev box (torch 2.13 CPU, one thread, thread CPU time so that
other processes do not count, min of 5-10 calls): **ghost iff L (d + p) < (KAPPA + d p /
KAPPA_MEMORY_SCALE) d p** (``KAPPA = 0.1``, ``KAPPA_MEMORY_SCALE = 1e6``: the kept gradients fall
out of cache as d p grows), and always ghost while the kept gradients would exceed
``MATERIALIZE_MAX_ELEMENTS``. Sweep C -> C, 3x3, padding 1, B = 32, s x s inputs (s = 2..16):
materialise was faster at every s for C = 16 and 32; the crossover in L (d + p) / (d p) was
~0.1-0.3 for C = 64 and 128 and ~0.6 for C = 256; the model picked the faster path on 32 of 35
shapes and lost at most 12% on the other 3. Opacus's MNIST CNN at B = 256 (norms_sq +
clipped_sum, ms, two runs; the native weight gradient of the same call in brackets):

    conv1 Conv2d(1, 16, 8, 2, padding=3), 28x28, L=196 d=64 p=16:  materialise 5.4-6.0,
          ghost 110-118 (native 10.7-11.2)
    conv2 Conv2d(16, 32, 4, 2), 13x13, L=25 d=256 p=32:            materialise 5.4-6.1,
          ghost 8.1-8.2 (native 2.5-2.6)

Per-sample gradients there: grouped 5.2 / 5.4 ms vs unfold + matmul 5.7 / 5.2 ms (over a C -> C
3x3 sweep the grouped call lost badly for C >= 128 at few positions, e.g. 28 vs 4 ms: hence
:func:`grouped_is_faster`); the book-keeping clipped sum (one convolution_backward, factors
folded into grad_out) 11.6 / 2.8 ms vs ``factors @ G`` from kept gradients < 0.3 ms. So on this
model both convolutions materialise, and the per-sample work (~11.5 ms) is below the native weight
gradients autograd would compute (~13.5 ms): an engine that asks autograd only for the layer
outputs' gradients (skipping the native weight gradients) pays nothing extra for the convolutions.

Non-overlapping patches (``stride == kernel``, no padding or dilation, one group: ViT's patch
embedding, 1x1 convolutions with stride 1) are a linear layer over the patches, and unfolding them
is one reshape and permute: such calls go to the linear rule (its paths, bounds and cost model,
fitted for matmuls) on the ``(B, L, C_in * prod(kernel))`` patches and the ``(C_out, C_in *
prod(kernel))`` weight view. At ViT-B/16's patch embedding (B = 32, 3x224x224, 16x16, 768
channels; norms + clipped sum, one thread, thread CPU time) the convolution cost model picked
ghost at 291 ms, the linear rule materialises at 142 ms (forced paths: ghost 251 vs 241,
materialise 140 vs 132); ViT-tiny's (B = 16, 3x32x32, 4x4, 64) 0.60 vs 0.38 ms.

Calls with one group (ResNets, most CNNs) go to :mod:`conv_fast` instead (switch
``conv_fast.FAST``): the same ghost / materialise maths on channels-last columns with the kernel
cropped to the taps that read the input (:mod:`conv_taps`), its own cost model, and book-keeping
by one matmul, one matmul per tap, or the native call below (:mod:`conv_book`). ResNet-18-GN at
the bench size (B = 32, one thread, thread CPU time): norms + clipped sums of its 20
convolutions 78.8 -> 43.9 ms (their native weight gradients: 45.4 ms).
The paths here serve ``groups > 1`` (and the tests' reference).

kwargs: ``stride``, ``padding``, ``dilation``, ``groups`` as ``F.conv*d`` takes them (defaults 1, 0,
1, 1). A module's non-zero ``padding_mode`` pads the input before the functional call: capture that
padded input (and padding 0). Transposed convolutions are not covered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ppml_fast.privacy import per_sample as _ps
from ppml_fast.privacy.per_sample import bounds, conv_fast

# State key of the records whose ghost norm the error bound could not vouch for:
# (record indices (k,), their materialised weight gradients (k, *weight shape) in float64).
FLAGGED = "weight:flagged"

KAPPA = 0.1
KAPPA_MEMORY_SCALE = 1e6

# How "materialize" builds per-sample weight gradients: "grouped" (one native grouped
# convolution_backward, batch folded into the channels), "unfold" (im2col + batched matmul) or
# "auto" (grouped iff GROUPED_MIN_RATIO * L >= d * p, see grouped_is_faster).
PER_SAMPLE_IMPL = "auto"
GROUPED_MIN_RATIO = 2048


def grouped_is_faster(positions: int, d: int, p: int) -> bool:
    """Whether the grouped convolution_backward beats unfold + matmul (measured: it does while
    the per-sample gradient is small against the positions it sums over)."""
    return GROUPED_MIN_RATIO * positions >= d * p


def choose_path(batch: int, groups: int, positions: int, d: int, p: int) -> str:
    """"ghost" or "materialize" for a convolution with ``positions`` output positions, ``d``
    rows and ``p`` output channels per group."""
    if batch * groups * d * p > _ps.MATERIALIZE_MAX_ELEMENTS:
        return "ghost"
    kappa = KAPPA + d * p / KAPPA_MEMORY_SCALE
    return "ghost" if positions * (d + p) < kappa * d * p else "materialize"


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
            raise ValueError(
                f"conv{n}d: padding must be 'same', 'valid', an int or ints; got {padding!r}"
            )
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
    weight's (C_in/groups, *kernel). Strided windows (``Tensor.unfold``) and one copy: 1.5-4x
    faster than ``F.unfold`` at the MNIST-CNN and 3x3 shapes measured (e.g. B=256 16x13x13 k4 s2:
    2.9 vs 4.6 ms; B=64 32x16x16 k3 p1: 2.0 vs 8.5 ms, one thread)."""
    batch, cin = x.shape[:2]
    n = geo.n
    flat = [v for lo, hi in reversed(geo.pads) for v in (lo, hi)]
    xp = F.pad(x, flat) if any(flat) else x
    for i, (k, dil, st) in enumerate(zip(geo.kernel, geo.dilation, geo.stride)):
        xp = xp.unfold(2 + i, dil * (k - 1) + 1, st)
    if any(dil != 1 for dil in geo.dilation):
        xp = xp[(...,) + tuple(slice(None, None, dil) for dil in geo.dilation)]
    order = (0, 1) + tuple(range(2 + n, 2 + 2 * n)) + tuple(range(2, 2 + n))
    positions = math.prod(xp.shape[2 : 2 + n])
    cols = xp.permute(order).reshape(batch, cin * math.prod(geo.kernel), positions)
    return cols.reshape(batch, geo.groups, cols.shape[1] // geo.groups, positions)


def per_sample_grouped(x: Tensor, g: Tensor, geo: _Geometry, shape) -> Tensor:
    """Per-sample weight gradients by one native grouped weight-gradient call: the batch folded
    into the channels (input (1, B C_in, *S), grad_out (1, B C_out, *O), groups B * groups), whose
    weight gradient (B C_out, C_in/groups, *kernel) is the stack of the per-sample ones."""
    batch, cin = x.shape[:2]
    cout = shape[0]
    if batch == 0:
        return x.new_zeros((0,) + tuple(shape))
    xp, pad = geo.padded(x)
    # Only the weight's shape matters for the weight gradient: a stride-0 view, no copy.
    weight = x.new_empty(1).expand((batch * cout,) + tuple(shape[1:]))
    _, gw, _ = torch.ops.aten.convolution_backward(
        g.reshape((1, batch * cout) + tuple(g.shape[2:])),
        xp.reshape((1, batch * cin) + tuple(xp.shape[2:])),
        weight, None, list(geo.stride), list(pad), list(geo.dilation), False, [0] * geo.n,
        batch * geo.groups, [False, True, False],
    )
    return gw.reshape((batch,) + tuple(shape))


def is_patches(geo: _Geometry) -> bool:
    """Whether the convolution is a linear layer over non-overlapping patches (stride = kernel,
    no padding, no dilation, one group)."""
    return (geo.groups == 1 and geo.stride == geo.kernel and all(d == 1 for d in geo.dilation)
            and all(lo == 0 and hi == 0 for lo, hi in geo.pads))


def patches(x: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """(B, C_in, *S) -> (B, L, C_in * prod(kernel)) non-overlapping patches, columns ordered as the
    weight's (C_in, *kernel), patches as the output's positions; the trailing pixels that no
    window covers are dropped, as the convolution drops them. One copy (reshape after permute)."""
    batch, cin = x.shape[:2]
    n = len(kernel)
    outs = [size // k for size, k in zip(x.shape[2:], kernel)]
    if any(o * k != size for o, k, size in zip(outs, kernel, x.shape[2:])):
        x = x[(slice(None), slice(None)) + tuple(slice(0, o * k) for o, k in zip(outs, kernel))]
    x = x.reshape([batch, cin] + [v for o, k in zip(outs, kernel) for v in (o, k)])
    order = [0] + [2 + 2 * i for i in range(n)] + [1] + [3 + 2 * i for i in range(n)]
    return x.permute(order).reshape(batch, math.prod(outs), cin * math.prod(kernel))


class ConvRule:
    """``F.conv{n}d(input, weight (C_out, C_in/groups, *kernel), bias (C_out,), stride, padding,
    dilation, groups)``."""

    def __init__(self, n: int, mode: str = "auto") -> None:
        if n not in (1, 2, 3):
            raise ValueError(f"n must be 1, 2 or 3; got {n!r}")
        self.n = n
        self.mode = _ps.check_mode(mode)
        from ppml_fast.privacy.per_sample.linear import LinearRule

        self._linear = LinearRule(self.mode)

    def _as_linear(self, cap: _ps.Captured, grad_out: Tensor):
        """(linear Captured, grad (B, L, C_out)) of a non-overlapping-patches call, else None."""
        w = cap.params.get("weight")
        shape = tuple(w.shape) if w is not None else None
        if shape is None:
            return None
        geo = _Geometry(self.n, shape, cap.kwargs)
        if not is_patches(geo) or tuple(grad_out.shape[2:]) != tuple(
                s // k for s, k in zip(cap.activation.shape[2:], geo.kernel)):
            return None
        params = {"weight": w.reshape(shape[0], -1)}
        if "bias" in cap.params:
            params["bias"] = cap.params["bias"]
        lin = _ps.Captured("linear", patches(cap.activation, geo.kernel), params, {})
        return lin, grad_out.flatten(2).transpose(1, 2)

    def _from_linear(self, cap: _ps.Captured, out: dict[str, Tensor], batched: bool) -> dict:
        """The linear rule's results with the weight's entries in the convolution's shape."""
        if "weight" in out:
            shape = tuple(cap.params["weight"].shape)
            out = dict(out)
            out["weight"] = out["weight"].reshape(((out["weight"].shape[0],) if batched else ()) + shape)
        return out

    def _prepare(self, cap: _ps.Captured, grad_out: Tensor):
        shape = tuple(cap.params["weight"].shape)
        geo = _Geometry(self.n, shape, cap.kwargs)
        dt = _ps.acc_dtype(cap.activation, grad_out)
        return geo, shape, cap.activation.to(dt), grad_out.to(dt)

    def _per_sample_weight(
        self, x: Tensor, g: Tensor, geo: _Geometry, shape, impl: str | None = None
    ) -> Tensor:
        impl = PER_SAMPLE_IMPL if impl is None else impl
        if impl == "auto":
            d, p = math.prod(shape[1:]), shape[0] // geo.groups
            impl = "grouped" if grouped_is_faster(math.prod(g.shape[2:]), d, p) else "unfold"
        if impl == "grouped":
            return per_sample_grouped(x, g, geo, shape)
        batch = x.shape[0]
        cols = unfold(x, geo)
        g3 = g.reshape(batch, geo.groups, shape[0] // geo.groups, cols.shape[-1])
        return torch.matmul(g3, cols.transpose(-1, -2)).reshape((batch,) + tuple(shape))

    @staticmethod
    def _bias_per_sample(grad_out: Tensor, dtype: torch.dtype) -> Tensor:
        g = grad_out.to(dtype)
        return g.flatten(2).sum(2)

    def _ghost(self, x: Tensor, g: Tensor, geo: _Geometry, shape):
        """Upper bounds of the squared weight-gradient norms and the flagged records, as
        :func:`~ppml_fast.privacy.per_sample.linear.ghost_weight_norms` with the unfolded columns
        ``u_t`` (d = C_in/groups * prod(kernel)) as the inputs over L positions, per group:
        ``sum_groups sum_{s,t} (u_s.u_t)(g_s.g_t)``, error at most ``coef * sum_groups S_group^2``
        (each row's L products in the working precision, the ``groups * L`` row sums in float64;
        :mod:`bounds`)."""
        batch, positions = x.shape[0], math.prod(g.shape[2:])
        d, p = math.prod(shape[1:]), shape[0] // geo.groups
        out_dtype = x.dtype
        if bounds.gram_dtype(x.dtype, positions, (d, p)) != x.dtype:  # many positions: float64
            x, g = x.double(), g.double()
        u = bounds.unit_roundoff(x.dtype)
        cols = unfold(x, geo)
        g3 = g.reshape(batch, geo.groups, p, positions)
        with bounds.full_precision():
            uu = torch.matmul(cols.transpose(-1, -2), cols)
            gg = torch.matmul(g3.transpose(-1, -2), g3)
        # each row's L products by one vecdot, the groups * L row sums in float64 (bounds)
        computed = torch.linalg.vecdot(uu, gg, dim=-1).double().flatten(1).sum(1)
        s_groups = (bounds.diag_norms(uu) * bounds.diag_norms(gg)).sum(-1)  # (B, groups)
        s2 = s_groups.square().sum(-1)
        scale = (bounds.gram_coef(d, p, positions, geo.groups * positions, u)
                 * bounds.norm_slack((d, p), u, positions) ** 2)
        slack = bounds.norm_slack((d, p), u, positions)
        norms, flags = bounds.upper_and_flags(
            computed, s2 * scale, out_dtype, s=s_groups.sum(-1) * slack,
            u_book=bounds.book_roundoff(out_dtype))
        if not bool(flags.any()):
            return norms, None
        rows = flags.nonzero().flatten()
        # float64 also for float32 inputs: see linear.ghost_weight_norms
        grads = self._per_sample_weight(x[rows].double(), g[rows].double(), geo, shape)
        norms[rows] = bounds.exact_sq_norms(grads, out_dtype)
        return norms, (rows, grads)

    def norms_sq(
        self, cap: _ps.Captured, grad_out: Tensor, *, mode: str | None = None
    ) -> tuple[dict[str, Tensor], object]:
        mode = _ps.check_mode(self.mode if mode is None else mode)
        batch = _ps.check_batch(cap, grad_out)
        _check(cap, self.n)
        lin = self._as_linear(cap, grad_out)
        if lin is not None:  # non-overlapping patches: the linear rule on the patches
            return self._linear.norms_sq(lin[0], lin[1], mode=mode)
        dt = _ps.acc_dtype(cap.activation, grad_out)
        norms: dict[str, Tensor] = {}
        state: dict[str, Tensor] = {}
        if "bias" in cap.params:
            state["bias"] = self._bias_per_sample(grad_out, dt)
            norms["bias"] = _ps.sq_norms(state["bias"], dt)
        if "weight" in cap.params:
            geo, shape, x, g = self._prepare(cap, grad_out)
            plan = conv_fast.plan_for(geo, x, g)
            if plan is not None:  # groups == 1: channels-last, tap-cropped columns (conv_fast)
                norms["weight"], extra = conv_fast.weight_norms(x, g, plan, shape, mode)
                state.update(extra)
                return norms, state
            positions = math.prod(g.shape[2:])
            d = math.prod(shape[1:])
            p = shape[0] // geo.groups
            path = mode
            if mode == "auto":
                path = choose_path(batch, geo.groups, positions, d, p)
            if path == "ghost":
                norms["weight"], flagged = self._ghost(x, g, geo, shape)
                if flagged is not None:
                    state[FLAGGED] = flagged
            else:
                state["weight"] = self._per_sample_weight(x, g, geo, shape)
                norms["weight"] = _ps.sq_norms(state["weight"], dt)
        return norms, state

    def clipped_sum(
        self, cap: _ps.Captured, grad_out: Tensor, factors: Tensor, state: object
    ) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out, factors)
        _check(cap, self.n)
        lin = self._as_linear(cap, grad_out)
        if lin is not None:  # the state came from the linear rule (norms_sq above)
            return self._from_linear(cap, self._linear.clipped_sum(lin[0], lin[1], factors, state), False)
        kept = state if isinstance(state, dict) else {}
        fast = conv_fast.PLAN in kept  # the weight's state is conv_fast's (its own sum)
        out = _ps.clipped_from({r: kept[r] for r in cap.params if r in kept
                                and not (fast and r == "weight")}, factors, cap.params)
        want_bias = "bias" in cap.params and "bias" not in out
        if "weight" not in cap.params or "weight" in out:
            if want_bias:
                b = self._bias_per_sample(grad_out, _ps.acc_dtype(cap.activation, grad_out))
                out["bias"] = _ps.weighted_sum(b, factors, cap.params["bias"])
            return out
        geo, shape, x, g = self._prepare(cap, grad_out)
        w = cap.params["weight"]
        if x.shape[0] == 0:
            out["weight"] = torch.zeros_like(w, dtype=_ps.sum_dtype(w))
            if want_bias:
                out["bias"] = torch.zeros_like(cap.params["bias"], dtype=_ps.sum_dtype(cap.params["bias"]))
            return out
        plan = kept[conv_fast.PLAN] if fast else (
            conv_fast.plan_for(geo, x, g) if state is None else None)
        if plan is not None and conv_fast.own_sum(plan, kept):
            out["weight"] = conv_fast.weight_sum(x, g, plan, w, factors, kept)
            if want_bias:
                b = self._bias_per_sample(grad_out, x.dtype)
                out["bias"] = _ps.weighted_sum(b, factors, cap.params["bias"])
            return out
        flagged = kept.get(FLAGGED)
        f = factors.to(g.dtype)
        if flagged is not None:
            # Flagged records: factor exactly 0 in the book-keeping call, their clipped
            # materialised gradients added on their own (bounds module docstring); the bias then
            # from the per-sample bias gradients with the full factors.
            rows, grads = flagged
            extra = _ps.weighted_sum(grads, f[rows], w)
            if want_bias:
                b = self._bias_per_sample(grad_out, x.dtype)
                out["bias"] = _ps.weighted_sum(b, factors, cap.params["bias"])
                want_bias = False
            f = bounds.split_factors(f, rows)
        # Book-keeping: the factors folded into grad_out, one native weight-gradient call.
        gf = g * f.reshape((-1,) + (1,) * (g.dim() - 1))
        xp, pad = geo.padded(x)
        with bounds.full_precision(conv=True):  # IEEE, no TF32: bounds.book_roundoff
            _, gw, gb = torch.ops.aten.convolution_backward(
                gf, xp, w.detach().to(x.dtype), [shape[0]] if want_bias else None,
                list(geo.stride), list(pad), list(geo.dilation), False, [0] * self.n, geo.groups,
                [False, True, want_bias],
            )
        out["weight"] = gw.to(_ps.sum_dtype(w))
        if flagged is not None:
            out["weight"] = out["weight"] + extra
        if want_bias:
            out["bias"] = gb.to(_ps.sum_dtype(cap.params["bias"]))
        return out

    def per_sample(self, cap: _ps.Captured, grad_out: Tensor) -> dict[str, Tensor]:
        _ps.check_batch(cap, grad_out)
        _check(cap, self.n)
        lin = self._as_linear(cap, grad_out)
        if lin is not None:
            return self._from_linear(cap, self._linear.per_sample(lin[0], lin[1]), True)
        out: dict[str, Tensor] = {}
        if "weight" in cap.params:
            geo, shape, x, g = self._prepare(cap, grad_out)
            plan = conv_fast.plan_for(geo, x, g)
            ps = (conv_fast.per_sample_weight(x, g, plan, shape) if plan is not None
                  else self._per_sample_weight(x, g, geo, shape))
            out["weight"] = ps.to(cap.params["weight"].dtype)
        if "bias" in cap.params:
            dt = _ps.acc_dtype(cap.activation, grad_out)
            out["bias"] = self._bias_per_sample(grad_out, dt).to(cap.params["bias"].dtype)
        return out

"""Channels-last im2col with the kernel cropped to its active taps, for :mod:`conv_fast`.

Two observations about the convolutions of small images (issue 16, ResNet-18-GN at 32x32):

- **Inactive taps.** A kernel tap that, for every output position, reads only the zero padding
  contributes exactly 0 to every per-sample weight gradient (each of its entries is a sum of
  ``g * 0``). ResNet-18's last stage runs its 3x3 convolutions (padding 1) on 1x1 feature maps:
  only the centre tap ever reads the input, so the per-sample gradient is ``g_i x_i^T`` in the
  centre and 0 in the 8 other taps, and the native weight gradient spends 8/9 of its work on
  zeros (4/9 are active for the stride-2 3x3 on a 2x2 map). The active taps of one dimension are
  those ``k`` with ``0 <= o * stride + k * dilation - pad_lo < S`` for some output position
  ``o``; :func:`plan` crops the kernel to the bounding box of the active taps in every dimension
  (taps inside the box may still be zero; outside it they are zero by construction), and the
  unfolded columns, Gram matrices and per-sample gradients are built for the cropped kernel
  only. The cropped taps' gradient entries are exact zeros in every path (norms, sums, per-sample
  gradients), so norms and sums are those of the full gradient.
- **Channels last.** ``conv.unfold`` (rows ordered as the weight, ``(C_in, *kernel)``) gathers
  with a stride of ``H W`` between neighbouring rows; unfolding the channels-last input into
  rows ordered ``(*kernel, C_in)`` copies contiguous runs of ``C_in`` numbers instead. Measured
  (one thread, thread CPU time, B = 32): 64x8x8 3x3 0.88 -> 0.33 ms, 128x4x4 1.12 -> 0.12 ms,
  256x2x2 1.61 -> 0.09 ms, the 3x32x32 7x7/2 stem 0.89 -> 0.56 ms. Gram matrices do not depend on
  the order of the rows; per-sample gradients and sums in this order are mapped back to the
  weight's layout by :func:`to_weight` (a permuted view, or a copy into zeros when cropped).

Only ``groups == 1`` (the rows of one group would not be contiguous in this order).
"""

from __future__ import annotations

import functools
import math

import torch.nn.functional as F
from torch import Tensor


class Plan:
    """The cropped geometry of one convolution call (per spatial dimension ``i``):

    - ``k0[i]``, ``kernel[i]``: the first active tap and the cropped kernel size (0: no tap of
      that dimension ever reads the input; the weight gradient is then exactly 0);
    - ``start[i]``, ``end[i]``: the input index read by output 0 and tap ``k0`` and the one read by
      the last output and last cropped tap (may lie in the padding: negative or ``>= S``);
    - ``cropped``: whether any tap was cropped.
    """

    def __init__(self, n, in_size, full_kernel, k0, kernel, start, end, stride, dilation, out):
        self.n = n
        self.in_size = in_size
        self.full_kernel = full_kernel
        self.k0 = k0
        self.kernel = kernel
        self.start = start
        self.end = end
        self.stride = stride
        self.dilation = dilation
        self.out = out
        self.cropped = tuple(kernel) != tuple(full_kernel)
        self.taps = math.prod(kernel)
        self.positions = math.prod(out)


@functools.lru_cache(maxsize=4096)
def plan(in_size: tuple, out_size: tuple, kernel: tuple, stride: tuple, dilation: tuple,
         pads: tuple) -> Plan:
    """The :class:`Plan` of a call with input spatial size ``in_size``, output ``out_size``,
    ``kernel``, ``stride``, ``dilation`` and ``pads`` ((lo, hi) per dimension)."""
    k0s, ks, starts, ends = [], [], [], []
    for size, o_n, k_n, st, dil, (lo, _) in zip(in_size, out_size, kernel, stride, dilation, pads):
        active = [k for k in range(k_n)
                  if any(0 <= o * st + k * dil - lo < size for o in range(o_n))]
        if not active or o_n == 0:
            k0s.append(0)
            ks.append(0)
            starts.append(0)
            ends.append(0)
            continue
        k_lo, k_hi = active[0], active[-1]
        k0s.append(k_lo)
        ks.append(k_hi - k_lo + 1)
        starts.append(k_lo * dil - lo)
        ends.append(k_lo * dil - lo + (o_n - 1) * st + (k_hi - k_lo) * dil)
    return Plan(len(in_size), tuple(in_size), tuple(kernel), tuple(k0s), tuple(ks), tuple(starts),
                tuple(ends), tuple(stride), tuple(dilation), tuple(out_size))


def unfold(x: Tensor, p: Plan) -> Tensor:
    """im2col of ``x`` (B, C_in, *S) for the cropped kernel: (B, L, prod(kernel) * C_in), rows
    ordered ``(*kernel, C_in)`` (channels last), positions as the output's. One copy into
    channels-last (with the padding, or the slices the cropped kernel skips) and one gather."""
    batch, cin = x.shape[:2]
    n = p.n
    if p.taps == 0:
        return x.new_zeros((batch, p.positions, 0))
    xc = x.movedim(1, -1)  # (B, *S, C): a view
    index = [slice(None)]
    pad = []
    for i in range(n):
        size = x.shape[2 + i]
        lo, hi = p.start[i], p.end[i]
        index.append(slice(max(lo, 0), min(hi, size - 1) + 1))
        pad.append((max(-lo, 0), max(hi - (size - 1), 0)))
    xc = xc[tuple(index)]
    flat = [0, 0] + [v for lo_hi in reversed(pad) for v in lo_hi]
    xc = F.pad(xc, flat) if any(flat) else xc.contiguous()
    for i in range(n):
        span = p.dilation[i] * (p.kernel[i] - 1) + 1
        xc = xc.unfold(1 + i, span, p.stride[i])  # (B, *O, C, *spans)
    if any(d != 1 for d in p.dilation):
        xc = xc[(...,) + tuple(slice(None, None, d) for d in p.dilation)]
    order = (0,) + tuple(range(1, 1 + n)) + tuple(range(2 + n, 2 + 2 * n)) + (1 + n,)
    return xc.permute(order).reshape(batch, p.positions, p.taps * cin)


def to_weight(t: Tensor, p: Plan, cin: int, view: bool = False) -> Tensor:
    """(..., C_out, prod(kernel) * C_in) in :func:`unfold`'s row order -> (..., C_out, C_in,
    *full kernel), the weight's layout, with exact zeros in the cropped taps: a contiguous copy,
    or with ``view`` a permuted view where no tap was cropped.

    The transposition ``(taps, C_in) -> (C_in, taps)`` is one copy with contiguous reads; the
    cropped taps are padded in the channels-last order first (runs of C_in: measured 0.87 ms at
    (512, 2x2 of 3x3, 256) against 2.2-2.7 ms padding or scattering after the transposition, whose
    runs are 2 numbers long), except for a single tap (a strided write of one number per
    (C_out, C_in): 0.5 ms at (512, 1 of 3x3, 512) against 1.9 ms)."""
    lead = tuple(t.shape[:-1])
    tm = t.reshape(lead + tuple(p.kernel) + (cin,))
    if not p.cropped:
        v = tm.movedim(-1, len(lead))
        return v if view else v.contiguous()
    if p.taps <= 1:
        out = t.new_zeros(lead + (cin,) + tuple(p.full_kernel))
        if p.taps == 1:
            out[(Ellipsis,) + tuple(p.k0)] = tm.reshape(lead + (cin,))
        return out
    flat = [0, 0]
    for k0, k, full in reversed(list(zip(p.k0, p.kernel, p.full_kernel))):
        flat += [k0, full - k0 - k]
    full = F.pad(tm, flat)  # (..., *full kernel, C_in)
    return full.movedim(-1, len(lead)).contiguous()

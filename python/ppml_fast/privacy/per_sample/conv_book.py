"""Book-keeping weight gradient of a convolution, one matmul per kernel tap over only the output
positions whose input for that tap is not padding (:mod:`conv_fast`, issue 16).

The clipped sum of a ghost-path convolution is ``sum_i f_i G_i`` (Bu et al. 2023, arXiv
2210.00038, Sec. 3.2: the factors folded into the output gradient). Per tap ``k`` of the (cropped,
:mod:`conv_taps`) kernel, its ``(C_out, C_in)`` slice is

    W[:, k, :] = sum_i sum_{o in O_k} f_i g_i[:, o] x_i[:, o * stride + k * dilation - pad]^T

where ``O_k`` is the box of output positions that tap reads inside the input: the other
positions multiply the zero padding, their terms are exact zeros and are left out. Each tap is one
``(C_out, B |O_k|) @ (B |O_k|, C_in)`` matmul written into its slice of a channels-last
``(C_out, *kernel, C_in)`` buffer (``out=`` a strided view: the BLAS call takes the row stride,
no copy). On small feature maps most terms are padding: a 3x3 kernel (padding 1) on 2x2 maps
keeps 16 of 36 tap-position pairs, on 4x4 maps 100 of 144; the single matmul on the unfolded
columns (:func:`dense`) multiplies them all.

Rounding: each entry is a float sum of the same nonzero terms the dense matmul or the native
weight gradient adds (the zero terms dropped change nothing but the order), in IEEE precision
(:func:`bounds.full_precision`), so :func:`bounds.book_roundoff` holds unchanged.

:func:`choose` picks per call by the fraction of terms kept (:data:`SPARSE_MAX_FRACTION`).
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor

from ppml_fast.privacy.per_sample import bounds

# Per-tap matmuls when at most this fraction of the (tap, position) pairs reads the input.
SPARSE_MAX_FRACTION = 0.5
# "auto" (:func:`choose`), or "dense" / "taps" / "native" everywhere (tests and timings).
MODE = "auto"


@functools.lru_cache(maxsize=1024)
def boxes(plan) -> tuple[tuple, int]:
    """((tap index in the cropped kernel, output slices, input slices, positions), ...) for the
    taps that read the input at least once, and the number of (tap, position) pairs kept."""
    out, kept = [], 0
    for tap in itertools.product(*(range(k) for k in plan.kernel)):
        o_sl, i_sl, count = [], [], 1
        for kc, size, start, st, dil, o_n in zip(tap, plan.in_size, plan.start, plan.stride,
                                                 plan.dilation, plan.out):
            base = kc * dil + start  # input index read by output 0
            lo = 0
            while lo < o_n and lo * st + base < 0:
                lo += 1
            hi = o_n
            while hi > lo and (hi - 1) * st + base >= size:
                hi -= 1
            count *= max(hi - lo, 0)
            o_sl.append(slice(lo, hi))
            i0 = lo * st + base
            i_sl.append(slice(i0, i0 + (hi - lo - 1) * st + 1, st))
        if count:
            out.append((tap, tuple(o_sl), tuple(i_sl), count))
            kept += count
    return tuple(out), kept


def choose(plan) -> str:
    """"dense" (one matmul on the unfolded columns), "taps" (per-tap matmuls) or "native" (the
    native weight gradient, ``aten.convolution_backward``, on the uncropped call).

    Measured on ResNet-18-GN's calls (B = 32, one thread, thread CPU time, ms; native / dense /
    taps): 3x3 on 8x8 maps (fraction of pairs kept 0.84) 1.58 / 2.6-3.1 / 2.5-2.7; on 4x4 maps
    (0.69) 1.65-1.94 / 2.0-2.3 / 2.05-2.19; stride 2 from 4x4 to 2x2 (0.69) 1.60 / 1.28 / 1.14;
    on 2x2 maps (0.44) 2.4-2.9 / 2.4-2.7 / 1.74-1.81; cropped to one tap (1x1 maps) 6.0-7.9 /
    1.3-1.4 / -. The native call (oneDNN, AVX-512 here) runs ~1.4x the flop rate of the BLAS
    matmuls (MKL, AVX2 on this AMD CPU), so the per-tap matmuls win only where they skip enough
    padding, or where the native call is slow (few positions)."""
    if MODE != "auto":
        return MODE
    total = plan.taps * plan.positions
    if total == 0 or plan.taps == 1 or plan.cropped:
        return "dense"
    frac = boxes(plan)[1] / total
    if frac <= SPARSE_MAX_FRACTION or (plan.positions <= 4 and frac <= 0.75):
        return "taps"
    return "native"


def dense(cols: Tensor, gf: Tensor) -> Tensor:
    """``(C_out, B L) @ (B L, d)``: ``gf`` (B, C_out, L) with the factors folded in, ``cols``
    (B, L, d) the unfolded input; (C_out, d) in the columns' order."""
    batch, positions, d = cols.shape
    with bounds.full_precision():  # IEEE, no TF32: bounds.book_roundoff
        return gf.transpose(0, 1).reshape(gf.shape[1], batch * positions) @ cols.reshape(
            batch * positions, d)


def taps(x: Tensor, gf: Tensor, plan) -> Tensor:
    """The same sum as :func:`dense` from ``x`` (B, C_in, *S) and ``gf`` (B, C_out, *O), one
    matmul per tap over its box of positions; (C_out, d) in the columns' order."""
    batch, cin = x.shape[:2]
    cout = gf.shape[1]
    taps_ = boxes(plan)[0]
    xc = x.movedim(1, -1).contiguous()  # (B, *S, C_in)
    gt = gf.movedim(0, 1).contiguous()  # (C_out, B, *O)
    alloc = x.new_empty if len(taps_) == plan.taps else x.new_zeros  # every slice written?
    out = alloc((cout,) + tuple(plan.kernel) + (cin,))
    whole = (slice(None), slice(None))
    with bounds.full_precision():
        for tap, o_sl, i_sl, count in taps_:
            a = gt[whole + o_sl].reshape(cout, batch * count)
            b = xc[(slice(None),) + i_sl].reshape(batch * count, cin)
            torch.mm(a, b, out=out[(slice(None),) + tap])
    return out.view(cout, plan.taps * cin)

"""Exponential and Laplace samples without an upper bound, from a source of standard normals.

Why: the Laplace mechanism is pure ε-DP only if the noise has the full Laplace tail. Any
transform of a fixed number of random bits is bounded (the former sampler,
(Z1^2 + Z2^2 - Z3^2 - Z4^2) / 2 from Box-Muller normals with |Z| <= 8.57, stopped at 73.4 scale
units), and a bounded noise is only (ε, δ)-DP with a δ nobody accounted.

How (each step a textbook identity):

1. Inversion: for U ~ Uniform(0, 1), -ln U ~ Exp(1) (Devroye 1986, "Non-Uniform Random Variate
   Generation", Ch. II.2, the inversion method). U = Φ(Z) for a standard normal Z, and
   -ln Φ(Z) is computed as ``-log_ndtr(Z)``, accurate in both tails.
2. Memorylessness: conditional on E >= T, E - T ~ Exp(1) again. So a draw that lands at or
   above T = 20 is replaced by T plus a fresh Exp(1), repeated as often as needed: the result
   is exactly Exp(1) with no upper bound, and the finite resolution of the normals near their
   radius bound (|Z| <= 8.57, i.e. -ln Φ(Z) <= 39.8) never shapes the tail: only the event
   {E >= 20} (Z <= -5.9, probability e^-20) is taken from the first draw.
3. The difference of two independent Exp(1) variables is Laplace(0, 1) (Kotz, Kozubowski &
   Podgórski 2001, "The Laplace Distribution and Generalizations", Sec. 2.2).

The number of draws is random (a second round happens with probability about n e^-20 for n
elements), so the run time reveals, with that probability, that some element's noise passed 20
scale units; this depends on the noise only, never on the data. Floating point: the samples are
doubles, and the Holohan & Braghin hardening of the secure Gaussian sampler is not proven for
this transform (see :func:`ppml_fast.mechanisms.laplace_mechanism`).
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

__all__ = ["TAIL_STEP", "unbounded_exponential", "unbounded_laplace"]

#: T of step 2: draws at or above it are redrawn as T + Exp(1).
TAIL_STEP = 20.0

Normals = Callable[[Tuple[int, ...]], torch.Tensor]


def unbounded_exponential(normal: Normals, shape: Tuple[int, ...]) -> torch.Tensor:
    """Exp(1) samples of ``shape`` (float64) from ``normal(shape)``, a source of standard
    normals, as the module docstring says."""
    shape = tuple(shape)
    out = -torch.special.log_ndtr(normal(shape).double()).reshape(-1)
    base = torch.zeros_like(out)
    redo = (out >= TAIL_STEP).nonzero().flatten()
    while redo.numel():
        base[redo] += TAIL_STEP  # E >= T: E - T is a fresh Exp(1) (memorylessness)
        fresh = -torch.special.log_ndtr(normal((int(redo.numel()),)).double()).reshape(-1)
        out[redo] = fresh
        redo = redo[fresh >= TAIL_STEP]
    return (base + out).reshape(shape)


def unbounded_laplace(normal: Normals, shape: Tuple[int, ...]) -> torch.Tensor:
    """Laplace(0, 1) samples of ``shape`` (float64): the difference of two independent
    unbounded Exp(1) samples (one draw of ``(2,) + shape``, then the tails as needed)."""
    e = unbounded_exponential(normal, (2,) + tuple(shape))
    return e[0] - e[1]

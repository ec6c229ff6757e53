"""Secure-mode randomness for sampling decisions: Bernoulli masks and uniforms from the operating
system's CSPRNG (``os.urandom``: getrandom(2) on Linux), never from torch's or numpy's
generators (Mersenne Twister / PCG64 are predictable from their outputs or their seed).

DESIGN.md, privacy invariant 3: in secure mode every random choice the guarantee rests on —
Poisson sampling of records (:class:`~ppml_fast.privacy.data.PoissonBatchSampler` with
``secure=True``), client sampling in DP-FedAvg, secure-aggregation secrets, noise — comes from a
CSPRNG keyed from OS entropy, and a seed there is an error. ``os.urandom`` is fork-safe: a
forked child reads fresh bytes from the kernel.

Bernoulli(q) is decided on 53-bit integers: the outcome is 1 iff ``k < floor(q 2^53)`` for ``k``
uniform in [0, 2^53) (the top 53 of 64 random bits), so its probability is
floor(q 2^53) / 2^53, in (q - 2^-53, q]: never above the rate the accountant composes
(a smaller sampling rate only amplifies privacy more; Mironov et al. 2019, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism", Sec. 3, the bound grows with q).
"""

from __future__ import annotations

import numbers
import os
from fractions import Fraction

import numpy as np
import torch

__all__ = ["bernoulli_mask", "rate_threshold", "uniform53"]

_TWO53 = 1 << 53


def _count(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"{name} must be an int >= 0; got {n!r}")
    return int(n)


def _bits53(n: int) -> np.ndarray:
    """``n`` uniform integers in [0, 2^53) from ``os.urandom``."""
    raw = np.frombuffer(os.urandom(8 * n), dtype="<u8")
    return (raw >> np.uint64(11)).astype(np.int64)


def rate_threshold(q: object) -> int:
    """floor(q 2^53), exactly (``q`` a real number in [0, 1])."""
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= float(q) <= 1:
        raise ValueError(f"sampling rate must be a real number in [0, 1]; got {q!r}")
    return int(Fraction(float(q)) * _TWO53)


def bernoulli_mask(n: int, q: float) -> torch.Tensor:
    """A bool tensor of ``n`` independent Bernoulli(q) outcomes from the OS CSPRNG, each with
    probability floor(q 2^53) / 2^53 (module docstring)."""
    n = _count("n", n)
    threshold = rate_threshold(q)
    return torch.from_numpy(_bits53(n) < threshold)


def uniform53(n: int) -> torch.Tensor:
    """``n`` float64 uniforms on the grid {k 2^-53 : 0 <= k < 2^53}, from the OS CSPRNG."""
    n = _count("n", n)
    return torch.from_numpy(_bits53(n).astype(np.float64) * 2.0**-53)

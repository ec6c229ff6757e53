"""The embedding rule's per-record norms in the C++ core (``csrc/cpu/embedding_norms.cpp``):
each record's output gradients summed per vocabulary row and squared, in float64, plus each
record's ``sum_t ||g_t||``, in one call (the torch formulation in :mod:`embedding` is ~20 small
ops: 0.4 ms a call inside a DP step at B 16, T 32, D 64 on the 2-core dev box).

The bound (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Lemma 3.1 and eq.
(3.5), with ``u = 2^-53``; float32 inputs are widened exactly). A row sum of ``n <= T`` terms
added in float64 has, per element, ``|r'_vj - r_vj| <= gamma_T sum_t |g_tj|``, so
``||r' - r|| <= gamma_T sum_t ||g_t||``; ``N'^2 = sum r'^2`` over at most ``T D`` squares is
within ``gamma_{T D + 1}`` (relative) of ``||r'||^2``. Hence the true norm
``N <= sqrt(N'^2 / (1 - gamma_{TD+1})) + gamma_T S`` with ``S = sum_t ||g_t||`` at most the
computed one times :func:`bounds.norm_slack` ((D,), 2^-53, T). The rule returns ``N'^2`` plus
that bound through :func:`bounds.upper_and_flags` as its torch paths do (flagged records:
materialised in float64, as before).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppml_fast.ops._native import _C, num_threads
from ppml_fast.privacy.per_sample import bounds

# Kill switch (and the A/B's toggle): False uses the torch formulations.
ENABLED = True


def usable(idx2: Tensor, g2: Tensor) -> bool:
    """Whether the kernel takes these: on, both on the CPU, ``g2`` float32 or float64."""
    return (ENABLED and hasattr(_C, "embedding_norms") and g2.device.type == "cpu"
            and idx2.device.type == "cpu" and g2.dtype in (torch.float32, torch.float64))


def norms(idx2: Tensor, g2: Tensor, pad: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(computed ``N'^2`` (B,) float64, its error bound (B,) float64, ``S`` times its slack (B,)
    float64) for indices ``idx2`` (B, T) and output gradients ``g2`` (B, T, D)."""
    batch, seq = idx2.shape
    dim = g2.shape[-1]
    if tuple(g2.shape) != (batch, seq, dim):
        raise ValueError(f"embedding_rows.norms: g2 must be {(batch, seq, dim)}; got {tuple(g2.shape)}")
    if (g2.dtype not in (torch.float32, torch.float64) or g2.device.type != "cpu"
            or idx2.device.type != "cpu" or idx2.is_floating_point() or idx2.is_complex()):
        raise ValueError("embedding_rows.norms: idx2 must be integer and g2 float32/float64, both "
                         f"on the CPU; got {idx2.dtype} on {idx2.device}, {g2.dtype} on {g2.device}")
    # resolve_neg / resolve_conj: a view with torch's lazy negation bit stores the negated
    # values, which data_ptr() would hand the kernel as they are (review S8: -1 read as padding)
    idx2 = idx2.to(torch.int64).resolve_neg().contiguous()
    g2 = g2.resolve_conj().resolve_neg().contiguous()
    sq = torch.empty(batch, dtype=torch.float64)
    total = torch.empty(batch, dtype=torch.float64)
    _C.embedding_norms(0 if g2.dtype == torch.float32 else 1, batch, seq, dim, idx2.data_ptr(),
                       g2.data_ptr(), -1 if pad is None else int(pad), sq.data_ptr(),
                       total.data_ptr(), num_threads())
    slack = bounds.norm_slack((dim,), bounds.U64, seq)
    s = total * slack
    low = 1.0 - bounds.gamma(seq * dim + 1, bounds.U64)
    up = (sq / low).sqrt() + s * bounds.gamma(seq, bounds.U64)
    bound = (up.square() - sq).clamp(min=0.0)
    return sq, bound, s

"""Plain torch/numpy float64 references of the native ops, for the tests (never for speed).

Each function restates an op's contract (DESIGN.md, "Op contracts") in the most direct way:
float64 everywhere, no blocking, no threads, numpy's libm for log/cos/sin. The tests compare
the native kernels with these; nothing in the package calls them.

- :func:`clip_and_accumulate_ref` — per-sample clipping and clipped sum
- :func:`weighted_aggregate_ref` — weighted mean with optional per-update clipping
- :func:`philox4x32_10`, :func:`gaussian_noise_ref` — the reproducible noise stream
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "clip_and_accumulate_ref",
    "gaussian_noise_ref",
    "philox4x32_10",
    "weighted_aggregate_ref",
]

_MASK32 = np.uint64(0xFFFFFFFF)


def _rows64(t: object, batch: Optional[int] = None) -> torch.Tensor:
    """A (B, numel per sample) float64 CPU copy of a tensor or array."""
    x = torch.as_tensor(np.asarray(t)) if isinstance(t, np.ndarray) else t
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if batch is None:
        batch = x.shape[0]
    width = math.prod(x.shape[1:]) if x.shape[:1] == (batch,) else x.numel() // max(batch, 1)
    return x.reshape(batch, width)


def _min1(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, max=1.0)


def clip_and_accumulate_ref(
    per_sample_grads: Sequence[torch.Tensor],
    max_norm: Union[float, Sequence[float]],
    *,
    clipping: str = "flat",
    eps: float = 1e-6,
    gamma: float = 0.01,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Float64 reference of :func:`ppml_fast.ops.clip_and_accumulate`.

    Factors (Abadi et al., "Deep learning with differential privacy", CCS 2016, Algorithm 1):
    ``f_b = min(1, C / (||g_b|| + eps))`` with ``||g_b||`` the L2 norm over all tensors of
    sample b ("flat") or, per tensor k, ``f_{b,k} = min(1, C_k / (||g_{b,k}|| + eps))``
    ("per_layer"); "automatic" (Bu et al., "Automatic clipping", NeurIPS 2023, eq. (4)):
    ``f_b = C / (||g_b|| + gamma)``. ``sums[k] = sum_b f_b g_{b,k}``.

    A sample with a non-finite flat norm (or, per layer, any non-finite layer norm) is dropped
    from every sum; its norm is reported as is.

    Returns:
        ``(sums, norms)``: float64 CPU tensors; ``sums[k]`` of shape ``g_k.shape[1:]``, norms
        of shape (B,) or (len(per_sample_grads), B) for "per_layer".
    """
    grads = list(per_sample_grads)
    batch = grads[0].shape[0]
    rows = [_rows64(g, batch) for g in grads]                       # (B, P_k) each
    layer_norms = torch.stack([torch.sqrt((r * r).sum(dim=1)) for r in rows])  # (L, B)
    flat_norm = torch.sqrt((layer_norms * layer_norms).sum(dim=0))  # (B,)
    keep = torch.isfinite(flat_norm) & torch.isfinite(layer_norms).all(dim=0)
    n_layers = len(grads)
    if isinstance(max_norm, (list, tuple)):
        c = [float(m) for m in max_norm]
        if len(c) == 1:
            c = c * n_layers
    else:
        c = [float(max_norm)] * n_layers

    if clipping == "flat":
        factors = [_min1(c[0] / (flat_norm + eps))] * n_layers
    elif clipping == "automatic":
        factors = [c[0] / (flat_norm + gamma)] * n_layers
    elif clipping == "per_layer":
        factors = [_min1(c[k] / (layer_norms[k] + eps)) for k in range(n_layers)]
    else:
        raise ValueError(f"clipping must be 'flat', 'per_layer' or 'automatic'; got {clipping!r}")

    sums = []
    for g, r, f in zip(grads, rows, factors):
        f = torch.where(keep, f, torch.zeros_like(f))
        clean = torch.where(keep[:, None], r, torch.zeros_like(r))  # 0 * NaN would poison
        sums.append((f[:, None] * clean).sum(dim=0).reshape(g.shape[1:]))
    norms = layer_norms if clipping == "per_layer" else flat_norm
    return sums, norms


def weighted_aggregate_ref(
    updates: Union[torch.Tensor, np.ndarray, Sequence[torch.Tensor], Sequence[np.ndarray]],
    weights: object,
    *,
    clip_norm: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference of :func:`ppml_fast.ops.weighted_aggregate` without noise.

    ``aggregate = sum_k w_k c_k u_k / sum_k w_k`` with ``c_k = min(1, clip_norm / ||u_k||)``
    (DP-FedAvg: McMahan et al., "Learning differentially private recurrent language models",
    ICLR 2018, Algorithm 1; the kernel adds no eps to the norm). An update with a non-finite
    norm counts as a zero update and its weight stays in the denominator.

    Returns:
        ``(aggregate, norms)`` as float64 CPU tensors of shapes (P,) and (K,); K = 0 gives zeros.
    """
    if isinstance(updates, (list, tuple)):
        u = torch.stack([_rows64(x, 1)[0] for x in updates]) if len(updates) else None
    else:
        u = _rows64(updates)
    assert u is not None and u.dim() == 2
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64)) if not isinstance(
        weights, torch.Tensor) else weights.detach().to("cpu", torch.float64)
    k, p = u.shape
    if k == 0:
        return torch.zeros(p, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    norms = torch.sqrt((u * u).sum(dim=1))
    keep = torch.isfinite(norms)
    c = torch.ones_like(norms) if clip_norm is None else _min1(clip_norm / norms)
    c = torch.where(keep, c, torch.zeros_like(c))
    clean = torch.where(keep[:, None], u, torch.zeros_like(u))
    aggregate = ((w * c)[:, None] * clean).sum(dim=0) / w.sum()
    return aggregate, norms


# --- the reproducible noise stream -----------------------------------------------------------

# Philox4x32-10 constants: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as
# 1, 2, 3", SC 2011, section 4 / Table 2 (multipliers M0, M1; Weyl key increments W0, W1).
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint64(0x9E3779B9)
_PHILOX_W1 = np.uint64(0xBB67AE85)


def philox4x32_10(counters: object, key: object) -> np.ndarray:
    """Philox4x32-10 of each 128-bit counter (Salmon et al., SC 2011, Fig. 2), vectorised.

    Args:
        counters: uint32 words of shape (..., 4).
        key: two uint32 words.

    Returns:
        uint32 array of shape (..., 4). One round maps (c0, c1, c2, c3) with key (k0, k1) to
        (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)); the key is bumped by
        (W0, W1) between rounds; ten rounds.
    """
    c = np.asarray(counters, dtype=np.uint64)
    if c.shape[-1:] != (4,):
        raise ValueError(f"counters must have shape (..., 4); got {c.shape}")
    k = np.asarray(key, dtype=np.uint64)
    if k.shape != (2,):
        raise ValueError(f"key must have shape (2,); got {k.shape}")
    c0, c1, c2, c3 = (c[..., i] & _MASK32 for i in range(4))
    k0, k1 = k[0] & _MASK32, k[1] & _MASK32
    for _ in range(10):
        p0 = _PHILOX_M0 * c0  # < 2^64: no overflow in uint64
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _MASK32,
        )
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def _box_muller(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two N(0, 1) samples per row of 4 words, as ``box_muller()`` in csrc/include/ppml/gaussian.h.

    Box & Muller, "A note on the generation of random normal deviates", Ann. Math. Stat. 1958:
    z0 = sqrt(-2 ln u1) cos(2 pi a), z1 = sqrt(-2 ln u1) sin(2 pi a) with
    u1 = k * 2^-52 + 2^-53 (k: 52 bits from w0, w1; never 0) and a = w2 * 2^-32.
    """
    w = words.astype(np.uint64)
    k52 = (w[..., 0] << np.uint64(20)) ^ (w[..., 1] >> np.uint64(12))
    u1 = k52.astype(np.float64) * 2.0**-52 + 2.0**-53  # exact: (2k + 1) * 2^-53
    a = w[..., 2].astype(np.float64) * 2.0**-32          # exact
    radius = np.sqrt(-2.0 * np.log(u1))
    # sin/cos of 2 pi a: reduce to the nearest quarter turn first (exact in turns, as the
    # kernel does), so that the reference keeps full relative accuracy near the zeros of
    # sin and cos; mathematically this is cos(2 pi a), sin(2 pi a).
    quarter = np.floor(a * 4.0 + 0.5)
    x = (a - quarter * 0.25) * (2.0 * math.pi)
    s, c = np.sin(x), np.cos(x)
    q = quarter.astype(np.int64) & 3
    sin_a = np.choose(q, [s, c, -s, -c])
    cos_a = np.choose(q, [c, -s, -c, s])
    return radius * cos_a, radius * sin_a


def gaussian_noise_ref(numels: Sequence[int], seed: int, offset: int) -> list[np.ndarray]:
    """The N(0, 1) samples that the reproducible noise ops add to tensors of these sizes.

    Element i of tensor k takes sample ``i & 1`` of Box-Muller(Philox4x32-10(counter =
    (b mod 2^32, b >> 32, 0, 0), key = (seed mod 2^32, seed >> 32))) with block
    ``b = offset + sum_{j<k} ceil(n_j / 2) + i // 2`` (csrc/include/ppml/noise.h).

    Returns:
        One float64 array of length ``numels[k]`` per tensor (multiply by std and add).
    """
    seed = int(seed) % (1 << 64)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    out = []
    first = int(offset)
    for n in numels:
        n = int(n)
        blocks = (n + 1) // 2
        index = np.uint64(first) + np.arange(blocks, dtype=np.uint64)
        counters = np.zeros((blocks, 4), dtype=np.uint64)
        counters[:, 0] = index & _MASK32
        counters[:, 1] = index >> np.uint64(32)
        z0, z1 = _box_muller(philox4x32_10(counters, key))
        z = np.empty(2 * blocks, dtype=np.float64)
        z[0::2], z[1::2] = z0, z1
        out.append(z[:n])
        first += blocks
    return out

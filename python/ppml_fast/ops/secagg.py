"""``secagg_mask_``: add pairwise / self masks of secure aggregation to a ring vector, in place.

``x[i] <- x[i] + sum_s sign_s * ChaCha20(seed_s)[i]  (mod 2^32)``: the masks of Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), section 4,
with the PRG instantiated as the ChaCha20 keystream (RFC 8439): the 32-byte seed is the key, the
nonce is zero, element i is word ``i % 16`` of block ``i // 16``. One call expands every seed of
a client (or of the server's unmasking) in one pass over ``x``. Integer maths only: the CPU and
CUDA kernels and the numpy reference (:mod:`ppml_fast.ops._secagg_reference`) agree bit for bit.
Registered as ``torch.ops.ppml_fast.secagg_mask_``.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from ppml_fast import _C
from ppml_fast.ops._library import bump_versions, define
from ppml_fast.ops._native import device_and_stream, num_threads

__all__ = ["MAX_MASK_ELEMENTS", "secagg_mask_"]

#: the 32-bit ChaCha20 block counter covers 2^32 blocks of 16 words
MAX_MASK_ELEMENTS = 1 << 36

_RING_DTYPES = (torch.int32, torch.uint32)

Seeds = Union[torch.Tensor, Sequence[bytes]]
Signs = Union[torch.Tensor, Sequence[int]]


def _check_ring_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _RING_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or uint32 (ring Z_2^32); got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the mask is added in place); got strides "
                         f"{tuple(x.stride())} for shape {tuple(x.shape)}")
    if x.numel() > MAX_MASK_ELEMENTS:
        raise ValueError(f"{name} may hold at most 2**36 elements; got {x.numel()}")
    return x


def _check_seed_tensors(seeds: torch.Tensor, signs: torch.Tensor, device: torch.device) -> None:
    """Shapes, dtypes and devices (no data read: safe while tracing)."""
    if seeds.dtype != torch.uint8 or seeds.dim() != 2 or seeds.shape[1] != 32:
        raise ValueError(f"seeds must be a (S, 32) uint8 tensor (one 256-bit seed per row); got "
                         f"shape {tuple(seeds.shape)} and dtype {seeds.dtype}")
    if signs.dtype != torch.int8 or signs.dim() != 1 or signs.shape[0] != seeds.shape[0]:
        raise ValueError(f"signs must be an int8 tensor of shape ({seeds.shape[0]},), one sign per "
                         f"seed; got shape {tuple(signs.shape)} and dtype {signs.dtype}")
    for name, t in (("seeds", seeds), ("signs", signs)):
        if t.device != device:
            raise ValueError(f"{name} must be on x's device ({device}); got {t.device}")


def _secagg_mask_kernel(x: torch.Tensor, seeds: torch.Tensor, signs: torch.Tensor) -> None:
    _check_ring_tensor("x", x)
    _check_seed_tensors(seeds, signs, x.device)
    if x.numel() == 0 or seeds.shape[0] == 0:
        return
    if not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError(f"signs must each be +1 or -1; got {signs.tolist()}")
    seeds = seeds.contiguous()
    signs = signs.contiguous()
    dev, stream = device_and_stream(x.device)
    _C.secagg_mask(device=dev, stream=stream, x=x.data_ptr(), n=x.numel(),
                   seeds=seeds.data_ptr(), signs=signs.data_ptr(), num_seeds=seeds.shape[0],
                   num_threads=num_threads())
    bump_versions((x,))


def _secagg_mask_fake(x, seeds, signs):
    return None


define("secagg_mask_(Tensor(a!) x, Tensor seeds, Tensor signs) -> ()", _secagg_mask_kernel,
       _secagg_mask_fake)


def _seeds_tensor(seeds: Seeds, device: torch.device) -> torch.Tensor:
    if isinstance(seeds, torch.Tensor):
        return seeds
    if isinstance(seeds, (bytes, bytearray)) or not isinstance(seeds, (list, tuple)):
        raise TypeError(f"seeds must be a (S, 32) uint8 tensor or a list of 32-byte strings; got "
                        f"{type(seeds).__name__}")
    for i, s in enumerate(seeds):
        if not isinstance(s, (bytes, bytearray)) or len(s) != 32:
            raise ValueError(f"seeds[{i}] must be 32 bytes; got {type(s).__name__} of length "
                             f"{len(s) if hasattr(s, '__len__') else '?'}")
    buf = np.frombuffer(b"".join(bytes(s) for s in seeds), dtype=np.uint8).reshape(len(seeds), 32)
    return torch.from_numpy(buf.copy()).to(device)


def _signs_tensor(signs: Signs, device: torch.device) -> torch.Tensor:
    if isinstance(signs, torch.Tensor):
        return signs
    if not isinstance(signs, (list, tuple)):
        raise TypeError(f"signs must be an int8 tensor or a list of +1/-1; got {type(signs).__name__}")
    for i, s in enumerate(signs):
        if isinstance(s, bool) or s not in (1, -1):
            raise ValueError(f"signs[{i}] must be +1 or -1; got {s!r}")
    return torch.tensor(list(signs), dtype=torch.int8, device=device)


def secagg_mask_(x: torch.Tensor, seeds: Seeds, signs: Signs) -> torch.Tensor:
    """Add (sign +1) or subtract (sign -1) the ChaCha20 mask of each seed to ``x``, mod 2^32.

    Args:
        x: int32 or uint32 tensor, any shape, contiguous (rejected otherwise: the masks are added
            in place), on the CPU or a CUDA device; read as elements of Z_{2^32}
            (two's complement for int32). At most 2**36 elements.
        seeds: a (S, 32) uint8 tensor on x's device, or a list of S 32-byte strings. Each seed
            keys one ChaCha20 stream: never reuse a seed for two different vectors (the masks
            would cancel in their difference).
        signs: S values, each +1 or -1 (an int8 tensor on x's device, or a list of ints).

    Returns:
        ``x``, masked in place. S = 0 or an empty ``x`` leaves ``x`` unchanged.
    """
    x = _check_ring_tensor("x", x)
    seeds_t = _seeds_tensor(seeds, x.device)
    signs_t = _signs_tensor(signs, x.device)
    _check_seed_tensors(seeds_t, signs_t, x.device)
    ring = x.view(torch.int32) if x.dtype == torch.uint32 else x
    torch.ops.ppml_fast.secagg_mask_(ring, seeds_t, signs_t)
    return x

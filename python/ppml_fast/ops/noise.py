"""Gaussian noise in place: ``add_gaussian_noise_`` and the fused ``noisy_scale_``.

Reproducible mode: counter-based Philox4x32-10 keyed by ``seed``; element i of the k-th tensor
uses block ``offset + (blocks of tensors before k) + i // 2``, two samples per block, so a
(seed, offset, sizes) gives the same numbers on CPU, on CUDA and for any thread count, and each
call returns the next unused offset. Secure mode: ChaCha20 keyed from ``os.urandom`` for every
call (block ``offset + ...`` of a 2^64-block stream: a nonce per 2^32 blocks, so a call has no
2^33-element limit) and each sample is a sum of four normals over 2, after Holohan & Braghin,
ESORICS 2021, section 5. Offsets are 64-bit counters: a call whose blocks would pass 2^63 is
refused (``noise_keys.reserve_range``) instead of wrapping onto noise already drawn.
Details and the truncation bound are in ``csrc/include/ppml/gaussian.h`` and ``noise.h``.
"""

from __future__ import annotations

import os
import struct
from typing import Sequence, Union

import torch

from ppml_fast import _C
from ppml_fast.noise_keys import reserve_range
from ppml_fast.ops import _checks
from ppml_fast.ops._library import bump_versions, define
from ppml_fast.ops._native import DTYPE_TAGS, device_and_stream, noise_blocks, num_threads

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(name: str, tensors: TensorOrList) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    return _checks.tensor_list(name, tensors)


def blocks(tensors: Sequence[torch.Tensor]) -> int:
    """Philox blocks one call consumes on ``tensors``: the offset advances by this much."""
    return sum(noise_blocks(t.numel()) for t in tensors)



def _contiguous_work(name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The buffers the kernel writes: the tensors themselves, or contiguous copies of views
    (written back afterwards). An expanded view (stride 0) cannot take the write-back, so it is
    rejected here, before anything is written. Contiguous buffers that share memory would race
    in the kernel; the native call rejects them (one sort of the address ranges in C++, no
    Python loop on the DP step's hot path)."""
    work = []
    for i, t in enumerate(tensors):
        if t.is_contiguous():
            work.append(t)
            continue
        if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
            raise ValueError(
                f"{name}[{i}] has overlapping elements (a stride-0 / expanded view); "
                "pass a tensor whose elements have distinct memory"
            )
        work.append(t.contiguous())
    return work


def run_noise(
    name: str,
    tensors: list[torch.Tensor],
    std: float,
    denominator: float,
    divide: bool,
    seed: int,
    offset: int,
    secure: bool,
) -> None:
    """Call the native kernel on validated tensors (on one device); in place. ``name`` is the
    argument named in errors."""
    if not tensors:
        return
    reserve_range(offset, blocks(tensors))  # refuses a range that would wrap
    dev, stream = device_and_stream(tensors[0].device)
    work = _contiguous_work(name, tensors)
    key_words: list[int] = []
    if secure:
        key_words = list(struct.unpack("<11I", os.urandom(44)))
    _C.gaussian_noise(
        device=dev,
        stream=stream,
        ptrs=[t.data_ptr() for t in work],
        numels=[t.numel() for t in work],
        dtypes=[DTYPE_TAGS[t.dtype] for t in work],
        stddev=std,
        denominator=denominator,
        divide=divide,
        secure=secure,
        seed=seed,
        offset=offset,
        key_words=key_words,
        num_threads=num_threads(),
        name=name,
    )
    for t, w in zip(tensors, work):
        if w is not t:
            t.copy_(w)


def _add_gaussian_noise_kernel(
    tensors: list[torch.Tensor], std: float, seed: int, offset: int, secure: bool
) -> None:
    tensors = _as_list("tensors", tensors)
    std = _checks.positive_float("std", std)
    offset = _checks.offset_value("offset", offset)
    run_noise("tensors", tensors, std, 1.0, False, _checks.seed_from_int64(seed), offset, secure)
    bump_versions(tensors)


def _add_gaussian_noise_fake(tensors, std, seed, offset, secure):
    return None


def _noisy_scale_kernel(
    sums: list[torch.Tensor], std: float, denominator: float, seed: int, offset: int, secure: bool
) -> None:
    sums = _as_list("sums", sums)
    std = _checks.positive_float("std", std)
    denominator = _checks.positive_float("denominator", denominator)
    offset = _checks.offset_value("offset", offset)
    run_noise("sums", sums, std, denominator, True, _checks.seed_from_int64(seed), offset, secure)
    bump_versions(sums)


def _noisy_scale_fake(sums, std, denominator, seed, offset, secure):
    return None


define(
    "add_gaussian_noise_(Tensor(a!)[] tensors, float std, SymInt seed, SymInt offset, bool secure)"
    " -> ()",
    _add_gaussian_noise_kernel,
    _add_gaussian_noise_fake,
)
define(
    "noisy_scale_(Tensor(a!)[] sums, float std, float denominator, SymInt seed, SymInt offset, "
    "bool secure) -> ()",
    _noisy_scale_kernel,
    _noisy_scale_fake,
)


def add_gaussian_noise_(
    tensors: TensorOrList, std: float, *, seed: int, offset: int, secure: bool = False
) -> int:
    """Add N(0, std^2) to every element of ``tensors``, in place.

    Args:
        tensors: a tensor or a list of tensors (float32/64/16, bfloat16) on one device.
            Non-contiguous tensors are processed through a contiguous copy and written back.
        std: standard deviation (> 0), in the tensors' units (for DP-SGD: noise multiplier
            times the clipping norm).
        seed: Philox key, in [0, 2**64).
        offset: first Philox block to use (>= 0); pass the value the previous call returned.
        secure: draw from ChaCha20 keyed by ``os.urandom`` and use the sum-of-four-normals
            sampler (not reproducible by design; ``seed`` is then ignored, ``offset`` only
            places the call's blocks in the 2^64-block ChaCha20 stream).

    Returns:
        The next unused offset: ``offset + sum(ceil(t.numel() / 2))``, at most 2**63 (a call
        that would pass it raises ValueError before any tensor is touched).

    The noise is computed and added in double precision and rounded to the tensor's dtype
    (float16/bfloat16: through float32). Box-Muller's radius is bounded by sqrt(2 * 53 * ln 2)
    = 8.57 (52-bit uniforms: probability mass 2^-53 per pair is cut, over all angles); the
    secure sampler, a sum of four such normals over 2, reaches |z| <= 17.1. Without ``secure``
    the noise does not defend against floating-point attacks.
    """
    tensors = _as_list("tensors", tensors)
    std = _checks.positive_float("std", std)
    seed = _checks.seed_value("seed", seed)
    offset = _checks.offset_value("offset", offset)
    secure = _checks.flag("secure", secure)
    torch.ops.ppml_fast.add_gaussian_noise_(
        tensors, std, _checks.seed_to_int64(seed), offset, secure
    )
    return offset + blocks(tensors)


def noisy_scale_(
    sums: TensorOrList,
    std: float,
    denominator: float,
    *,
    seed: int,
    offset: int,
    secure: bool = False,
) -> int:
    """``sums <- (sums + N(0, std^2)) / denominator`` in place, in one pass.

    DP-SGD's noise-and-average stage: ``std`` is noise multiplier times clipping norm and
    ``denominator`` the expected batch size. Arguments and return value as in
    :func:`add_gaussian_noise_`; ``denominator`` must be finite and > 0.
    """
    sums = _as_list("sums", sums)
    std = _checks.positive_float("std", std)
    denominator = _checks.positive_float("denominator", denominator)
    seed = _checks.seed_value("seed", seed)
    offset = _checks.offset_value("offset", offset)
    secure = _checks.flag("secure", secure)
    torch.ops.ppml_fast.noisy_scale_(
        sums, std, denominator, _checks.seed_to_int64(seed), offset, secure
    )
    return offset + blocks(sums)

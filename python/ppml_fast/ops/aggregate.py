"""``weighted_aggregate``: the server side of federated averaging, fused.

``aggregate = sum_k w_k c_k u_k / sum_k w_k (+ N(0, noise_std^2))`` with
``c_k = min(1, clip_norm / ||u_k||)`` when ``clip_norm`` is set (DP-FedAvg: McMahan et al.,
"Learning differentially private recurrent language models", ICLR 2018, Algorithm 1).
Registered as ``torch.ops.ppml_fast.weighted_aggregate``; runs on the clip kernel with
per-row weights, so it reads the updates once from memory (and once more from cache).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ppml_fast import _C
from ppml_fast.ops import _checks
from ppml_fast.ops._library import define
from ppml_fast.ops._native import (
    CHUNK,
    CLIP_MODE_TAGS,
    DTYPE_TAGS,
    accumulation_dtype,
    device_and_stream,
    num_threads,
)
from ppml_fast.ops.noise import run_noise

Updates = Union[torch.Tensor, Sequence[torch.Tensor], np.ndarray, Sequence[np.ndarray]]


def _validate_updates(updates: list[torch.Tensor]) -> tuple[int, int]:
    """(K, P) of a one-element list holding a (K, P) matrix, or of a list of K flat tensors."""
    if len(updates) == 1 and updates[0].dim() == 2:
        return updates[0].shape[0], updates[0].shape[1]
    size = updates[0].numel()
    for i, u in enumerate(updates):
        if u.dim() != 1:
            raise ValueError(
                "updates must be a (K, P) tensor or a list of K flat (1-D) tensors; "
                f"updates[{i}] has shape {tuple(u.shape)}"
            )
        if u.numel() != size:
            raise ValueError(
                f"updates must all have the same length; updates[0] has {size} elements, "
                f"updates[{i}] has {u.numel()}"
            )
    return len(updates), size


def _validate_weights(weights: torch.Tensor, k: int) -> None:
    if weights.dim() != 1 or weights.shape[0] != k:
        raise ValueError(
            f"weights must be a 1-D tensor with one weight per update ({k}); "
            f"got shape {tuple(weights.shape)}"
        )


def _weighted_aggregate_kernel(
    updates: list[torch.Tensor],
    weights: torch.Tensor,
    clip_norm: Optional[float],
    noise_std: float,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    updates = _checks.tensor_list("updates", updates)
    dtype = _checks.same_dtype("updates", updates)
    k, p = _validate_updates(updates)
    _validate_weights(weights, k)
    if weights.device != updates[0].device:
        raise ValueError(
            f"weights must be on the updates' device ({updates[0].device}); got {weights.device}"
        )
    _check_weight_values(weights)
    if clip_norm is not None:
        _checks.positive_float("clip_norm", clip_norm)
    _checks.positive_float("noise_std", noise_std, allow_zero=True)
    _checks.offset_value("offset", offset)
    device = updates[0].device
    acc = accumulation_dtype(dtype)
    out = torch.empty(p, dtype=acc, device=device)
    norms = torch.empty(k, dtype=torch.float64, device=device)
    if k == 0 or p == 0:
        out.zero_()
        norms.zero_()
    else:
        w = weights.to(device=device, dtype=torch.float64)
        scale = w / w.sum()
        dev, stream = device_and_stream(device)
        matrix = updates[0].contiguous() if len(updates) == 1 and updates[0].dim() == 2 else None
        rows: list[torch.Tensor] = []
        if matrix is None:
            if dev >= 0:
                matrix = torch.stack(updates)  # CUDA kernels take one strided matrix
            else:
                rows = [u.contiguous() for u in updates]
        scratch = None
        if dev >= 0:
            chunks = (p + CHUNK - 1) // CHUNK
            scratch = torch.empty(k * (chunks + 1), dtype=torch.float64, device=device)
        _C.clip_accumulate(
            device=dev,
            stream=stream,
            dtype=DTYPE_TAGS[dtype],
            rows=k,
            seg_ptrs=[matrix.data_ptr()] if matrix is not None else [],
            seg_widths=[p],
            row_ptrs=[r.data_ptr() for r in rows],
            out_ptrs=[out.data_ptr()],
            norms=norms.data_ptr(),
            row_scale=scale.data_ptr(),
            mode=CLIP_MODE_TAGS["flat" if clip_norm is not None else "none"],
            per_layer=False,
            max_norms=[clip_norm if clip_norm is not None else 1.0],
            eps=0.0,
            gamma=1.0,
            scratch=0 if scratch is None else scratch.data_ptr(),
            num_threads=num_threads(),
        )
    if noise_std > 0:
        run_noise("aggregate", [out], noise_std, 1.0, False, _checks.seed_from_int64(seed), offset, False)
    return (out if acc == dtype else out.to(dtype)), norms


def _weighted_aggregate_fake(updates, weights, clip_norm, noise_std, seed, offset):
    if len(updates) == 1 and updates[0].dim() == 2:
        k, p = updates[0].shape
    else:
        k, p = len(updates), updates[0].shape[0]
    first = updates[0]
    return first.new_empty((p,)), first.new_empty((k,), dtype=torch.float64)


define(
    "weighted_aggregate(Tensor[] updates, Tensor weights, float? clip_norm, float noise_std, "
    "SymInt seed, SymInt offset) -> (Tensor, Tensor)",
    _weighted_aggregate_kernel,
    _weighted_aggregate_fake,
)


def _to_torch(updates: Updates) -> tuple[list[torch.Tensor], bool]:
    """Updates as a list for the op, and whether they came as numpy."""
    if isinstance(updates, np.ndarray):
        return [_numpy_tensor("updates", updates)], True
    if isinstance(updates, torch.Tensor):
        if updates.dim() != 2:
            raise ValueError(
                f"updates must be a (K, P) tensor or a list of K flat tensors; got a tensor of "
                f"shape {tuple(updates.shape)}"
            )
        return [updates], False
    if not isinstance(updates, (list, tuple)):
        raise TypeError(
            f"updates must be a tensor, a numpy array or a list of them; got {type(updates).__name__}"
        )
    if len(updates) == 0:
        raise ValueError("updates must not be an empty list (the length P is unknown)")
    if all(isinstance(u, np.ndarray) for u in updates):
        return [_numpy_tensor(f"updates[{i}]", u) for i, u in enumerate(updates)], True
    return list(updates), False


def _numpy_tensor(name: str, a: np.ndarray) -> torch.Tensor:
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{name} must have a floating dtype (float16/32/64); got {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a))


def _weights_tensor(weights: object, device: torch.device) -> torch.Tensor:
    """Weights as a float64 tensor on the updates' device (a tensor must already be there)."""
    if isinstance(weights, torch.Tensor):
        if weights.device != device:
            raise ValueError(
                f"weights must be on the updates' device ({device}); got a tensor on {weights.device}"
            )
        w = weights
    elif isinstance(weights, (np.ndarray, list, tuple)):
        try:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"weights must be numbers; got {weights!r}") from e
    else:
        raise TypeError(
            f"weights must be a tensor, a numpy array or a list; got {type(weights).__name__}"
        )
    if w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"weights must be real numbers; got dtype {w.dtype}")
    return w.detach().to(device=device, dtype=torch.float64)


def _check_weight_values(w: torch.Tensor) -> None:
    """Value checks (they read the weights, so they run in the op, not while tracing)."""
    if w.numel() == 0:
        return
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be finite; got {w.tolist()}")
    if bool((w < 0).any()):
        raise ValueError(f"weights must be >= 0; got {w.tolist()}")
    if float(w.sum()) <= 0:
        raise ValueError("weights must not be all zero (the mean divides by their sum)")


def weighted_aggregate(
    updates: Updates,
    weights: object,
    *,
    clip_norm: Optional[float] = None,
    noise_std: float = 0.0,
    seed: Optional[int] = None,
    offset: int = 0,
) -> tuple[Union[torch.Tensor, np.ndarray], Union[torch.Tensor, np.ndarray]]:
    """Weighted mean of K updates, with optional per-update L2 clipping and Gaussian noise.

    Args:
        updates: a (K, P) tensor, a list of K flat tensors of length P, or the same as numpy
            arrays (a Flower server's format; the results are then numpy too). One floating
            dtype, one device.
        weights: K non-negative finite weights, not all zero (e.g. examples per client).
        clip_norm: when set (> 0), each update is scaled by ``min(1, clip_norm / ||u_k||)``
            before averaging.
        noise_std: standard deviation of Gaussian noise added to the mean (>= 0; 0 = none),
            from the reproducible Philox stream at (seed, offset); it consumes
            ``ceil(P / 2)`` blocks (see :func:`ppml_fast.ops.noise_blocks`).
        seed, offset: the noise stream, as in :func:`ppml_fast.ops.add_gaussian_noise_`.
            ``seed`` is required when ``noise_std > 0``: the same (seed, offset) gives the same
            noise, so each round must move on, e.g. ``offset += noise_blocks(P)`` — two rounds
            with the same noise would let their difference cancel it.

    Returns:
        ``(aggregate, norms)``: the mean (length P, the updates' dtype) and each update's L2
        norm before clipping (float64). An update holding NaN
        or Inf shows a non-finite norm and counts as a zero update (its weight stays in the
        denominator, so the sensitivity of the mean is unchanged). K = 0 gives zeros.
    """
    tensors, from_numpy = _to_torch(updates)
    # Types and devices here (the dispatcher routes by device, so a stray device must be caught
    # before the op); shapes and dtypes only in the op, so K clients are not walked twice.
    tensors = _checks.tensor_list("updates", tensors)
    first = tensors[0]
    k = first.shape[0] if len(tensors) == 1 and first.dim() == 2 else len(tensors)
    w = _weights_tensor(weights, first.device)
    _validate_weights(w, k)
    if clip_norm is not None:
        clip_norm = _checks.positive_float("clip_norm", clip_norm)
    noise_std = _checks.positive_float("noise_std", noise_std, allow_zero=True)
    if seed is None:
        if noise_std > 0:
            raise ValueError(
                "seed is required when noise_std > 0 (pass seed= and advance offset= every round "
                "by ppml_fast.ops.noise_blocks(P)); got seed=None"
            )
        seed = 0
    seed = _checks.seed_value("seed", seed)
    offset = _checks.offset_value("offset", offset)
    aggregate, norms = torch.ops.ppml_fast.weighted_aggregate(
        tensors, w, clip_norm, noise_std, _checks.seed_to_int64(seed), offset
    )
    if from_numpy:
        return aggregate.numpy(), norms.numpy()
    return aggregate, norms

"""``clip_and_accumulate``: per-sample L2 clipping and the clipped sum over the batch, fused.

The op behind DP-SGD's first stage (Abadi et al. 2016, Algorithm 1): for each sample b,
factor_b = min(1, C / (||g_b|| + eps)) and ``sums[k] = sum_b factor_b * g_{b,k}``. Registered as
``torch.ops.ppml_fast.clip_and_accumulate``; the work runs in ``csrc/*/clip_accumulate``.
"""

from __future__ import annotations

from typing import Sequence, Union

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

CLIPPING_MODES = ("flat", "per_layer", "automatic")


def _validate(grads: object, max_norms: object, clipping: object, eps: object, gamma: object):
    clipping = _checks.choice("clipping", clipping, CLIPPING_MODES)
    grads = _checks.tensor_list("per_sample_grads", grads, min_ndim=1)
    _checks.same_dtype("per_sample_grads", grads)
    batch = grads[0].shape[0]
    for i, g in enumerate(grads):
        if g.shape[0] != batch:
            raise ValueError(
                "per_sample_grads must share the batch size (dimension 0); "
                f"per_sample_grads[0] has {batch} rows, per_sample_grads[{i}] has {g.shape[0]}"
            )
    if isinstance(max_norms, (list, tuple)):
        expected = len(grads) if clipping == "per_layer" else 1
        if len(max_norms) != expected:
            what = "one value per tensor" if clipping == "per_layer" else "one number"
            raise ValueError(
                f"max_norm must be {what} ({expected}) for clipping={clipping!r}; got a sequence "
                f"of {len(max_norms)}"
            )
        norms = [_checks.positive_float(f"max_norm[{i}]", m) for i, m in enumerate(max_norms)]
    else:
        value = _checks.positive_float("max_norm", max_norms)
        norms = [value] * (len(grads) if clipping == "per_layer" else 1)
    eps = _checks.positive_float("eps", eps, allow_zero=True)
    gamma = _checks.positive_float("gamma", gamma)
    return grads, norms, clipping, eps, gamma


def _clip_and_accumulate_kernel(
    grads: list[torch.Tensor], max_norms: list[float], clipping: str, eps: float, gamma: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    grads, max_norms, clipping, eps, gamma = _validate(grads, max_norms, clipping, eps, gamma)
    dtype, device = grads[0].dtype, grads[0].device
    acc = accumulation_dtype(dtype)
    batch = grads[0].shape[0]
    per_layer = clipping == "per_layer"
    outs = [torch.empty(g.shape[1:], dtype=acc, device=device) for g in grads]
    norms_shape = (len(grads), batch) if per_layer else (batch,)
    norms = torch.empty(norms_shape, dtype=torch.float64, device=device)
    if batch == 0:
        for o in outs:
            o.zero_()
    else:
        flat = [g.contiguous() for g in grads]
        widths = [g.numel() // batch for g in flat]
        dev, stream = device_and_stream(device)
        scratch = None
        if dev >= 0:
            chunks = sum((w + CHUNK - 1) // CHUNK for w in widths)
            scratch = torch.empty(batch * (chunks + len(flat)), dtype=torch.float64, device=device)
        _C.clip_accumulate(
            device=dev,
            stream=stream,
            dtype=DTYPE_TAGS[dtype],
            rows=batch,
            seg_ptrs=[g.data_ptr() for g in flat],
            seg_widths=widths,
            row_ptrs=[],
            out_ptrs=[o.data_ptr() for o in outs],
            norms=norms.data_ptr(),
            row_scale=0,
            mode=CLIP_MODE_TAGS[clipping],
            per_layer=per_layer,
            max_norms=max_norms,
            eps=eps,
            gamma=gamma,
            scratch=0 if scratch is None else scratch.data_ptr(),
            num_threads=num_threads(),
        )
    sums = [o if o.dtype == dtype else o.to(dtype) for o in outs]
    return sums, norms


def _clip_and_accumulate_fake(grads, max_norms, clipping, eps, gamma):
    batch = grads[0].shape[0]
    for g in grads:
        torch._check(g.shape[0] == batch, lambda: "per_sample_grads must share the batch size")
    sums = [g.new_empty(g.shape[1:]) for g in grads]
    shape = (len(grads), batch) if clipping == "per_layer" else (batch,)
    return sums, grads[0].new_empty(shape, dtype=torch.float64)


define(
    "clip_and_accumulate(Tensor[] grads, float[] max_norms, str clipping, float eps, float gamma)"
    " -> (Tensor[], Tensor)",
    _clip_and_accumulate_kernel,
    _clip_and_accumulate_fake,
)


def clip_and_accumulate(
    per_sample_grads: Sequence[torch.Tensor],
    max_norm: Union[float, Sequence[float]],
    *,
    clipping: str = "flat",
    eps: float = 1e-6,
    gamma: float = 0.01,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip each sample's gradient to L2 norm ``max_norm`` and sum the clipped gradients.

    Args:
        per_sample_grads: tensors of shape ``(B, *shape_k)``, one per parameter, one dtype
            (float32, float64, float16 or bfloat16), one device. Non-contiguous tensors are
            copied to contiguous buffers first (one extra pass).
        max_norm: the clipping norm C (> 0). With ``clipping="per_layer"`` either one C for
            every tensor or one per tensor.
        clipping: ``"flat"``: one norm over all tensors of a sample, factor
            ``min(1, C / (||g_b|| + eps))``. ``"per_layer"``: the same per tensor, so sample b's
            total norm is at most ``sqrt(sum_k C_k^2)``. ``"automatic"``: factor
            ``C / (||g_b|| + gamma)`` (Bu et al., NeurIPS 2023, eq. (4)); norm < C always.
        eps: added to the norm in the flat/per-layer factor (>= 0).
        gamma: the stability constant of automatic clipping (> 0; 0.01 as in Bu et al.).

    Returns:
        ``(sums, norms)``: ``sums[k]`` of shape ``shape_k`` and the input dtype (accumulated in
        float32, or float64 for float64 input); ``norms`` of shape ``(B,)`` (flat, automatic) or
        ``(len(per_sample_grads), B)`` (per_layer), always float64 (a float32 norm would
        overflow to inf for finite samples above ~1.8e19): the norms before clipping. A sample whose gradient holds NaN or Inf shows a non-finite norm
        and contributes nothing to ``sums`` (a zero gradient is a valid clip); the caller
        decides whether to raise or drop. ``B = 0`` gives zero sums.

    The kernel reads the batch twice, the second time from cache (rows are processed in blocks
    that fit in half the last-level cache), and never writes a scaled copy. Results do not
    depend on the thread count.
    """
    grads, norms, clipping, eps, gamma = _validate(
        per_sample_grads, max_norm, clipping, eps, gamma
    )
    return torch.ops.ppml_fast.clip_and_accumulate(grads, norms, clipping, eps, gamma)

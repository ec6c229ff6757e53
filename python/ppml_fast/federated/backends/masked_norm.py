"""Batch normalisation that ignores the padded rows of the vectorized backend's batches.

The vectorized backend pads every client's batch to the chunk's width and masks the padded
rows out of the loss. A ``BatchNorm`` without running statistics (``track_running_stats=False``)
normalises with the statistics of the batch it sees, so the padded rows (copies of a zero row)
would enter the mean and variance and change every real row's output: measured up to 4.3e-3
from the sequential backend. :func:`mask_batch_norms` swaps each such module of the backend's
template for a :class:`MaskedBatchNorm` holding the same ``weight`` and ``bias`` parameters
(so ``functional_call`` feeds it the same names), which takes the statistics over the real rows
only, as ``torch.nn.functional.batch_norm`` takes them over a batch of the real rows alone
(Ioffe and Szegedy 2015, Algorithm 1: the mini-batch mean and the biased variance, per channel
over the batch and spatial dimensions). The mask comes through a :class:`MaskSlot` that the
backend fills for the duration of each forward.

Not covered, so refused or routed elsewhere by the backend: running statistics (they change in
training); a batch in which a client has exactly one real row where BatchNorm would then see a
single value per channel (``F.batch_norm`` raises for it in training, so such a client trains
with its own ``fit``, which raises as the sequential backend's does).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["MaskSlot", "MaskedBatchNorm", "mask_batch_norms"]


class MaskSlot:
    """The per-sample mask of the batch being forwarded (``(W,)`` bool inside ``vmap``)."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None


class MaskedBatchNorm(nn.Module):
    """``BatchNorm{1,2,3}d(track_running_stats=False)`` in training, statistics over the rows
    where ``slot.mask`` is True (all rows when no mask is set)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, slot: MaskSlot) -> None:
        super().__init__()
        self.eps = float(bn.eps)
        self.num_features = bn.num_features
        self.weight = bn.weight  # the same Parameter objects: the same names in the state
        self.bias = bn.bias
        self.slot = slot
        self._check = bn._check_input_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mask = self.slot.mask
        if mask is None:
            mean = x.mean(dim=dims, keepdim=True)
            var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
        else:
            m = mask.to(x.dtype).view([-1] + [1] * (x.dim() - 1))
            per_row = 1
            for d in x.shape[2:]:
                per_row *= d
            count = (m.sum() * per_row).clamp(min=1)  # an all-padded (no-op) step: 0, not NaN
            mean = (x * m).sum(dim=dims, keepdim=True) / count
            var = ((x - mean).pow(2) * m).sum(dim=dims, keepdim=True) / count
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out


def mask_batch_norms(model: nn.Module, slot: MaskSlot) -> bool:
    """Replace, in place, every batch norm of ``model`` without running statistics by a
    :class:`MaskedBatchNorm` reading ``slot``; True when there was one."""
    found = False
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not child.track_running_stats:
            setattr(model, name, MaskedBatchNorm(child, slot))
            found = True
        else:
            found = mask_batch_norms(child, slot) or found
    return found

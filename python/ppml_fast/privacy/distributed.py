"""DP-SGD across processes with ``torch.distributed``: :class:`DistributedDPOptimizer`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ppml_fast.privacy.optimizer import DPOptimizer


class DistributedDPOptimizer(DPOptimizer):
    """DPOptimizer for data-parallel training with ``torch.distributed`` (any backend; gloo on
    CPU): each rank clips its own samples; the clipped sums are summed across ranks (one
    all-reduce of one flat buffer per step); the noise is then added once per logical step —
    every rank draws the same Philox numbers (same seed and offset), so all ranks hold the same
    noisy gradient and the result equals one process that saw every rank's samples. In secure
    mode rank 0 draws the noise and broadcasts the noisy gradient. ``expected_batch_size`` is
    the global one (all ranks together). Build the model the same on every rank (e.g. same seed)
    and do not wrap it in ``DistributedDataParallel``: this optimizer does the reduction.
    """

    def __init__(self, *args, **kwargs) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedDPOptimizer needs torch.distributed initialised "
                               "(torch.distributed.init_process_group)")
        super().__init__(*args, **kwargs)
        seed = torch.tensor([self.seed % 2**63], dtype=torch.int64)
        dist.broadcast(seed, src=0)  # one noise stream for all ranks
        self.seed = int(seed)
        for p in self.params:
            dist.broadcast(p.data, src=0)

    def _reduce(self, grads: list[torch.Tensor]) -> None:
        _flat_collective(grads, lambda flat: dist.all_reduce(flat))

    def _noise_and_scale(self, grads: list[torch.Tensor]) -> None:
        if not self.secure_mode:
            super()._noise_and_scale(grads)
            return
        if dist.get_rank() == 0:
            super()._noise_and_scale(grads)
        _flat_collective(grads, lambda flat: dist.broadcast(flat, src=0))


def _flat_collective(grads: list[torch.Tensor], collective) -> None:
    """Runs ``collective`` in place on one flat buffer of ``grads`` (one message per step instead
    of one per tensor) and copies the result back."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    collective(flat)
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


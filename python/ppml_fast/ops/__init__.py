"""The native ops of ppml_fast, also registered as ``torch.ops.ppml_fast.*``.

- :func:`clip_and_accumulate` — fused per-sample clipping and sum (DP-SGD's first stage)
- :func:`add_gaussian_noise_`, :func:`noisy_scale_` — in-place Gaussian noise, reproducible
  (Philox) or secure (ChaCha20)
- :func:`weighted_aggregate` — weighted mean with optional clipping and noise (FedAvg, DP-FedAvg)
- :func:`secagg_mask_` — secure aggregation's ChaCha20 masks added in Z_{2^32}, in place

Plain-torch float64 references of each live in :mod:`ppml_fast.ops._reference`.
"""

from ppml_fast.ops._native import cuda_available, noise_blocks
from ppml_fast.ops.aggregate import weighted_aggregate
from ppml_fast.ops.clip import CLIPPING_MODES, clip_and_accumulate
from ppml_fast.ops.noise import add_gaussian_noise_, noisy_scale_
from ppml_fast.ops.secagg import secagg_mask_

__all__ = [
    "CLIPPING_MODES",
    "add_gaussian_noise_",
    "clip_and_accumulate",
    "cuda_available",
    "noise_blocks",
    "noisy_scale_",
    "secagg_mask_",
    "weighted_aggregate",
]

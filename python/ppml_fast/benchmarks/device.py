"""Where the benchmarks run: ``"cpu"`` or ``"cuda"``, chosen by an argument, else by the
environment variable ``PPML_BENCH_DEVICE`` (so ``pytest bench/...`` can choose too), else the CPU.

CUDA work is asynchronous: a case on the GPU makes each timed call end with
``torch.cuda.synchronize()``, so that the harness's wall-clock timer
(:mod:`ppml_fast.benchmarks.timing`) sees the GPU work the call launched.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

DEVICES = ("cpu", "cuda")
DEVICE_ENV = "PPML_BENCH_DEVICE"


def bench_device(device: Optional[str] = None) -> str:
    """``device``, else ``$PPML_BENCH_DEVICE``, else ``"cpu"``; checked: "cuda" needs a GPU that
    torch sees and a build of ppml_fast with the CUDA kernels (the ppml_fast impls run the native
    ops on the inputs' device). Raises ValueError naming the argument or the variable."""
    source = "device"
    if device is None:
        device, source = os.environ.get(DEVICE_ENV, "cpu") or "cpu", DEVICE_ENV
    if device not in DEVICES:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, DEVICES))}; got {device!r}")
    if device == "cuda":
        from ppml_fast.ops import cuda_available

        if not torch.cuda.is_available():
            raise ValueError(f"{source} is 'cuda' but torch sees no CUDA GPU "
                             f"(torch {torch.__version__})")
        if not cuda_available():
            raise ValueError(f"{source} is 'cuda' but this build of ppml_fast has no CUDA kernels "
                             "(rebuild with PPML_WITH_CUDA=ON)")
    return device

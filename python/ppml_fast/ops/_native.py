"""Bridge to the pybind11 extension ``ppml_fast._C``: dtype tags, thread count, device/stream.

The extension works on raw buffers (pointers, sizes, a dtype tag); this module turns tensors
into those and owns the one table that must match ``csrc/include/ppml/common.h``.
"""

from __future__ import annotations

import sys
import warnings

import torch  # first: the extension then binds to the libgomp.so.1 that torch's wheel loaded

from ppml_fast import _C


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; [] elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "gomp" in line or "libomp" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


if len(openmp_runtimes()) > 1:
    warnings.warn(
        "ppml_fast: more than one OpenMP runtime is loaded "
        f"({', '.join(openmp_runtimes())}); this torch build ships a renamed libgomp, so "
        "ppml_fast's threads do not share torch's and may compete with them for the cores.",
        RuntimeWarning,
        stacklevel=2,
    )

# Same order as ppml::DType in csrc/include/ppml/common.h.
DTYPE_TAGS = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SUPPORTED_DTYPES = tuple(DTYPE_TAGS)

# Columns are processed in chunks of this many elements (CUDA scratch is sized from it).
CHUNK = int(_C.CHUNK)

CLIP_MODE_TAGS = {"none": 0, "flat": 1, "per_layer": 1, "automatic": 2}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other supported dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_threads() -> int:
    """The CPU kernels use as many threads as torch's intra-op pool."""
    return max(1, torch.get_num_threads())


def device_and_stream(device: torch.device) -> tuple[int, int]:
    """(device index or -1 for CPU, cudaStream_t of torch's current stream as an int)."""
    if device.type == "cpu":
        return -1, 0
    if device.type != "cuda":
        raise ValueError(f"ppml_fast ops run on 'cpu' or 'cuda' tensors; got a tensor on {device}")
    if not _C.cuda_available():
        raise RuntimeError(
            "ppml_fast was built without CUDA support, so it cannot run on a CUDA tensor. Rebuild "
            "with nvcc on PATH and PPML_WITH_CUDA=ON, or move the tensors to the CPU."
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, int(torch.cuda.current_stream(index).cuda_stream)


def cuda_available() -> bool:
    """True when this build of ppml_fast includes the CUDA kernels."""
    return bool(_C.cuda_available())


def noise_blocks(numel: int) -> int:
    """Philox blocks (two samples each) that noise on ``numel`` elements consumes."""
    return (int(numel) + 1) // 2

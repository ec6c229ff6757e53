"""ppml_fast: privacy-preserving machine learning for PyTorch on a fast native core.

Today this package holds the native ops (:mod:`ppml_fast.ops`): fused per-sample clipping,
reproducible and secure Gaussian noise, and weighted aggregation, registered as
``torch.ops.ppml_fast.*``.
"""

from ppml_fast import ops
from ppml_fast._version import __version__

__all__ = ["ops", "__version__"]

"""ppml_fast: privacy-preserving machine learning for PyTorch on a fast native core.

Today this package holds the native ops (:mod:`ppml_fast.ops`): fused per-sample clipping,
reproducible and secure Gaussian noise, and weighted aggregation, registered as
``torch.ops.ppml_fast.*``; and the first accountant (:mod:`ppml_fast.accounting`: privacy events
and an RDP accountant).
"""

from ppml_fast import accounting, ops
from ppml_fast._version import __version__

__all__ = ["accounting", "ops", "__version__"]

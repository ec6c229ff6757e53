"""DP training: PrivacyEngine, DPOptimizer, per-sample norms and clipped sums.

- :class:`PrivacyEngine` — ``make_private`` / ``make_private_with_epsilon`` / ``get_epsilon``
- :class:`DPOptimizer` — clip and accumulate -> noise -> scale -> the wrapped optimizer's step
- :class:`PrivateModule` — the model with capture hooks (ghost norms, book-keeping sums)
- :class:`DPDataLoader`, :class:`BatchMemoryManager` — Poisson sampling, virtual batches
- :func:`fix_module` — BatchNorm -> GroupNorm
- :class:`ExponentialNoise`, :class:`StepNoise`, :class:`LambdaNoise` — noise schedules
"""

from ppml_fast.accounting.errors import PrivacyBudgetExceeded, PrivacyError
from ppml_fast.privacy.data import BatchMemoryManager, DPDataLoader
from ppml_fast.privacy.engine import PrivacyEngine
from ppml_fast.privacy.layers import UnsupportedModuleError, fix_module
from ppml_fast.privacy.module import NonFiniteGradientError, PrivateModule
from ppml_fast.privacy.distributed import DistributedDPOptimizer
from ppml_fast.privacy.optimizer import DPOptimizer
from ppml_fast.privacy.schedulers import ExponentialNoise, LambdaNoise, NoiseScheduler, StepNoise

__all__ = [
    "BatchMemoryManager",
    "DPDataLoader",
    "DPOptimizer",
    "DistributedDPOptimizer",
    "ExponentialNoise",
    "LambdaNoise",
    "NoiseScheduler",
    "NonFiniteGradientError",
    "PrivacyBudgetExceeded",
    "PrivacyEngine",
    "PrivacyError",
    "PrivateModule",
    "StepNoise",
    "UnsupportedModuleError",
    "fix_module",
]

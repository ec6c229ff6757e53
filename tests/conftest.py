"""Shared test settings: a deterministic hypothesis profile and a thread-count guard.

Hypothesis runs derandomized and without an example database, so every run draws the same
examples (the suite is deterministic); `deadline=None` because the first call of an op can
include one-off costs (thread pool start, dispatch caches).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ppml",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ppml")


@pytest.fixture
def restore_threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)

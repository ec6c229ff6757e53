"""One intra-op thread for the sensitivity suite: its tensors are tiny (B <= 8, d <= 64), so
threads only add synchronisation; on a busy 2-core runner two threads made the directory 9x
slower (13.5 min against 1.5 min, same results). Restored after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""The audit tests run torch on one thread: small models and element-wise ops, where threads
on a shared 2-core machine cost more than they give."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

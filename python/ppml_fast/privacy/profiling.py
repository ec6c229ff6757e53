"""Named phases of the DP step for ``torch.profiler`` (``ppml::norms``, ``ppml::factors``,
``ppml::clipped_sums``, ``ppml::noise``), read by :mod:`ppml_fast.benchmarks.profile_step`.

``torch.profiler.record_function`` costs 15-25 us per ``with`` block even when no profiler runs
(it dispatches an op; measured on the 2-core development box under load), about 1-2% of a small
model's step for the four phases; :func:`phase` opens one only while a profiler is recording
(``torch.autograd._profiler_enabled()``, true under ``torch.profiler.profile`` and the legacy
autograd profiler) and otherwise returns a shared no-op context (~0.3-1 us).
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.profiler import record_function

_OFF = contextlib.nullcontext()


def phase(name: str):
    """A ``record_function(name)`` range while a profiler records, else a no-op context."""
    return record_function(name) if torch.autograd._profiler_enabled() else _OFF

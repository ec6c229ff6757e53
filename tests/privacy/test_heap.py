"""ppml_fast.privacy.heap: the first private CPU model sets glibc's mmap / trim thresholds so a
step's freed memory is reused by the next step instead of faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ppml_fast.privacy import heap
from ppml_fast.privacy.module import PrivateModule

WORKER = Path(__file__).with_name("heap_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _faults(keep: str) -> list[int]:
    env = dict(os.environ, PPML_FAST_KEEP_HEAP=keep, OMP_NUM_THREADS="1")
    for v in heap._USER_VARS:
        env.pop(v, None)
    out = subprocess.run([sys.executable, str(WORKER)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return [int(v) for v in out.strip().splitlines()[-1].strip("[]").split(",")]


@pytest.mark.skipif(heap._glibc() is None, reason="glibc only (mallopt)")
def test_steady_steps_do_not_fault_in_what_the_last_step_freed():
    kept = _faults("1")
    assert max(kept[2:]) < 64, kept  # ~0; 48 MiB of per-sample gradients = 12,288 pages
    # the same steps with glibc's own thresholds: measured 12,512 faults a step (session 9)
    default = _faults("0")
    assert min(default[2:]) > 1000, default


def test_user_settings_and_switches_are_respected(monkeypatch):
    monkeypatch.setattr(heap, "_state", {"done": False, "result": None})
    calls = []

    class FakeLibc:
        def gnu_get_libc_version(self):
            return b"2.36"

        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(heap, "_glibc", lambda: FakeLibc())
    for var in heap._USER_VARS + (heap.ENV_SWITCH,):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert "MALLOC_TRIM_THRESHOLD_" in heap.why_not()
    assert heap.keep_freed_memory() is False and calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert heap.keep_freed_memory() is False and calls == []
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(heap.ENV_SWITCH, "0")
    assert heap.keep_freed_memory() is False and calls == []
    monkeypatch.delenv(heap.ENV_SWITCH)
    monkeypatch.setattr(heap, "ENABLED", False)
    assert heap.keep_freed_memory() is False and calls == []
    monkeypatch.setattr(heap, "ENABLED", True)
    assert heap.why_not() is None
    assert heap.keep_freed_memory() is True
    assert calls == [(-3, 32 << 20), (-1, 64 << 20)]  # mmap threshold first, then trim
    assert heap.keep_freed_memory() is True and len(calls) == 2  # once per process


def test_not_glibc_leaves_malloc_alone(monkeypatch):
    monkeypatch.setattr(heap, "_state", {"done": False, "result": None})
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    for var in heap._USER_VARS + (heap.ENV_SWITCH,):
        monkeypatch.delenv(var, raising=False)
    assert heap.why_not() == "not glibc"
    assert heap.keep_freed_memory() is False


def test_a_private_cpu_model_sets_it_once(monkeypatch):
    monkeypatch.setattr(heap, "_state", {"done": False, "result": None})
    seen = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: seen.append(1) or True)
    PrivateModule(nn.Linear(3, 2))
    assert seen == [1]
    meta = nn.Linear(3, 2, device="meta")
    PrivateModule(meta)  # no CPU parameter: malloc left alone
    assert seen == [1]

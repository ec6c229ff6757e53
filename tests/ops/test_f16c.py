"""The vector float16 / bfloat16 conversions of the AVX2 kernels (csrc/cpu/f16c.h) against the
portable integer conversions (csrc/include/ppml/common.h), exhaustively: every 16-bit pattern
converted to float and every float pattern (2^32) rounded to float16 and bfloat16, with the
default MXCSR and with flush-to-zero / denormals-are-zero. tests/ops/f16c_exhaustive.cpp does
it (~15 s on 2 cores); it is built here with the C++ compiler found on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ppml_fast import _C

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("f16c_exhaustive.cpp")


def _f16c_available() -> bool:
    previous = _C._set_clip_f16c(True)
    return bool(_C._set_clip_f16c(previous))  # True only where the CPU has AVX2 and F16C


COMPILER = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(not (os.uname().machine == "x86_64" and _f16c_available()),
                    reason="no AVX2 + F16C on this CPU")
@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler on PATH")
@pytest.mark.skipif(not (ROOT / "csrc" / "cpu" / "f16c.h").exists(), reason="no source tree")
def test_vector_16_bit_conversions_equal_the_portable_ones_for_every_pattern(tmp_path):
    exe = tmp_path / "f16c_exhaustive"
    subprocess.run(
        [COMPILER, "-O2", "-std=c++17", "-ffp-contract=off", "-pthread",
         "-I", str(ROOT / "csrc" / "cpu"), str(SOURCE), "-o", str(exe)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
    assert run.stdout.count(": 0 mismatches") == 4, run.stdout

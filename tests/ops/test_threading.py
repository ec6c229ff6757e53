"""The CPU kernels run on torch's OpenMP runtime: one libgomp in the process, and results that
do not depend on how many threads OpenMP grants."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from ppml_fast.ops import clip_and_accumulate, weighted_aggregate


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process():
    code = (
        "import torch, ppml_fast\n"
        "from ppml_fast.ops import clip_and_accumulate\n"
        "clip_and_accumulate([torch.randn(64, 100_000)], 1.0)\n"
        "torch.randn(256, 256) @ torch.randn(256, 256)\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "print(sorted({l.split()[-1] for l in maps if 'gomp' in l or 'libomp' in l}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    ).stdout
    libs = eval(out.strip())  # noqa: S307 - our own subprocess's repr of a list of paths
    assert len(libs) == 1, f"OpenMP runtimes loaded: {libs}"


def test_kernels_called_from_several_python_threads_at_once():
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(48, 30_000, generator=g), torch.randn(48, 7, generator=g)]
    u = torch.randn(40, 50_000, generator=g)
    w = torch.rand(40, generator=g) + 0.5
    want_clip = clip_and_accumulate(grads, 0.5)
    want_agg = weighted_aggregate(u, w)
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(5):
                sums, norms = clip_and_accumulate(grads, 0.5)
                agg, _ = weighted_aggregate(u, w)
                assert all(torch.equal(a, b) for a, b in zip(sums, want_clip[0]))
                assert torch.equal(norms, want_clip[1]) and torch.equal(agg, want_agg[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_openmp_thread_limit_below_the_request_gives_the_same_result():
    # OMP_THREAD_LIMIT=1 makes OpenMP grant one thread while torch asks for 2: the kernels must
    # size their barrier to the threads granted (a hang here would be the bug).
    code = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from ppml_fast.ops import clip_and_accumulate\n"
        "g = torch.Generator().manual_seed(1)\n"
        "x = torch.randn(64, 50_000, generator=g, dtype=torch.float64)\n"
        "s, n = clip_and_accumulate([x], 1.0)\n"
        "import hashlib\n"
        "print(hashlib.sha256(s[0].numpy().tobytes() + n.numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    limited = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
        timeout=120,
    ).stdout
    free = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if k != "OMP_THREAD_LIMIT"}, timeout=120,
    ).stdout
    assert limited == free

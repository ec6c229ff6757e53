"""Does the native thread pool get along with torch's? (issue 2, item 3)

Three measurements of clip_and_accumulate at (B, P) = (64, 1M) float32, 2 threads:
- alone;
- interleaved with a torch op (matmul on torch's OpenMP pool), the DP step's pattern: the pair's
  time against the sum of both alone (1.0 = no interference; DESIGN.md saw 10x with an
  active-waiting second OpenMP runtime);
- while another Python thread keeps torch busy (both pools want both cores): the ratio to alone
  (about 2 = fair sharing of 2 cores; much more = spinning against each other).

Run: pytest bench/bench_threading.py --benchmark-only -s
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest
import torch

from ppml_fast.ops import clip_and_accumulate

B, P = 64, 1_000_000


def _median_ms(fn, repeats=15, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return torch.randn(B, P), torch.randn(512, 512), torch.randn(512, 512)


def test_clip_alone(benchmark, data):
    g, _, _ = data
    benchmark.group = "threading"
    benchmark.pedantic(lambda: clip_and_accumulate([g], 1.0), rounds=15, warmup_rounds=3)


def test_interleaved_with_torch(benchmark, data):
    g, a, b = data
    benchmark.group = "threading"

    def pair():
        torch.mm(a, b)
        clip_and_accumulate([g], 1.0)

    benchmark.pedantic(pair, rounds=15, warmup_rounds=3)


def test_report(data):
    """Prints the ratios of the three measurements (same run, same data)."""
    g, a, b = data
    clip = _median_ms(lambda: clip_and_accumulate([g], 1.0))
    mm = _median_ms(lambda: torch.mm(a, b))
    pair = _median_ms(lambda: (torch.mm(a, b), clip_and_accumulate([g], 1.0)))

    stop = threading.Event()

    def busy():
        x = torch.randn(1024, 1024)
        while not stop.is_set():
            torch.mm(x, x)

    t = threading.Thread(target=busy)
    t.start()
    try:
        time.sleep(0.2)
        contended = _median_ms(lambda: clip_and_accumulate([g], 1.0))
    finally:
        stop.set()
        t.join()
    print(
        f"\nthreads={torch.get_num_threads()}  clip alone {clip:.2f} ms, matmul alone {mm:.2f} ms, "
        f"interleaved pair {pair:.2f} ms (x{pair / (clip + mm):.2f} of the sum), "
        f"clip with torch busy in another thread {contended:.2f} ms (x{contended / clip:.2f})"
    )
    assert clip > 0 and pair > 0 and contended > 0

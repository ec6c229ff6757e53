"""Grouped per-sample norms (issue 16 item 2, :mod:`ppml_fast.privacy.per_sample.grouped`): the
same DP step with grouping off (A, one rule call per layer) and on (B), interleaved step by step in
one process (the order alternates), with the non-private step in the same loop; medians of thread
CPU time (one torch thread), so that other processes on a shared machine count less. Prints, per
model, the step and its clipping phase (``clipped_sums``) for A and B and B/A.

Models: :mod:`ppml_fast.benchmarks.model_zoo` at its "bench" size (hidden 64, 2 layers, seq 32,
batch 16: mostly materialise-path linears, so only the LayerNorms group), and the same models at
seq 4, batch 2 ("short"), where the linears take the ghost path and group.

Run: PYTHONPATH=python OMP_NUM_THREADS=1 python bench/bench_grouping.py [steps] [model ...]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

from ppml_fast.benchmarks import model_zoo, profile_step
from ppml_fast.privacy import clipping
from ppml_fast.privacy.per_sample import grouped

SIZES = {"bench": model_zoo.SIZES["bench"], "short": {**model_zoo.SIZES["bench"], "seq": 4, "batch": 2}}


def measure(key: str, size: dict, steps: int) -> dict:
    """(label -> median ms): step np / A / B and clip A / B."""
    times: dict = {}
    current = [None]
    real = clipping.ClippedSums.clipped_sums

    def timed(*a, **k):
        t = time.thread_time()
        out = real(*a, **k)
        if current[0]:
            times.setdefault(("clip", current[0]), []).append(time.thread_time() - t)
        return out

    clipping.ClippedSums.clipped_sums = timed
    try:
        plain, dp = profile_step._steps(model_zoo.MODELS[key], size)
        for _ in range(3):
            plain()
            for flag in (False, True):
                grouped.GROUPING = flag
                dp()
        for i in range(steps):
            t = time.thread_time()
            plain()
            times.setdefault(("step", "np"), []).append(time.thread_time() - t)
            for label, flag in (("A", False), ("B", True)) if i % 2 else (("B", True), ("A", False)):
                grouped.GROUPING, current[0] = flag, label
                t = time.thread_time()
                dp()
                times.setdefault(("step", label), []).append(time.thread_time() - t)
                current[0] = None
    finally:
        clipping.ClippedSums.clipped_sums = real
        grouped.GROUPING = True
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str]) -> None:
    steps = int(argv[0]) if argv else 20
    keys = argv[1:] or ["bert", "gpt2", "vit", "bert-lora"]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for size_name, size in SIZES.items():
        for key in keys:
            m = measure(key, size, steps)
            np_ms = m["step", "np"]
            print(f"{key} [{size_name}]: non-private {np_ms:.2f} ms | step A {m['step', 'A']:.2f} "
                  f"({m['step', 'A'] / np_ms:.2f}x) B {m['step', 'B']:.2f} ({m['step', 'B'] / np_ms:.2f}x) "
                  f"B/A {m['step', 'B'] / m['step', 'A']:.3f} | clip A {m['clip', 'A']:.2f} "
                  f"B {m['clip', 'B']:.2f} B/A {m['clip', 'B'] / m['clip', 'A']:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

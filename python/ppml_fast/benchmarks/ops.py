"""Benchmark cases of the native ops against the baselines of issue 2.

- ``clip_and_accumulate`` on (B, P) float32, max_norm 1: eager torch, ``torch.compile`` of the
  same expression, and ``dst.copy_(G)`` (the bandwidth floor: one read and one write of G);
- ``add_gaussian_noise_`` on n float32: ``x.add_(torch.randn_like(x))``;
- ``weighted_aggregate`` on (K, P) float32: eager torch, ``w @ U`` (one read of the updates, the
  floor) and Flower's ``aggregate()`` on the same data as a list of numpy arrays, compared with
  ppml_fast called on that same list.

Targets (2-core CPU, the full sizes) sit on the first clip size, the noise and every aggregate
size. Input values do not change any kernel's speed, so inputs are scaled copies of one random
row (cheap to allocate); their norms spread over (0, 2) so that about half the rows are clipped.

Device: ``op_cases(sizes, device="cuda")`` (default ``$PPML_BENCH_DEVICE``, else "cpu"; see
:mod:`ppml_fast.benchmarks.device`) moves the inputs to the GPU after drawing them on the CPU,
makes every timed call end with
``torch.cuda.synchronize()`` (so the wall-clock timer sees the GPU work) and leaves out the
numpy rows (Flower's ``aggregate()`` and ppml_fast on a numpy list), which run on the CPU only.
The targets were set for a 2-core CPU; on a GPU read the ratios, not the verdicts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from ppml_fast import ops
from ppml_fast.benchmarks import flower
from ppml_fast.benchmarks.cases import Case, Impl, Inputs, Target
from ppml_fast.benchmarks.device import bench_device

MAX_NORM = 1.0

SIZES: dict[str, dict[str, tuple]] = {
    "full": {
        "clip": ((256, 1_000_000), (64, 4_000_000), (1024, 100_000)),
        "noise": (10_000_000,),
        "aggregate": ((10, 4_000_000), (1000, 100_000)),
    },
    # Seconds, for tests of the harness and the CLI; the targets mean nothing at these sizes.
    "tiny": {
        "clip": ((16, 4096), (4, 16384), (64, 1024)),
        "noise": (65536,),
        "aggregate": ((10, 16384), (100, 1024)),
    },
}

CLIP_TARGETS = {
    "copy": Target("<=", 1.25),
    "eager": Target(">=", 4.0),
    "compile": Target(">=", 1.5),
}
NOISE_TARGET = Target(">=", 1.5)
AGGREGATE_TARGETS = {"matmul": Target("<=", 1.3), "flower": Target(">=", 2.5)}


def count(n: int) -> str:
    """1_000_000 -> '1M', 100_000 -> '100k', 1024 -> '1024'."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def scaled_rows(rows: int, cols: int, *, seed: int) -> torch.Tensor:
    """(rows, cols) float32: row b is ``s_b * r``, r one random row of norm ~1, s_b in (0, 2)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(cols, generator=g) / math.sqrt(max(cols, 1))
    scale = torch.rand(rows, 1, generator=g) * 2
    return base * scale


# ---- clip_and_accumulate -------------------------------------------------------------------


def eager_clip(G: torch.Tensor, C: float = MAX_NORM) -> torch.Tensor:
    """The plain torch expression of issue 2 (flat clipping, one tensor)."""
    n = G.norm(dim=1)
    f = (C / (n + 1e-6)).clamp(max=1)
    return (G * f[:, None]).sum(0)


def _clip_ppml(x: Inputs):
    G = x["G"]
    return lambda: ops.clip_and_accumulate([G], MAX_NORM)


def _clip_eager(x: Inputs):
    G = x["G"]
    return lambda: eager_clip(G)


def _clip_compiled(x: Inputs):
    G = x["G"]
    compiled = torch.compile(eager_clip, dynamic=False)  # compiles on the first (warm-up) call
    return lambda: compiled(G)


def _clip_copy(x: Inputs):
    G = x["G"]
    dst = torch.empty_like(G)
    return lambda: dst.copy_(G)


def clip_case(b: int, p: int, *, with_targets: bool) -> Case:
    t = CLIP_TARGETS if with_targets else {}
    return Case(
        key=f"clip-{b}x{count(p)}",
        name=f"clip_and_accumulate B={b} P={count(p)}",
        setup=lambda: {"G": scaled_rows(b, p, seed=1)},
        impls=(
            Impl("ppml", "ppml_fast.clip_and_accumulate", _clip_ppml, role="ppml_fast"),
            Impl("eager", "torch eager", _clip_eager, target=t.get("eager")),
            Impl("compile", "torch.compile", _clip_compiled, target=t.get("compile"), costly=True),
            Impl("copy", "dst.copy_(G) [floor]", _clip_copy, role="floor", target=t.get("copy")),
        ),
    )


# ---- add_gaussian_noise_ -------------------------------------------------------------------


def _noise_ppml(x: Inputs):
    v = x["x"]
    return lambda: ops.add_gaussian_noise_(v, 1.0, seed=0, offset=0)


def _noise_torch(x: Inputs):
    v = x["x"]
    return lambda: v.add_(torch.randn_like(v))


def noise_case(n: int) -> Case:
    return Case(
        key=f"noise-{count(n)}",
        name=f"add_gaussian_noise_ n={count(n)}",
        setup=lambda: {"x": torch.zeros(n)},
        impls=(
            Impl("ppml", "ppml_fast.add_gaussian_noise_", _noise_ppml, role="ppml_fast"),
            Impl("torch", "x.add_(torch.randn_like(x))", _noise_torch, target=NOISE_TARGET),
        ),
    )


# ---- weighted_aggregate --------------------------------------------------------------------


def _aggregate_inputs(k: int, p: int) -> Inputs:
    U = scaled_rows(k, p, seed=2)
    g = torch.Generator().manual_seed(3)
    counts = torch.randint(10, 1000, (k,), generator=g)
    rows = list(U.numpy())  # views: one flat array per client, Flower's format
    return {
        "U": U,
        "w": counts.to(torch.float32),
        "rows": rows,
        "counts": counts.numpy().astype("float64"),
        "results": [([row], int(n)) for row, n in zip(rows, counts.tolist())],
    }


def _agg_ppml(x: Inputs):
    U, w = x["U"], x["w"]
    return lambda: ops.weighted_aggregate(U, w)


def _agg_ppml_clip(x: Inputs):
    U, w = x["U"], x["w"]
    return lambda: ops.weighted_aggregate(U, w, clip_norm=1.0)


def _agg_ppml_numpy(x: Inputs):
    rows, counts = x["rows"], x["counts"]
    return lambda: ops.weighted_aggregate(rows, counts)


def _agg_eager(x: Inputs):
    U, w = x["U"], x["w"]
    return lambda: (w[:, None] * U).sum(0) / w.sum()


def _agg_matmul(x: Inputs):
    U, w = x["U"], x["w"]
    return lambda: w @ U


def _agg_flower(x: Inputs):
    results = x["results"]
    return lambda: flower.aggregate(results)


def aggregate_case(k: int, p: int) -> Case:
    return Case(
        key=f"aggregate-{k}x{count(p)}",
        name=f"weighted_aggregate K={k} P={count(p)}",
        setup=lambda: _aggregate_inputs(k, p),
        impls=(
            Impl("ppml", "ppml_fast.weighted_aggregate", _agg_ppml, role="ppml_fast"),
            Impl("ppml_numpy", "ppml_fast on numpy list", _agg_ppml_numpy, role="ppml_fast"),
            Impl("eager", "(w[:,None]*U).sum(0)/w.sum()", _agg_eager),
            Impl("matmul", "w @ U [floor]", _agg_matmul, role="floor",
                 target=AGGREGATE_TARGETS["matmul"]),
            Impl("flower", "Flower aggregate() (numpy)", _agg_flower, versus="ppml_numpy",
                 target=AGGREGATE_TARGETS["flower"]),
            # DP-FedAvg's path: clipping needs the norms first, so two passes (no target)
            Impl("ppml_clip", "ppml_fast, clip_norm=1.0", _agg_ppml_clip, role="ppml_fast"),
            Impl("matmul_clip", "w @ U [floor]", _agg_matmul, role="floor", versus="ppml_clip"),
        ),
    )


# ---- device --------------------------------------------------------------------------------

CPU_ONLY = frozenset({"ppml_numpy", "flower"})  # numpy inputs: no CUDA counterpart


def _synced(make: Callable[[Inputs], Callable[[], object]]):
    """``make`` whose callable waits for the GPU before it returns."""

    def wrapped(x: Inputs):
        fn = make(x)

        def call():
            out = fn()
            torch.cuda.synchronize()
            return out

        return call

    return wrapped


def _setup_on(setup: Callable[[], Inputs], device: str) -> Callable[[], Inputs]:
    """``setup`` whose tensors are moved to ``device``; numpy-only inputs are dropped."""

    def moved() -> Inputs:
        x = setup()
        return {k: v.to(device) for k, v in x.items() if isinstance(v, torch.Tensor)}

    return moved


def on_device(case: Case, device: str) -> Case:
    """``case`` on ``device``: for "cpu" the case itself; for "cuda" inputs on the GPU, synced
    calls, the CPU-only impls (and those compared with them) left out, "[cuda]" in the name."""
    if device == "cpu":
        return case
    impls = tuple(dataclasses.replace(i, make=_synced(i.make)) for i in case.impls
                  if i.key not in CPU_ONLY and i.versus not in CPU_ONLY)
    return dataclasses.replace(case, name=f"{case.name} [{device}]",
                               setup=_setup_on(case.setup, device), impls=impls)


def op_cases(sizes: str = "full", device: Optional[str] = None) -> list[Case]:
    """The ops' cases at ``sizes`` (``"full"``: the sizes of issue 2; ``"tiny"``: for tests) on
    ``device`` ("cpu" or "cuda"; default ``$PPML_BENCH_DEVICE``, else "cpu")."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {', '.join(map(repr, SIZES))}; got {sizes!r}")
    device = bench_device(device)
    s = SIZES[sizes]
    cases = [clip_case(b, p, with_targets=i == 0) for i, (b, p) in enumerate(s["clip"])]
    cases += [noise_case(n) for n in s["noise"]]
    cases += [aggregate_case(k, p) for k, p in s["aggregate"]]
    return [on_device(c, device) for c in cases]

"""One DP-SGD step on the real models of issue 16 (:mod:`ppml_fast.benchmarks.model_zoo`):
non-private torch, ppml_fast (``make_private``, ghost) and Opacus 1.6 (hooks and ghost), in one
process, in one table (``ppml-fast bench --only models``, ``bench/bench_models.py``).

What is timed, per engine: ``zero_grad``, forward, mean cross-entropy, backward,
``optimizer.step()`` with SGD(lr=0.05) on a fixed batch (noise multiplier 1.0, max_grad_norm 1.0,
``poisson_sampling=False``; no data loader in the timed region). Each engine gets its own copy of
the model from the same seed. After ``warmup`` steps of each, the engines run in rounds, one step
of each per round (a slow drift of a shared machine moves them all alike), and the table gives the
median over ``steps`` rounds: the non-private step in ms, the others as a ratio to it.

Refusals: an engine that raises while wrapping the model or in a warm-up step is a row with
``refused`` set to its reason (Opacus ghost refusing GPT-2's tied head; ppml_fast refusing
nn.LSTM before 8c98062) and the run goes on. Opacus is given ``ModelSpec.build_opacus`` where that
differs (DPLSTM / DPGRU: Opacus 1.6 refuses nn.LSTM and nn.GRU, "We do not support nn.LSTM because
its implementation uses special modules. We have written a DPLSTM class ..."); the table says so.

Peak memory (``memory=True``): after the timing, one more step of each engine, alone, under
``torch.profiler`` with ``profile_memory=True``: the largest sum of the sizes of the tensors
torch's CPU allocator handed out during that step and had not yet taken back, at its highest.
So it is the peak of the step's own live tensor bytes: activations, captured tensors, per-sample
gradients, gradients, noise. Not counted: blocks that were alive before the step (the model, the
optimizer state, and the previous step's gradients, which ``zero_grad`` frees: the profiler does
not know their size, and says so in a warning), Python objects, and native scratch not allocated
through torch (ppml_fast's kernels get theirs from torch). RSS would include the allocator's and the
interpreter's one-off growth, and tracemalloc does not see torch's allocations at all. On CUDA
it is ``torch.cuda.max_memory_allocated()`` over the step (reset first) less
``memory_allocated()`` before it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import warnings
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.benchmarks.device import bench_device
from ppml_fast.benchmarks.model_zoo import (
    MODELS, SIZES, ModelSpec, forward_loss, make_batch, select_models)
from ppml_fast.benchmarks.report import cpu_busy, machine_info
from ppml_fast.benchmarks.timing import Profile, time_interleaved

NOISE, MAX_GRAD_NORM, LR = 1.0, 1.0, 0.05
ENGINES = ("nonprivate", "ppml_fast", "opacus_hooks", "opacus_ghost")
ENGINE_NAMES = {"nonprivate": "non-private", "ppml_fast": "ppml_fast",
                "opacus_hooks": "Opacus hooks", "opacus_ghost": "Opacus ghost"}
Row = dict[str, object]


# -- the engines --------------------------------------------------------------------------------
def _loader(b: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(b)), batch_size=b)  # its size is all they read


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


def _step(model, opt, loss_fn: Callable, inputs: dict, target: torch.Tensor) -> Callable[[], None]:
    sync = target.device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, inputs, target).backward()
        opt.step()
        if sync:
            torch.cuda.synchronize(target.device)

    return step


def make_step(engine: str, spec: ModelSpec, size: dict, inputs: dict, target: torch.Tensor,
              device: str = "cpu") -> Callable[[], None]:
    """The timed step of ``engine`` on its own copy of ``spec``'s model; raises what the engine
    raises when it refuses the model."""
    b = int(target.shape[0])
    build = spec.build if engine in ("nonprivate", "ppml_fast") else (spec.build_opacus or spec.build)
    net = build(size).to(device)
    opt = _sgd(net)
    with warnings.catch_warnings():  # fixed batches warn about the accounting; secure RNG
        warnings.simplefilter("ignore")
        if engine == "nonprivate":
            return _step(net, opt, forward_loss, inputs, target)
        if engine == "ppml_fast":
            from ppml_fast.privacy import PrivacyEngine

            model, dp, _ = PrivacyEngine().make_private(
                module=net, optimizer=opt, data_loader=_loader(b), noise_multiplier=NOISE,
                max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False, grad_sample_mode="ghost",
                noise_seed=0)
            fn = _step(model, dp, forward_loss, inputs, target)
            fn.held_bytes = lambda: model.workspace.nbytes  # reused between steps: counted
            return fn
        from opacus import PrivacyEngine as OpacusEngine

        mode = engine.split("_", 1)[1]
        kw = {"criterion": torch.nn.CrossEntropyLoss()} if mode == "ghost" else {}
        out = OpacusEngine().make_private(
            module=net, optimizer=opt, data_loader=_loader(b), noise_multiplier=NOISE,
            max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False, grad_sample_mode=mode, **kw)
    if mode == "hooks":
        model, dp, _ = out
        return _step(model, dp, forward_loss, inputs, target)
    model, dp, criterion, _ = out

    def ghost_loss(m, x, y):  # Opacus's criterion runs ghost clipping's two backward passes
        o = m(**x)
        logits = getattr(o, "logits", o)
        if y.dim() == 2:  # a language model: per-token losses, averaged per record
            return criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), shape=tuple(y.shape))
        return criterion(logits, y)

    return _step(model, dp, ghost_loss, inputs, target)


def cpu_vector_isa() -> str:
    """The widest x86 vector extension /proc/cpuinfo lists ("avx512f", "avx2", ...; "unknown" off
    Linux): the same CPU model name can come with either (issue 16 item 6)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return next((isa for isa in ("avx512f", "avx2", "avx", "sse4_2") if isa in flags), "none")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# -- memory ------------------------------------------------------------------------------------
def step_peak_mb(step: Callable[[], None], device: str = "cpu") -> float:
    """Peak MiB of the tensors a step allocates that are alive at once (module docstring), plus
    what the step holds between steps to reuse (``step.held_bytes()``: ppml_fast's per-sample
    workspace, allocated by an earlier step and used by this one instead of fresh memory)."""
    held = getattr(step, "held_bytes", None)
    return _peak_mb(step, device) + (held() / 2**20 if held is not None else 0.0)


def _peak_mb(step: Callable[[], None], device: str) -> float:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak / 2**20


# -- the run -------------------------------------------------------------------------------------
def run_models(specs: list[ModelSpec], *, size: str = "bench", steps: int = 20, warmup: int = 3,
               engines: tuple[str, ...] = ENGINES, memory: bool = True, device: str = "cpu",
               progress: Optional[Callable[[str], None]] = None) -> list[Row]:
    """One row per (model, engine): ``model``, ``title``, ``engine``, ``batch``, ``params``
    (trainable), ``median_ms``, ``iqr_ms``, ``runs``, ``ratio`` (engine ms / non-private ms),
    ``peak_mb``, ``memory_ratio`` (/ non-private's), ``refused`` (None or the reason) and
    ``note`` (e.g. "DPLSTM" for an Opacus row that ran Opacus's layer)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}; got {size!r}")
    if "nonprivate" not in engines:
        raise ValueError(f"engines must include 'nonprivate' (the baseline of every ratio); got {engines}")
    with warnings.catch_warnings():  # Opacus's and torch's hook warnings, once per step
        warnings.simplefilter("ignore")
        return _run(specs, SIZES[size], steps, warmup, engines, memory, device, progress)


def _run(specs, s, steps, warmup, engines, memory, device, progress) -> list[Row]:
    profile = Profile("models", warmup=warmup, repeats=steps, min_runs=steps)
    rows: list[Row] = []
    for spec in specs:
        inputs, target = make_batch(spec, s)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        target = target.to(device)
        ready: dict[str, Callable[[], None]] = {}
        refused: dict[str, str] = {}
        try:  # transformers / peft missing: the model's rows say so, the others run
            params = sum(p.numel() for p in spec.build(s).parameters() if p.requires_grad)
        except ImportError as e:
            missing = f"not installed: {e.name} (pip install 'ppml_fast[bench]')"
            rows += [{"model": spec.key, "title": spec.title, "engine": engine, "batch": None,
                      "params": None, "median_ms": None, "iqr_ms": None, "runs": None,
                      "ratio": None, "peak_mb": None, "memory_ratio": None, "refused": missing,
                      "note": None} for engine in engines]
            continue
        for engine in engines:
            if progress:
                progress(f"{spec.key}: {ENGINE_NAMES[engine]} (warm-up)")
            try:
                fn = make_step(engine, spec, s, inputs, target, device)
                for _ in range(warmup):
                    fn()
                ready[engine] = fn
            except ImportError as e:
                if engine in ("nonprivate", "ppml_fast"):
                    raise
                refused[engine] = f"not installed: {e.name} (pip install 'ppml_fast[bench]')"
            except Exception as e:
                if engine == "nonprivate":
                    raise
                refused[engine] = _reason(e)
        if progress:
            progress(f"{spec.key}: timing {len(ready)} engines in {steps} rounds")
        timings = time_interleaved(ready, profile)
        peaks = {}
        if memory:
            for engine, fn in ready.items():
                peaks[engine] = step_peak_mb(fn, device)
        base = timings["nonprivate"].median_ms
        for engine in engines:
            t = timings.get(engine)
            peak = peaks.get(engine)
            rows.append({
                "model": spec.key, "title": spec.title, "engine": engine,
                "batch": int(target.shape[0]), "params": params,
                "median_ms": None if t is None else t.median_ms,
                "iqr_ms": None if t is None else t.iqr_ms,
                "runs": None if t is None else t.runs,
                "ratio": None if t is None else t.median_ms / base,
                "peak_mb": peak,
                "memory_ratio": (None if peak is None or not peaks.get("nonprivate")
                                 else peak / peaks["nonprivate"]),
                "refused": refused.get(engine),
                "note": spec.opacus_note if engine.startswith("opacus") and spec.opacus_note else None,
            })
        del ready, inputs, target
        gc.collect()
    return rows


# -- the table ----------------------------------------------------------------------------------
def _cell(r: Row, field: str) -> str:
    if r["refused"] is not None:
        return "not installed" if str(r["refused"]).startswith("not installed") else "refused"
    v = r[field]
    if v is None:
        return "-"
    if r["engine"] == "nonprivate":
        return f"{v:.1f} ms" if field == "ratio" else f"{v:.1f} MiB"
    return f"{v:.2f}x" + (f" ({r['note']})" if r.get("note") else "")


def format_models_table(rows: list[Row], meta: Optional[dict] = None) -> str:
    """A markdown table (time and peak memory, ratios to non-private), the refusals below it."""
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    by_model: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_model.setdefault(str(r["model"]), {})[str(r["engine"])] = r
    head = (["model", "batch"] + [ENGINE_NAMES[e] for e in engines]
            + [f"peak mem {ENGINE_NAMES[e]}" for e in engines])
    lines = []
    if meta:
        lines.append(" | ".join(f"{k}: {v}" for k, v in meta.items()))
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, per in by_model.items():
        first = next(iter(per.values()))
        time_cells = []
        for e in engines:
            r = per[e]
            if e == "nonprivate" and r["refused"] is None:
                time_cells.append(f"{r['median_ms']:.1f} ms")
            else:
                time_cells.append(_cell(r, "ratio"))
        mem_cells = [_cell(per[e], "memory_ratio") if e != "nonprivate" or per[e]["refused"] else
                     ("-" if per[e]["peak_mb"] is None else f"{per[e]['peak_mb']:.2f} MiB")
                     for e in engines]
        lines.append("| " + " | ".join([f"{first['title']} [{model}]", str(first["batch"])]
                                        + time_cells + mem_cells) + " |")
    lines.append("")
    lines.append("time: median ms of the non-private step; the others: their median / its median "
                 "(engines interleaved step by step). peak mem: the most bytes of tensors allocated "
                 "during one step alive at once (torch.profiler memory events; CUDA: "
                 "max_memory_allocated less memory_allocated before the step), plus ppml_fast's "
                 "per-sample workspace held between steps; the others as a ratio to "
                 "non-private's.")
    for r in rows:
        if r["refused"] is not None:
            lines.append(f"refused: {ENGINE_NAMES[str(r['engine'])]} at {r['model']}: {r['refused']}")
    return "\n".join(lines)


def check_rows(rows: list[Row]) -> list[str]:
    """Problems with a result (for tests and CI smoke runs): a timed row whose ratio is not a
    finite positive number, or a model without its non-private row (unless its package, e.g.
    transformers, is not installed)."""
    bad = []
    for r in rows:
        if r["refused"] is not None:
            continue
        for f in ("median_ms", "ratio"):
            v = r[f]
            if not (isinstance(v, float) and math.isfinite(v) and v > 0):
                bad.append(f"{r['model']}/{r['engine']}: {f} = {v!r}")
    for m in {r["model"] for r in rows if not str(r["refused"]).startswith("not installed")}:
        if not any(r["model"] == m and r["engine"] == "nonprivate" and r["refused"] is None for r in rows):
            bad.append(f"{m}: no non-private row")
    return bad


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help=f"which models (default: all): {' '.join(MODELS)}")


def main(argv: Optional[list[str]] = None, *, prog: str = "bench_models") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--quick", action="store_true", help="3 steps after 1 warm-up, 'test' sizes "
                   "(a smoke run: the ratios mean nothing)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; --quick 1)")
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="'bench' (issue 16's configs, default) or 'test' (tiny; --quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: $PPML_BENCH_DEVICE, else cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    try:
        return run_cli(a)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2


def run_cli(a: argparse.Namespace) -> int:
    """Runs the models bench from parsed arguments (``--models``, ``--quick``, and optionally
    ``steps``, ``warmup``, ``size``, ``no_memory``, ``device``, ``json``); prints; exit code."""
    quick = bool(getattr(a, "quick", False))
    steps = getattr(a, "steps", None) or (3 if quick else 20)
    warmup = getattr(a, "warmup", None) or (1 if quick else 3)
    tiny = quick or getattr(a, "sizes", None) == "tiny"  # ppml-fast bench's --sizes
    size = getattr(a, "size", None) or ("test" if tiny else "bench")
    device = bench_device(getattr(a, "device", None))
    as_json = bool(getattr(a, "json", False))
    specs = select_models(getattr(a, "models", None))
    busy = cpu_busy()
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"  [{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    rows = run_models(specs, size=size, steps=steps, warmup=warmup, device=device,
                      memory=not getattr(a, "no_memory", False),
                      progress=None if as_json else progress)
    try:
        import opacus  # noqa: F401  (its version for the header; the rows say when it is missing)
    except ImportError:
        pass
    meta = machine_info(cpu_isa=cpu_vector_isa(), bench="models", size=size, steps=steps,
                        warmup=warmup, device=device, cpu_busy_before=busy,
                        wall_s=round(time.perf_counter() - start, 1))
    meta["opacus"] = getattr(sys.modules.get("opacus"), "__version__", None)
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({"meta": meta, "results": rows}, indent=2) if as_json
          else format_models_table(rows, meta))
    problems = check_rows(rows)
    for msg in problems:
        print(f"models bench: {msg}", file=sys.stderr)
    return 1 if problems else 0



if __name__ == "__main__":
    sys.exit(main(prog="python -m ppml_fast.benchmarks.models"))

"""Where a ppml_fast DP step spends its time, per real model (issue 16 item 1):
``ppml-fast bench --only profile [--models ...]`` or ``python -m ppml_fast.benchmarks.profile_step``.

Each model of :mod:`ppml_fast.benchmarks.model_zoo` runs ``steps`` steps non-private and ``steps``
steps under ppml_fast (``make_private``, ghost; noise 1.0, C 1.0, SGD), alternating, under one
``torch.profiler`` session (CPU activity only), after warm-ups. The phases are
``record_function`` ranges:

- ``plain::forward`` / ``dp::forward``, ``plain::backward`` / ``dp::backward``: set here around
  the forward + loss and the backward of each engine;
  **capture** is the DP step's forward + backward less the non-private one's: what the capture
  hooks, the detached-parameter forwards and the record checks add, less the weight gradients
  that autograd no longer computes for captured layers (the clipped sums do that work instead),
  so it can be negative (ResNet-18-GN: the conv weight gradients are most of its backward);
- ``ppml::norms`` (per-sample squared norms, ghost or materialised), ``ppml::factors`` (clip
  factors from the norms, flat/automatic), ``ppml::clipped_sums`` (book-keeping sums; it contains
  ``ppml::factors``, which the table subtracts; per-layer clipping's factors stay in it):
  :mod:`ppml_fast.privacy.clipping`; ``ppml::noise`` (noise and scaling of the sums):
  :mod:`ppml_fast.privacy.release`;
- **optimizer**: ``Optimizer.step#SGD.step``, the wrapped optimizer's own step (torch labels it;
  the non-private SGD step, ``plain::step``, is subtracted from that label's total);
- **other**: the rest of ``optimizer.step()`` (``dp::step``, set here): the one-batch and budget
  checks, accounting, setting ``p.grad``;
- zero_grad is in neither (it is timed alike for both).

Times are per step, inclusive, from the profiler's CPU clock; the profiler adds a few
microseconds per op, so small-op phases look larger than without it (compare shares, and the
untimed totals of ``--only models``). A phase whose marker never fired prints "-" (an engine
without the marker), not 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ppml_fast.benchmarks.model_zoo import SIZES, ModelSpec, forward_loss, make_batch, select_models
from ppml_fast.benchmarks.models import LR, MAX_GRAD_NORM, NOISE, _loader, cpu_vector_isa
from ppml_fast.benchmarks.report import cpu_busy, machine_info

MARKERS = {"norms": "ppml::norms", "factors": "ppml::factors", "clipped_sums": "ppml::clipped_sums",
           "noise": "ppml::noise", "optimizer": "Optimizer.step#SGD.step"}
PHASES = ("capture", "norms", "factors", "clipped_sums", "noise", "optimizer", "other")
Row = dict[str, object]


def _profiled_step(model, opt, inputs: dict, target: torch.Tensor, who: str) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with record_function(f"{who}::forward"):
            loss = forward_loss(model, inputs, target)
        with record_function(f"{who}::backward"):
            loss.backward()
        with record_function(f"{who}::step"):
            opt.step()

    return step


def _steps(spec: ModelSpec, s: dict) -> tuple[Callable[[], None], Callable[[], None]]:
    """(non-private step, ppml_fast step) on their own copies of the model."""
    from ppml_fast.privacy import PrivacyEngine

    inputs, target = make_batch(spec, s)
    plain = spec.build(s)
    plain_opt = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=LR)
    net = spec.build(s)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    model, dp, _ = PrivacyEngine().make_private(
        module=net, optimizer=opt, data_loader=_loader(int(target.shape[0])), noise_multiplier=NOISE,
        max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False, grad_sample_mode="ghost", noise_seed=0)
    return (_profiled_step(plain, plain_opt, inputs, target, "plain"),
            _profiled_step(model, dp, inputs, target, "dp"))


def _totals_ms(prof, steps: int) -> dict[str, float]:
    """record_function name -> inclusive CPU ms per step (0 steps' worth: absent)."""
    return {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def profile_model(spec: ModelSpec, *, size: str = "bench", steps: int = 5, warmup: int = 2) -> Row:
    """One row: ``model``, ``title``, ``nonprivate_ms`` (forward + backward + SGD, profiled),
    ``dp_ms`` (the same for the DP step), ``phases`` (phase -> ms per step, None: no marker),
    ``refused`` (None, or why ppml_fast refused the model)."""
    s = SIZES[size]
    row: Row = {"model": spec.key, "title": spec.title, "steps": steps, "refused": None}
    try:
        plain, dp = _steps(spec, s)
        for _ in range(warmup):
            plain()
            dp()
    except Exception as e:  # ppml_fast refuses the model: a row, not a crash
        row["refused"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return row
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):  # alternating: a drift of a shared machine moves both alike
            plain()
            dp()
    t = _totals_ms(prof, steps)
    ms = {f"{who}::{what}": t.get(f"{who}::{what}", 0.0)
          for who in ("plain", "dp") for what in ("forward", "backward", "step")}
    phases: dict[str, Optional[float]] = {k: t.get(m) for k, m in MARKERS.items()}
    if phases["optimizer"] is not None:  # both engines' SGD steps carry torch's label
        phases["optimizer"] = max(0.0, phases["optimizer"] - ms["plain::step"])
    if phases["clipped_sums"] is not None and phases["factors"] is not None:
        phases["clipped_sums"] -= phases["factors"]  # the factors are computed inside it
    plain_fb = ms["plain::forward"] + ms["plain::backward"]
    dp_fb = ms["dp::forward"] + ms["dp::backward"]
    phases["capture"] = dp_fb - plain_fb
    phases["other"] = ms["dp::step"] - sum(
        v for k, v in phases.items() if k in MARKERS and v is not None)
    row.update(nonprivate_ms=plain_fb + ms["plain::step"], dp_ms=dp_fb + ms["dp::step"],
               ms=ms, phases={k: phases[k] for k in PHASES})
    return row


def profile_models(specs: list[ModelSpec], *, size: str = "bench", steps: int = 5, warmup: int = 2,
                   progress: Optional[Callable[[str], None]] = None) -> list[Row]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}; got {size!r}")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in specs:
            if progress:
                progress(f"profile {spec.key}")
            rows.append(profile_model(spec, size=size, steps=steps, warmup=warmup))
    return rows


def format_profile_table(rows: list[Row], meta: Optional[dict] = None) -> str:
    """Markdown: per model the profiled step times and each phase's ms (and share of the DP step)."""
    head = ["model", "non-private ms", "DP ms", "DP / non-private"] + list(PHASES)
    out = []
    if meta:
        out += [" | ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["refused"] is not None:
            out.append("| " + " | ".join([str(r["model"])] + ["refused"] + ["-"] * (len(head) - 2)) + " |")
            continue
        dp = float(r["dp_ms"])
        cells = [str(r["model"]), f"{r['nonprivate_ms']:.1f}", f"{dp:.1f}",
                 f"{dp / r['nonprivate_ms']:.2f}x"]
        for k in PHASES:
            v = r["phases"][k]
            cells.append("-" if v is None else f"{v:.2f} ({100 * v / dp:.0f}%)")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "ms per step under torch.profiler (its per-op cost included), (share of the DP "
            "step). capture = DP forward+backward - non-private forward+backward (the hooks' cost "
            "less the weight gradients autograd skips for captured layers: can be negative); "
            "clipped_sums excludes factors; other = the rest of optimizer.step() (checks, "
            "accounting, p.grad)."]
    out += [f"refused: ppml_fast at {r['model']}: {r['refused']}" for r in rows if r["refused"]]
    return "\n".join(out)


def run_cli(a: argparse.Namespace) -> int:
    """Runs the profile from parsed arguments (``--models``, ``--quick``, and optionally
    ``steps``, ``size``/``sizes``, ``json``); prints; exit code."""
    quick = bool(getattr(a, "quick", False))
    tiny = quick or getattr(a, "sizes", None) == "tiny"
    size = getattr(a, "size", None) or ("test" if tiny else "bench")
    steps = getattr(a, "steps", None) or (2 if quick else 5)
    device = getattr(a, "device", None)
    if device not in (None, "cpu"):
        raise ValueError(f"the step profile runs on the CPU only; got device {device!r}")
    specs = select_models(getattr(a, "models", None))
    busy = cpu_busy()
    start = time.perf_counter()
    as_json = bool(getattr(a, "json", False))

    def progress(msg: str) -> None:
        print(f"  [{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    rows = profile_models(specs, size=size, steps=steps, progress=None if as_json else progress)
    meta = machine_info(cpu_isa=cpu_vector_isa(), bench="profile", size=size, steps=steps,
                        cpu_busy_before=busy,
                        wall_s=round(time.perf_counter() - start, 1))
    print(json.dumps({"meta": meta, "results": rows}, indent=2) if as_json
          else format_profile_table(rows, meta))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppml_fast.benchmarks.profile_step",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", metavar="MODEL", help="which models (default: all)")
    p.add_argument("--quick", action="store_true", help="'test' sizes, 2 profiled steps")
    p.add_argument("--steps", type=int, default=None, help="profiled steps per engine (default 5)")
    p.add_argument("--size", choices=tuple(SIZES), default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        return run_cli(a)
    except ValueError as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

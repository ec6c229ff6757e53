"""What ``ppml-fast demo`` does: check that it can write its outputs and use the chosen backend
(before any training), run the experiment, print the table, why rounds were skipped, what the
epsilon protects and the comparison, write ``report.json`` and ``privacy_utility.png`` to the
output directory.

Threads are the simulator's choice (:func:`ppml_fast.federated.run_simulation`), as for any
user of it: the demo sets none of its own."""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from .config import DemoConfig
from .experiment import run_experiment
from .report import comparison_line, format_table, left_out_lines, privacy_unit_line, to_report, write_report

__all__ = ["check_can_run", "run_demo"]


def check_can_run(cfg: DemoConfig) -> None:
    """Raises ValueError, before any training, when the output directory cannot be written or
    the backend's package is missing."""
    out = cfg.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output must be a directory; {out!r} exists and is a file")
    parent = out
    while parent and not os.path.exists(parent):  # the nearest existing ancestor
        parent = os.path.dirname(parent.rstrip(os.sep))
    parent = parent or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output {out!r} cannot be written ({parent!r} is not a writable directory)")
    if cfg.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("backend 'ray' needs Ray, which is not installed: pip install 'ppml_fast[ray]' "
                         "(or use --backend vectorized or sequential)")


def run_demo(cfg: DemoConfig, *, progress: bool = True, plot: bool = True) -> dict:
    """Run the demo; print to stdout, log to stderr; return the report (also in report.json)."""
    check_can_run(cfg)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    log(f"{cfg.clients} clients (Dirichlet alpha={cfg.alpha}), {cfg.rounds} rounds, "
        f"{cfg.per_round} clients per round, mode {cfg.mode}, strategy {cfg.strategy}, "
        f"backend {cfg.backend}" + (f", {cfg.seeds} seeds" if cfg.seeds > 1 else ""))
    result = run_experiment(cfg, progress=progress, log=log)
    print(f"\n{result.main.label}: per round")
    print(format_table(result.main))
    for line in left_out_lines(result.main):
        print(line)
    unit = privacy_unit_line(cfg.mode)
    if unit:
        print(unit)
    if result.sweep:
        print("\nnoise sweep (final test accuracy, epsilon):")
        for s in result.sweep:
            eps = "-" if s.final_epsilon is None else f"{s.final_epsilon:.3g}"
            acc = f"accuracy {s.final_accuracy:.4f}"
            if len(s.seed_accuracies) > 1:
                import statistics

                acc = (f"accuracy {statistics.mean(s.seed_accuracies):.4f} +- "
                       f"{statistics.stdev(s.seed_accuracies):.4f} over {len(s.seed_accuracies)} seeds")
            refused = sum(d.get("reason") == "budget" for r in s.rounds for d in r.get("dropped") or [])
            print(f"  {s.label:>14}: {acc}, epsilon {eps}"
                  + (f" ({refused} fits refused by the clients' cap)" if refused else ""))
    print("\n" + comparison_line(result))
    seconds = time.perf_counter() - start
    report = to_report(result, seconds=seconds)
    path = write_report(report, cfg.output)
    print(f"wrote {path}")
    if plot:
        try:
            from .plot import plot_privacy_utility

            print(f"wrote {plot_privacy_utility(result, cfg.output)}")
        except ImportError as e:
            print(f"no plot: {e}", file=sys.stderr)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return report

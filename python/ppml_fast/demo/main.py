"""What ``ppml-fast demo`` does: run the experiment, print the table and the comparison, write
``report.json`` and ``privacy_utility.png`` to the output directory."""

from __future__ import annotations

import sys
import time

from .config import DemoConfig
from .experiment import run_experiment
from .report import comparison_line, format_table, to_report, write_report

__all__ = ["run_demo"]


def run_demo(cfg: DemoConfig, *, progress: bool = True, plot: bool = True) -> dict:
    """Run the demo; print to stdout, log to stderr; return the report (also in report.json)."""
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    log(f"{cfg.clients} clients (Dirichlet alpha={cfg.alpha}), {cfg.rounds} rounds, "
        f"{cfg.per_round} clients per round, mode {cfg.mode}, strategy {cfg.strategy}, "
        f"backend {cfg.backend}")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo's MLP is tiny: one thread is 2x faster than two here
    try:
        result = run_experiment(cfg, progress=progress, log=log)
    finally:
        torch.set_num_threads(threads)
    print(f"\n{result.main.label}: per round")
    print(format_table(result.main))
    if result.sweep:
        print("\nnoise sweep (final test accuracy, epsilon):")
        for s in result.sweep:
            eps = "-" if s.final_epsilon is None else f"{s.final_epsilon:.3g}"
            print(f"  {s.label:>14}: accuracy {s.final_accuracy:.4f}, epsilon {eps}")
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

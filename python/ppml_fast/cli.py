"""The ``ppml-fast`` command: ``ppml-fast <subcommand> [options]``.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its options and
sets ``run`` to ``_<name>(args) -> exit code``. To add one (demo, epsilon, audit), write the
pair and list the first in ``_SUBCOMMANDS``. Heavy imports stay inside the ``run`` functions
so that ``ppml-fast --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional, Sequence

from ppml_fast._version import __version__


BUSY_WARNING = 0.2  # fraction of the CPU used by other work before the run


def _bench(args: argparse.Namespace) -> int:
    import dataclasses

    from ppml_fast.benchmarks import PROFILES, accounting_cases, dp_step_cases, op_cases, run_cases
    from ppml_fast.benchmarks.report import cpu_busy, format_table, machine_info, to_json

    profile = PROFILES["quick" if args.quick else "full"]
    if args.compile is not None:
        profile = dataclasses.replace(profile, costly=args.compile)
    cases = op_cases(args.sizes) + dp_step_cases(args.sizes) + accounting_cases(args.sizes)
    if args.only:
        cases = [c for c in cases if any(s in c.key for s in args.only)]
        if not cases:
            print(f"ppml-fast bench: --only {' '.join(args.only)} matches no case", file=sys.stderr)
            return 2
    busy = cpu_busy()
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"  [{time.perf_counter() - start:5.1f} s] {msg}", file=sys.stderr, flush=True)

    rows = run_cases(cases, profile, progress=None if args.json else progress)
    meta = machine_info(
        profile=profile.name,
        sizes=args.sizes,
        torch_compile=profile.costly,
        cpu_busy_before=busy,
        wall_s=round(time.perf_counter() - start, 1),
    )
    print(to_json(rows, meta) if args.json else format_table(rows, meta))
    if busy is not None and busy > BUSY_WARNING:
        print(
            f"warning: other work kept {busy:.0%} of the CPU busy before this run; torch's "
            "parallel regions then wait for scheduler slices and the ratios are not trustworthy",
            file=sys.stderr,
        )
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time the native ops, the DP step and the accountants against their baselines",
        description="Time ppml_fast's ops against eager torch, torch.compile, the bandwidth floor "
        "and Flower's aggregate(); its DP-SGD step against the non-private step and Opacus; and "
        "its accountants against dp-accounting and Opacus (Opacus and dp-accounting when "
        "installed: pip install '.[bench]'), in one run, and print one table of medians and "
        "ratios with the targets (set for a 2-core CPU at the full sizes).",
    )
    p.add_argument("--quick", action="store_true",
                   help="fewer runs and no torch.compile: under a minute on 2 cores")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--compile", choices=("all", "targets", "none"),
                   help="where to time the torch.compile baseline (it needs a C++ compiler and "
                   "10 s or more of compilation per shape on 2 cores): in all cases, only where "
                   "it has a target, or nowhere; default: all, and none with --quick")
    p.add_argument("--sizes", choices=("full", "tiny"), default="full",
                   help="problem sizes: 'full' (those of the targets, default) or 'tiny' "
                   "(seconds; for testing the command, ratios are not meaningful)")
    p.add_argument("--only", nargs="+", metavar="KEY",
                   help="run only cases whose key contains one of these (clip, noise, aggregate, "
                   "dp-step, accounting, clip-256x1M, ...)")
    p.set_defaults(run=_bench)


def _epsilon(args: argparse.Namespace) -> int:
    from ppml_fast.accounting import epsilon

    eps = epsilon(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate,
                  steps=args.steps, delta=args.delta, accountant=args.accountant)
    print(f"epsilon = {eps:.6g} at delta = {args.delta:g} ({args.accountant}; sample rate "
          f"{args.sample_rate:g}, noise multiplier {args.noise_multiplier:g}, {args.steps} steps)")
    return 0


def _add_epsilon(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("epsilon", help="privacy spent by DP-SGD (Poisson-sampled Gaussian steps)")
    p.add_argument("--sample-rate", type=float, required=True, help="q: expected batch / dataset")
    p.add_argument("--noise-multiplier", type=float, required=True,
                   help="sigma: noise std as a multiple of the clipping norm")
    p.add_argument("--steps", type=int, required=True, help="number of steps T")
    p.add_argument("--delta", type=float, required=True, help="target delta")
    p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                   help="rdp (Rényi DP, an upper bound) or pld (privacy loss distribution, tighter)")
    p.set_defaults(run=_epsilon)


def _noise_multiplier(args: argparse.Namespace) -> int:
    from ppml_fast.accounting import epsilon, get_noise_multiplier

    sigma = get_noise_multiplier(target_epsilon=args.target_epsilon, target_delta=args.delta,
                                 sample_rate=args.sample_rate, steps=args.steps,
                                 accountant=args.accountant)
    spent = epsilon(noise_multiplier=sigma, sample_rate=args.sample_rate, steps=args.steps,
                    delta=args.delta, accountant=args.accountant)
    print(f"noise multiplier = {sigma:.6g} (epsilon {spent:.6g} <= {args.target_epsilon:g} at "
          f"delta = {args.delta:g}; {args.accountant})")
    return 0


def _add_noise_multiplier(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("noise-multiplier", help="smallest noise multiplier for a privacy budget")
    p.add_argument("--target-epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--sample-rate", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                   help="rdp (Rényi DP, an upper bound) or pld (privacy loss distribution, tighter)")
    p.set_defaults(run=_noise_multiplier)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_bench,
    _add_epsilon,
    _add_noise_multiplier,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppml-fast",
        description="ppml_fast: privacy-preserving machine learning for PyTorch on a native core.",
    )
    parser.add_argument("--version", action="version", version=f"ppml_fast {__version__}")
    sub = parser.add_subparsers(title="subcommands", metavar="<subcommand>")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError) as e:
        print(f"ppml-fast: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

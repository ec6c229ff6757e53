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
    from ppml_fast.benchmarks.device import bench_device
    from ppml_fast.benchmarks.federated import federated_cases
    from ppml_fast.benchmarks.secagg import secagg_cases
    from ppml_fast.benchmarks.report import cpu_busy, format_table, machine_info, to_json

    # the real models of issue 16 and their step profiles: own runs, only when asked for by name
    own = [k for k in args.only or () if k in ("models", "profile", "privacy-utility")]
    if own:
        from ppml_fast.benchmarks import models, privacy_utility, profile_step

        def privacy_table(a):  # issue 19's privacy-utility table (--quick: the CI size)
            return privacy_utility.main(["--quick"] if a.quick else [])

        run = {"models": models.run_cli, "profile": profile_step.run_cli, "privacy-utility": privacy_table}
        codes = [run[k](args) for k in own]
        args.only = [k for k in args.only if k not in own]
        if not args.only:
            return max(codes)
    profile = PROFILES["quick" if args.quick else "full"]
    if args.compile is not None:
        profile = dataclasses.replace(profile, costly=args.compile)
    device = bench_device(args.device)
    cases = (op_cases(args.sizes, device) + dp_step_cases(args.sizes, device)
             + accounting_cases(args.sizes) + federated_cases(args.sizes, device))
    # secure aggregation of 100 clients x 1M parameters takes ~10-40 s a round on 2 cores:
    # in the full profile, or when asked for by name
    if not args.quick or args.sizes == "tiny" or any("secagg" in s for s in args.only or ()):
        cases += secagg_cases(args.sizes)
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
        device=device,
    )
    if device == "cuda":
        import torch

        meta["gpu"] = torch.cuda.get_device_name()
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
        help="time the native ops, the DP step, the accountants, federated rounds and secure "
        "aggregation against their baselines",
        description="Time ppml_fast's ops against eager torch, torch.compile, the bandwidth floor "
        "and Flower's aggregate(); its DP-SGD step against the non-private step and Opacus; "
        "its accountants against dp-accounting and Opacus; one federated round (vectorized, "
        "sequential) against a plain torch loop and Flower's simulation; and, in the full "
        "profile, secure aggregation against plain aggregation (Opacus, dp-accounting and Flower "
        "when installed: pip install '.[bench]'), in one run, and print one table of medians and "
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
                   "dp-step, accounting, federated, secagg, clip-256x1M, ...); 'models': one DP "
                   "step of real models (BERT, GPT-2, ViT, ResNet-18-GN, LoRA, LSTM/GRU; transformers "
                   "and peft from the bench extra) against non-private and Opacus, with peak "
                   "memory; 'profile': the torch.profiler breakdown of their DP steps; "
                   "'privacy-utility': issue 19's accuracy at epsilon 1, 3, 8 of DP-SGD, DP-FTRL "
                   "and banded MF with audits (15-30 min; --quick: CI size); none of these is "
                   "part of a run without --only")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="with --only models / profile: which real models (default all: bert "
                   "roberta bert-frozen-emb gpt2 vit resnet18-gn gpt2-lora bert-lora lstm gru)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="where the ops and the DP step run (the accountants always run on the "
                   "CPU); cuda needs a GPU and a build with the CUDA kernels; default: "
                   "$PPML_BENCH_DEVICE, else cpu")
    p.set_defaults(run=_bench)


def _demo(args: argparse.Namespace) -> int:
    from ppml_fast.demo import DemoConfig
    from ppml_fast.demo.main import run_demo

    given = {k: v for k, v in {
        "clients": args.clients, "rounds": args.rounds, "clients_per_round": args.clients_per_round,
        "mode": args.mode, "noise_multiplier": args.noise_multiplier,
        "target_epsilon": args.target_epsilon, "clip_norm": args.clip_norm,
        "strategy": args.strategy, "backend": args.backend, "alpha": args.alpha,
        "seed": args.seed, "output": args.output, "accountant": args.accountant,
        "proximal_mu": args.proximal_mu, "seeds": args.seeds,
    }.items() if v is not None}
    if args.noise_multiplier is not None and args.target_epsilon is None and args.mode != "local-dp":
        # dp-fedavg with sigma given: nothing to calibrate, the epsilon spent is reported. Under
        # local-dp the target stays each client's cap (a given sigma does not lift it)
        given["target_epsilon"] = None
    cfg = DemoConfig.quick_version(**given) if args.quick else DemoConfig(**given)
    run_demo(cfg, progress=not args.no_progress, plot=not args.no_plot)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = DemoConfigDefaults
    p = sub.add_parser(
        "demo", help="federated DP training over simulated clients on the embedded digits data",
        description="Train an MLP on scikit-learn's bundled digits split over simulated clients "
        "(Dirichlet label skew), with user-level DP-FedAvg or local DP-SGD in each client; print "
        "test accuracy and epsilon per round and a comparison with the non-private run; write "
        "report.json and privacy_utility.png (matplotlib: pip install 'ppml_fast[demo]') to "
        "--output. No network needed.")
    p.add_argument("--clients", type=int, help=f"simulated clients (default {d.clients}; --quick 40)")
    p.add_argument("--rounds", type=int, help=f"federated rounds (default {d.rounds}; --quick 10)")
    p.add_argument("--clients-per-round", type=int,
                   help="clients per round (default: all; DP-FedAvg samples each with this / clients)")
    p.add_argument("--mode", choices=("dp-fedavg", "local-dp", "none"),
                   help="user-level DP-FedAvg (default), local DP-SGD in each client (sequential: "
                   "several times slower, about 25 s of CPU with --quick here), or none")
    p.add_argument("--noise-multiplier", type=float,
                   help="sigma (default: calibrated to --target-epsilon; for local-dp each client "
                   "calibrates its own over the rounds it takes part in)")
    p.add_argument("--target-epsilon", type=float,
                   help=f"privacy budget per client (default {d.target_epsilon}): calibrates sigma for "
                   "dp-fedavg (user-level); for local-dp each client's record-level cap, which a "
                   "given --noise-multiplier does not lift")
    p.add_argument("--clip-norm", type=float,
                   help=f"L2 clipping norm of client updates (dp-fedavg) or per-sample gradients "
                   f"(local-dp) (default {d.clip_norm})")
    p.add_argument("--strategy", help=f"server strategy (default {d.strategy}): fedavg, fedavgm, "
                   "fedprox, fedadam, fedyogi, fedadagrad; with --mode local-dp or none also "
                   "fedmedian, fedtrimmedavg, krum")
    p.add_argument("--proximal-mu", type=float,
                   help=f"FedProx's proximal term mu (default {d.proximal_mu}; --strategy fedprox)")
    p.add_argument("--backend", choices=("sequential", "vectorized", "ray"),
                   help=f"simulation backend (default {d.backend}; local-dp runs sequential)")
    p.add_argument("--alpha", type=float, help=f"Dirichlet label-skew concentration (default {d.alpha})")
    p.add_argument("--accountant", choices=("rdp", "pld"), help="privacy accountant (default pld)")
    p.add_argument("--seed", type=int, help="seed of the split, training and noise (default 0)")
    p.add_argument("--seeds", type=int,
                   help="repeat the sweep and the baseline with this many seeds (seed, seed+1, ...) "
                   "for error bars on the plot (default 1; each seed adds a run per sweep point)")
    p.add_argument("--output", help=f"output directory (default {d.output})")
    p.add_argument("--quick", action="store_true", help="a smaller run: under 30 s on 2 cores")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="skip privacy_utility.png")
    p.set_defaults(run=_demo)


class DemoConfigDefaults:
    """The demo's defaults for the help text, without importing torch for ``--help``."""

    clients, rounds, target_epsilon, clip_norm = 100, 30, 8.0, 1.0
    strategy, backend, alpha, output = "fedavg", "vectorized", 0.5, "./ppml-demo-out"
    proximal_mu, seeds = 0.01, 1


def _epsilon(args: argparse.Namespace) -> int:
    from ppml_fast.accounting import epsilon

    eps = epsilon(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate,
                  steps=args.steps, delta=args.delta, accountant=args.accountant)
    print(f"epsilon = {eps:.6g} at delta = {args.delta:g} ({args.accountant}; sample rate "
          f"{args.sample_rate:g}, noise multiplier {args.noise_multiplier:g}, {args.steps} steps)")
    if eps == float("inf"):
        print("  (no finite epsilon at this delta: the accountant's bound is +inf, which is "
              "always valid; more noise, fewer steps or a larger delta give a finite one)")
    return 0


def _add_epsilon(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("epsilon", help="privacy spent by DP-SGD (Poisson-sampled Gaussian steps)")
    p.add_argument("--sample-rate", type=float, required=True, help="q: expected batch / dataset")
    p.add_argument("--noise-multiplier", type=float, required=True,
                   help="sigma: noise std as a multiple of the clipping norm")
    p.add_argument("--steps", type=int, required=True, help="number of steps T")
    p.add_argument("--delta", type=float, required=True, help="target delta")
    p.add_argument("--accountant", choices=("rdp", "pld"), default="pld",
                   help="pld (privacy loss distribution, tight; the default) or rdp (Rényi DP, an "
                   "upper bound, looser)")
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
    p.add_argument("--accountant", choices=("rdp", "pld"), default="pld",
                   help="pld (privacy loss distribution, tight; the default) or rdp (Rényi DP, an "
                   "upper bound, looser)")
    p.set_defaults(run=_noise_multiplier)


def _audit(args: argparse.Namespace) -> int:
    import json

    import torch

    from ppml_fast.audit import audit_digits

    torch.set_num_threads(1)  # a small MLP: threads cost more than they give
    broken = None
    if args.no_noise:  # a deliberately broken run: what the audit is there to catch
        from ppml_fast.audit.broken import NoNoiseDPOptimizer as broken
    result = audit_digits(
        noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm,
        canaries=args.canaries, canary_kind=args.canary_kind, observe=args.observe,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, delta=args.delta,
        confidence=args.confidence, seed=args.seed, runs=args.runs, accountant=args.accountant,
        dp_optimizer_class=broken)
    if args.json:
        out = result.to_dict()
        out["broken"] = "no-noise" if args.no_noise else None
        print(json.dumps(out, indent=2))
    else:
        c, d = result.counts, result.details
        how = (f"one run, {c['canaries']} {d['canary_kind']} canaries ({c['included']} included): "
               f"{c['correct']} of {c['guesses']} guesses right" if result.method == "one_run" else
               f"{d['runs']} runs, Clopper-Pearson: tp {c['tp']} fp {c['fp']} tn {c['tn']} fn {c['fn']}")
        if args.no_noise:
            print("BROKEN ON PURPOSE (--no-noise): the optimizer adds no noise, the accountant still "
                  "claims the epsilon of the noise multiplier below")
        print(f"DP-SGD on digits: noise multiplier {d['noise_multiplier']:g}, max grad norm "
              f"{d['max_grad_norm']:g}, {d['epochs']} epochs, {d['steps']} steps, sample rate "
              f"{d['sample_rate']:.4g}")
        print(f"claimed epsilon      {result.epsilon_claimed:.4f}  ({d['accountant']} accountant, "
              f"delta {result.delta:g})")
        print(f"epsilon lower bound  {result.epsilon_lower_bound:.4f}  ({result.confidence:.0%} "
              f"confidence; {how})")
        print("REFUTED: the lower bound exceeds the claimed epsilon" if result.flagged
              else "consistent: the lower bound does not exceed the claimed epsilon")
        print(_audit_counts_explained(result.method, c))
    return 1 if result.flagged else 0


def _audit_counts_explained(method: str, c) -> str:
    """What the counts of the audit line mean, in words."""
    if method == "one_run":
        return (f"counts: each of the {c['canaries']} canaries was put into training with "
                f"probability 1/2 ({c['included']} were); from the trained run alone the auditor "
                f"guessed in/out for the {c['guesses']} canaries it was surest about and got "
                f"{c['correct']} right. Many right guesses mean one record's presence shows, "
                "which only a large epsilon allows (Steinke, Nasr & Jagielski 2023); "
                "abstaining on the rest is allowed")
    return ("counts: over the runs, tp = canary trained on and guessed in, fn = trained on and "
            "guessed out, fp = not trained on and guessed in, tn = not trained on and guessed out; "
            "epsilon >= log((1 - delta - FPR) / FNR) and its mirror, with Clopper-Pearson bounds "
            "on the rates (Kairouz, Oh & Viswanath 2015, Thm 2.1)")


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="empirical privacy audit of DP-SGD on the digits task",
        description="Train a small MLP on sklearn's digits with DP-SGD and canaries, and print an "
        "empirical lower bound on epsilon (one run: Steinke, Nasr & Jagielski 2023; or --runs: "
        "many runs with Clopper-Pearson bounds) next to the accountant's epsilon. Exit status 1 "
        "when the lower bound exceeds the claimed epsilon.")
    p.add_argument("--noise-multiplier", type=float, default=1.0,
                   help="sigma: noise std as a multiple of the clipping norm (default 1.0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C (default 1.0)")
    p.add_argument("--canaries", type=int, default=1000,
                   help="canaries of the one-run audit (default 1000)")
    p.add_argument("--canary-kind", choices=("dirac", "mislabelled", "ood"), default="dirac",
                   help="gradient-space dirac canaries (default) or input-space canaries")
    p.add_argument("--observe", choices=("gradients", "model"), default="gradients",
                   help="dirac canaries: score from every step's noisy gradient (default) or "
                   "from the final model only")
    p.add_argument("--runs", type=int, default=None,
                   help="many-run audit with this many trainings (one canary) instead of one run")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="expected batch size (default 64)")
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (default 1.0)")
    p.add_argument("--delta", type=float, default=1e-5, help="delta of both epsilons (default 1e-5)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="probability that the lower bound holds (default 0.95)")
    p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                   help="accountant of the claimed epsilon (default rdp)")
    p.add_argument("--seed", type=int, default=0, help="seeds the whole audit (default 0)")
    p.add_argument("--no-noise", action="store_true",
                   help="audit a deliberately broken run: the optimizer adds no noise while the "
                   "accountant claims the noise multiplier's epsilon (shows what a refuted claim "
                   "looks like; exit status 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=_audit)


def _load_factory(spec: str):
    """``MODULE:FACTORY`` -> the factory function (MODULE a dotted module path or a .py file)."""
    import importlib
    import importlib.util
    import os

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"expected MODULE:FACTORY (e.g. mymodels.py:make or pkg.models:make); got {spec!r}")
    try:
        if path.endswith(".py") or os.sep in path:
            if not os.path.isfile(path):
                raise ValueError(f"no such file: {path}")
            mod_spec = importlib.util.spec_from_file_location(
                os.path.splitext(os.path.basename(path))[0], path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:  # a module path, also one in the current directory (as python -m finds it)
            import sys

            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(path)
    except ImportError as e:
        raise ValueError(f"cannot import {path}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{path} has no callable {name!r}")
    return factory


def _check_model(args: argparse.Namespace) -> int:
    from ppml_fast.audit import check_sensitivity

    spec = _load_factory(args.factory)()
    if not isinstance(spec, dict) or not {"model", "loss_fn", "batch"} <= set(spec):
        raise ValueError(f"{args.factory}() must return a dict with keys model, loss_fn, batch "
                         "(and optionally make_private, max_grad_norm, optimizer_class); got "
                         + (f"keys {sorted(spec)}" if isinstance(spec, dict) else type(spec).__name__))
    unknown = set(spec) - {"model", "loss_fn", "batch", "make_private", "max_grad_norm", "optimizer_class"}
    if unknown:
        raise ValueError(f"{args.factory}() returned unknown keys {sorted(unknown)}")
    kwargs = dict(spec.get("make_private") or {})
    c = args.max_grad_norm if args.max_grad_norm is not None else spec.get("max_grad_norm", 1.0)
    report = check_sensitivity(spec["model"], spec["loss_fn"], spec["batch"], max_grad_norm=c,
                               trials=args.trials, neighbours=args.neighbours,
                               optimizer_class=spec.get("optimizer_class"), **kwargs)
    print(report.to_json() if args.json else report)
    return 0 if report.ok else 1


def _add_check_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-model", help="measure one record's effect on a DP step of your model (sensitivity)",
        description="Import MODULE (a dotted module path or a .py file), call FACTORY(), which "
        "returns a dict with keys model, loss_fn and batch ((inputs, target); see "
        "ppml_fast.audit.check_sensitivity) and optionally make_private (a dict of "
        "PrivacyEngine.make_private keywords: grad_sample_mode, clipping, batch_first, "
        "loss_reduction, ...), max_grad_norm and optimizer_class (a DPOptimizer subclass); run "
        "one noise-free DP step on the batch and on crafted neighbouring batches and print the "
        "largest ||dtheta(B) - dtheta(B')|| in units of the bound (C, or 2C for replace). Exit "
        "status 0 when it is within the bound, 1 when it exceeds it or the engine refuses the model.")
    p.add_argument("factory", metavar="MODULE:FACTORY")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clipping norm C (default: the factory's max_grad_norm, else 1.0)")
    p.add_argument("--neighbours", choices=("remove", "replace"), default="remove",
                   help="add/remove one record (bound C, default) or replace one (bound 2C)")
    p.add_argument("--trials", type=int, default=8, help="neighbouring batches to try (default 8)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_check_model)


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_demo,
    _add_bench,
    _add_epsilon,
    _add_noise_multiplier,
    _add_audit,
    _add_check_model,
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
    except OverflowError as e:  # a number out of float range: an answer, not a traceback
        print(f"ppml-fast: a result is out of floating-point range ({e}); try less extreme "
              "arguments", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``privacy_utility.png``: test accuracy against epsilon for several noise levels (with the
non-private accuracy as a line; with ``--seeds N``, error bars of one standard deviation over
the seeds), and epsilon spent against rounds. Without privacy (``--mode none``) there is no
epsilon to draw: one panel of test accuracy per round. Needs matplotlib
(``pip install 'ppml_fast[demo]'``)."""

from __future__ import annotations

import os
import statistics

from .experiment import DemoResult, RunSummary

__all__ = ["plot_privacy_utility"]


def _mean_std(run: RunSummary) -> tuple[float, float]:
    accs = run.seed_accuracies or [run.final_accuracy]
    return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)


def plot_privacy_utility(result: DemoResult, directory: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the demo's plot needs matplotlib: pip install 'ppml_fast[demo]'") from e
    if result.main is result.baseline:  # no privacy: nothing spent, draw the accuracy curve
        fig, ax = plt.subplots(1, 1, figsize=(5.5, 4))
        _accuracy_per_round(ax, result.baseline)
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        _privacy_vs_utility(ax1, result)
        _epsilon_per_round(ax2, result)
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "privacy_utility.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy_per_round(ax, run: RunSummary) -> None:
    rows = [r for r in run.rounds if r.get("accuracy") is not None]
    ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], "o-", ms=3, label="no privacy")
    mean, std = _mean_std(run)
    if len(run.seed_accuracies) > 1:
        ax.errorbar([rows[-1]["round"]], [mean], yerr=[std], fmt="s", color="black", capsize=4,
                    label=f"final, mean +- sd over {len(run.seed_accuracies)} seeds")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("no privacy: test accuracy per round")
    ax.legend(fontsize=8)


def _privacy_vs_utility(ax, result: DemoResult) -> None:
    private = _distinct(result.sweep + [result.main])
    pts = sorted(((r.final_epsilon, *_mean_std(r), r) for r in private if r.final_epsilon is not None),
                 key=lambda p: p[0])
    if pts:
        seeds = max(len(p[3].seed_accuracies) for p in pts)
        bars = seeds > 1
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts] if bars else None,
                    fmt="o-", capsize=4, label="private runs" + (f" (mean +- sd, {seeds} seeds)" if bars else ""))
        for e, a, _, r in pts:
            tag = r.label + (" (main run)" if r.noise_multiplier == result.main.noise_multiplier else "")
            ax.annotate(tag, (e, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    base, base_sd = _mean_std(result.baseline)
    ax.axhline(base, color="gray", ls="--", label="non-private")
    if base_sd > 0:
        ax.axhspan(base - base_sd, base + base_sd, color="gray", alpha=0.15)
    unit = "per client, user-level" if result.config.mode == "dp-fedavg" else "per client, record-level"
    ax.set_xlabel(f"epsilon spent ({unit}; delta={result.delta:g})")
    ax.set_ylabel("final test accuracy")
    ax.set_title("privacy vs utility")
    ax.legend(fontsize=8)


def _epsilon_per_round(ax, result: DemoResult) -> None:
    main_sigma = result.main.noise_multiplier
    for r in sorted(_distinct(result.sweep + [result.main]), key=lambda r: r.noise_multiplier):
        xs = [row["round"] for row in r.rounds if row.get("epsilon") is not None]
        ys = [row["epsilon"] for row in r.rounds if row.get("epsilon") is not None]
        if xs:
            main = r.noise_multiplier == main_sigma
            ax.plot(xs, ys, lw=2.5 if main else 1.2, label=r.label + (" (main run)" if main else ""))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title("privacy budget over rounds")
    if ax.lines:
        ax.legend(fontsize=8)


def _distinct(runs):
    """One run per noise multiplier (the sweep's copy of the main run first: it carries the seeds)."""
    seen, out = set(), []
    for r in runs:
        if r.noise_multiplier not in seen:
            seen.add(r.noise_multiplier)
            out.append(r)
    return out

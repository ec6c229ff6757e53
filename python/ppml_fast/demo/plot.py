"""``privacy_utility.png``: test accuracy against epsilon for several noise levels (with the
non-private accuracy as a line), and epsilon spent against rounds. Needs matplotlib
(``pip install 'ppml_fast[demo]'``)."""

from __future__ import annotations

import os

from .experiment import DemoResult

__all__ = ["plot_privacy_utility"]


def plot_privacy_utility(result: DemoResult, directory: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the demo's plot needs matplotlib: pip install 'ppml_fast[demo]'") from e
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    private = [] if result.main is result.baseline else _distinct([result.main] + result.sweep)
    main_sigma = result.main.noise_multiplier
    pts = sorted((r.final_epsilon, r.final_accuracy, r.noise_multiplier) for r in private
                 if r.final_epsilon is not None)
    if pts:
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="private runs")
        for e, a, s in pts:
            tag = f"sigma={s:.3g}" + (" (main run)" if s == main_sigma else "")
            ax1.annotate(tag, (e, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax1.axhline(result.baseline.final_accuracy, color="gray", ls="--", label="non-private")
    ax1.set_xlabel(f"epsilon spent (delta={result.delta:g})")
    ax1.set_ylabel("final test accuracy")
    ax1.set_title("privacy vs utility")
    ax1.legend(fontsize=8)
    for r in sorted(private, key=lambda r: r.noise_multiplier):
        xs = [row["round"] for row in r.rounds if row.get("epsilon") is not None]
        ys = [row["epsilon"] for row in r.rounds if row.get("epsilon") is not None]
        if xs:
            main = r.noise_multiplier == main_sigma
            ax2.plot(xs, ys, lw=2.5 if main else 1.2,
                     label=f"sigma={r.noise_multiplier:.3g}" + (" (main run)" if main else ""))
    ax2.set_xlabel("round")
    ax2.set_ylabel("epsilon spent")
    ax2.set_title("privacy budget over rounds")
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "privacy_utility.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _distinct(runs):
    """One run per noise multiplier (the sweep repeats the main run's)."""
    seen, out = set(), []
    for r in runs:
        if r.noise_multiplier not in seen:
            seen.add(r.noise_multiplier)
            out.append(r)
    return out

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
    runs = sorted([result.main] + result.sweep if result.main is not result.baseline else [],
                  key=lambda r: r.final_epsilon if r.final_epsilon is not None else float("inf"))
    pts = [(r.final_epsilon, r.final_accuracy, r.label) for r in runs if r.final_epsilon is not None]
    if pts:
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="private runs")
        for e, a, lab in pts:
            ax1.annotate(lab, (e, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax1.set_xscale("log")
    ax1.axhline(result.baseline.final_accuracy, color="gray", ls="--", label="non-private")
    ax1.set_xlabel(f"epsilon (delta={result.delta:g})")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("privacy vs utility")
    ax1.legend(fontsize=8)
    for r in [result.main] + result.sweep:
        xs = [row["round"] for row in r.rounds if row.get("epsilon") is not None]
        ys = [row["epsilon"] for row in r.rounds if row.get("epsilon") is not None]
        if xs:
            ax2.plot(xs, ys, label=r.label)
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

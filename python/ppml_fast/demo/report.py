"""The demo's outputs: the per-round table, why rounds were skipped or clients left out, what
the epsilon protects (the privacy unit), the comparison line, ``report.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from typing import Any, Optional

from ppml_fast.federated.history import json_safe

from .experiment import DemoResult, RunSummary

__all__ = ["comparison_line", "format_table", "left_out_lines", "privacy_unit_line", "to_report",
           "write_report"]

#: what the epsilon of each mode protects, said on the console and in report.json
PRIVACY_UNIT = {
    "dp-fedavg": ("user-level: per client, for all of a client's data together (the server "
                  "clips and noises whole client updates)"),
    "local-dp": ("per client, record-level: each client's epsilon covers each of its examples, "
                 "towards everyone outside the device; the table shows the largest over clients"),
}

_REASONS = {"budget": "its epsilon would pass its cap (a client refuses such a fit before training)",
            "dropout": "simulated dropout", "timeout": "too late", "nonfinite": "NaN/Inf update",
            "shape": "wrongly shaped update"}


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(run: RunSummary, max_rows: int = 40) -> str:
    """Round, test accuracy, test loss, epsilon spent, clients that contributed, dropped."""
    rows = run.rounds
    if len(rows) > max_rows:  # keep the first, the last and evenly spaced ones between
        step = math.ceil(len(rows) / max_rows)
        rows = rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])
    lines = [f"{'round':>5}  {'accuracy':>8}  {'loss':>7}  {'epsilon':>8}  {'clients':>7}  {'dropped':>7}"]
    for r in rows:
        lines.append(
            f"{r['round']:>5}  {_fmt(r.get('accuracy'), '8.4f')}  {_fmt(r.get('loss'), '7.4f')}  "
            f"{_fmt(r.get('epsilon'), '8.3f')}  {len(r.get('clients') or []):>7}  "
            f"{len(r.get('dropped') or []):>7}" + ("  skipped" if r.get("skipped") else ""))
    return "\n".join(lines)


def privacy_unit_line(mode: str) -> Optional[str]:
    """What the epsilon means in ``mode`` (None without privacy)."""
    return None if mode not in PRIVACY_UNIT else f"epsilon is {PRIVACY_UNIT[mode]}"


def left_out_lines(run: RunSummary) -> list[str]:
    """Why rounds were skipped and clients left out, counted over the run (empty if none)."""
    reasons: dict[str, int] = {}
    for r in run.rounds:
        for d in r.get("dropped") or []:
            why = str(d.get("reason"))
            reasons[why] = reasons.get(why, 0) + 1
    lines = [f"left out {n} client fit(s): {_REASONS.get(why, why)}" for why, n in sorted(reasons.items())]
    skipped = [r for r in run.rounds if r.get("skipped")]
    if skipped:
        nums = [r["round"] for r in skipped]
        span = f"round {nums[0]}" if len(nums) == 1 else f"{len(nums)} rounds ({nums[0]}-{nums[-1]})"
        lines.append(f"skipped {span}, model unchanged: {skipped[0].get('skip_reason') or 'no results'}")
    if run.stopped and run.stopped != "rounds":  # "rounds": all rounds ran
        lines.append(f"stopped early: {run.stopped}")
    return lines


def comparison_line(result: DemoResult) -> str:
    m, b = result.main, result.baseline
    if m is b:
        return f"no privacy: test accuracy {m.final_accuracy:.4f} after {len(m.rounds)} rounds"
    eps = _fmt(m.final_epsilon, ".3g")
    return (f"private ({m.label}): test accuracy {m.final_accuracy:.4f} at epsilon {eps} "
            f"(delta {result.delta:g}) vs non-private {b.final_accuracy:.4f} "
            f"({m.final_accuracy - b.final_accuracy:+.4f})")


def to_report(result: DemoResult, *, seconds: float) -> dict[str, Any]:
    import torch

    from ppml_fast import __version__

    def run(r: RunSummary) -> dict[str, Any]:
        return dataclasses.asdict(r)

    cfg = dataclasses.asdict(result.config)
    return {
        "configuration": cfg,
        "seed": result.config.seed,
        # e.g. "reproducible noise: no privacy against anyone who knows the seed"
        "notes": sorted({n for r in (result.main, result.baseline, *result.sweep) for n in r.notes}),
        "delta": result.delta,
        "accountant": result.config.accountant,
        "privacy_unit": {"dp-fedavg": "user (client)", "local-dp": "example, per client",
                         "none": None}[result.config.mode],
        "privacy_unit_explained": PRIVACY_UNIT.get(result.config.mode),
        "local_dp_plan": result.local_dp_plan,
        "main": run(result.main),
        "baseline": run(result.baseline),
        "sweep": [run(s) for s in result.sweep],
        "seconds": round(seconds, 2),
        "versions": {"ppml_fast": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }


def write_report(report: dict[str, Any], directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "report.json")
    with open(path, "w") as f:
        json.dump(json_safe(report), f, indent=2, default=_json_default, allow_nan=False)
        f.write("\n")
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch values: non-finite ones become strings too
        return json_safe(o.tolist())
    return str(o)

"""Presents result rows: one aligned table, or a JSON document, headed by the machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from typing import Iterable, Optional

import torch

from ppml_fast._version import __version__

Row = dict[str, object]
COLUMNS = ("case", "implementation", "median ms", "IQR ms", "runs", "ratio", "target", "met?")
LEGEND = (
    "ratio: for a baseline, its time / ppml_fast's (the speedup of ppml_fast); for a [floor], "
    "ppml_fast's time / the floor's (1.00x = as fast as the bandwidth allows)."
)


def _cpu_model() -> str:
    """The CPU's model name with its family/model/stepping numbers and vector extensions (a
    hypervisor may shorten the name to e.g. "AMD EPYC": the numbers still tell Zen 3 (family 25,
    model 1) from Zen 4 (family 25, model 17), and AVX2 from AVX-512 machines)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = ("avx512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
           else "avx2" if "avx2" in flags else None)
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    extra = "; ".join(x for x in (", ".join(numbers), isa) if x)
    return f"{name} ({extra})" if extra else name


def _kernels_isa() -> Optional[str]:
    """The instruction set ppml_fast's CPU kernels use (PPML_FAST_CPU_ISA can lower it)."""
    try:
        from ppml_fast import _C

        return str(_C._cpu_isa())
    except (ImportError, AttributeError):
        return None


def cpu_busy(seconds: float = 0.25) -> Optional[float]:
    """Fraction of all cores busy over ``seconds`` while this process sleeps (Linux; else None).

    Other work on a 2-core machine delays each of torch's parallel regions by whole scheduler
    slices (~8 ms), which inflates the ratios; the CLI warns when this is high.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return round(1.0 - (idle1 - idle0) / total, 2) if total > 0 else None


def machine_info(**extra: object) -> dict[str, object]:
    """Where and when the numbers were measured (plus ``extra``, e.g. profile and sizes)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_kernels_isa": _kernels_isa(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ppml_fast": __version__,
        "python": platform.python_version(),
        **extra,
    }


def _cells(row: Row) -> tuple[str, ...]:
    r, met = row["ratio"], row["met"]
    failed = row["median_ms"] is None
    return (
        str(row["case"]),
        str(row["impl"]),
        (("not installed" if str(row.get("error") or "").startswith("not installed") else "failed")
         if failed else f"{row['median_ms']:.2f}"),
        "-" if failed else f"{row['iqr_ms']:.2f}",
        "-" if failed else str(row["runs"]),
        "-" if r is None else f"{r:.2f}x",
        row["target"] or "-",
        "-" if met is None else ("yes" if met else "NO"),
    )


def format_table(rows: Iterable[Row], meta: Optional[dict[str, object]] = None) -> str:
    """The rows as one aligned text table, with a header line from ``meta`` and the legend."""
    rows = list(rows)
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    numeric = {2, 3, 4, 5}

    def line(c: tuple[str, ...]) -> str:
        parts = [
            v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))
        ]
        return "  ".join(parts).rstrip()

    out = []
    if meta:
        out.append(" | ".join(f"{k}: {v}" for k, v in meta.items()))
    out.append(line(cells[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(c) for c in cells[1:])
    out.append(LEGEND)
    out.extend(("" if str(r["error"]).startswith("not installed") else "failed: ")
               + f"{r['impl']} at {r['case']}: {r['error']}" for r in rows if r.get("error"))
    return "\n".join(out)


def to_json(rows: list[Row], meta: dict[str, object]) -> str:
    return json.dumps({"meta": meta, "results": rows}, indent=2)

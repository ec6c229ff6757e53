"""Benchmarks of ppml_fast against its baselines, measured in the same run.

A benchmark is data: a :class:`Case` allocates its inputs once and lists :class:`Impl` s (the
ppml_fast call and the baselines it is compared with, each with an optional :class:`Target`).
The same case table drives ``ppml-fast bench`` (:func:`run_cases`) and ``bench/bench_ops.py``
(pytest-benchmark), so both report the same ratios.

- :mod:`.cases`  — the data model (Case, Impl, Target)
- :mod:`.ops`    — the cases of the native ops (clip, noise, aggregate)
- :mod:`.accounting` — the accountants' cases (RDP, PLD, calibration) against dp-accounting, Opacus
- :mod:`.dp_step` — one DP-SGD step (M1 MLP, M2 CNN, M3 transformer) against non-private and Opacus
- :mod:`.flower` — Flower's ``aggregate()`` algorithm, the numpy baseline
- :mod:`.federated` — one federated round (vectorized, sequential, plain torch, Flower 1.42)
- :mod:`.flower_sim` — Flower 1.42's own Ray simulation, the federated baseline
- :mod:`.secagg` — secure aggregation (masking, SecAgg and SecAgg+ rounds) against plain aggregation
- :mod:`.timing` — warm-ups, then median and IQR of ``time.perf_counter`` runs
- :mod:`.device` — "cpu" or "cuda" (``--device``, ``$PPML_BENCH_DEVICE``); CUDA calls synchronise
- :mod:`.run`    — runs cases, turns timings into result rows with ratios and targets
- :mod:`.report` — the aligned table, the JSON document and the machine line
"""

from ppml_fast.benchmarks.accounting import accounting_cases
from ppml_fast.benchmarks.cases import Case, Impl, Target
from ppml_fast.benchmarks.dp_step import dp_step_cases
from ppml_fast.benchmarks.ops import SIZES, op_cases
from ppml_fast.benchmarks.report import format_table, machine_info, to_json
from ppml_fast.benchmarks.run import case_rows, run_cases
from ppml_fast.benchmarks.timing import PROFILES, Profile, Timing, time_interleaved

__all__ = [
    "PROFILES",
    "SIZES",
    "Case",
    "Impl",
    "Profile",
    "Target",
    "Timing",
    "accounting_cases",
    "dp_step_cases",
    "case_rows",
    "format_table",
    "machine_info",
    "op_cases",
    "run_cases",
    "time_interleaved",
    "to_json",
]

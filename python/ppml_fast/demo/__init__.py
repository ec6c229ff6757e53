"""``ppml-fast demo``: federated training over simulated clients on the embedded digits data,
with DP-FedAvg or local DP-SGD, a per-round table of accuracy and epsilon, ``report.json``
and ``privacy_utility.png``."""

from .config import MODES, DemoConfig
from .experiment import DemoResult, mlp, run_experiment
from .report import comparison_line, format_table, to_report, write_report

__all__ = ["MODES", "DemoConfig", "DemoResult", "comparison_line", "format_table", "mlp",
           "run_experiment", "to_report", "write_report"]

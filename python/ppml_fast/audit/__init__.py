"""Empirical privacy auditing: lower bounds on epsilon, to set next to the accountant's claim.

- :func:`audit_dp_sgd` / :func:`audit_digits` — insert canaries (gradient-space "dirac" or
  input-space), train with the PrivacyEngine configuration, score membership, and bound epsilon
  from one run (Steinke, Nasr & Jagielski 2023) or many runs (Clopper–Pearson);
- :func:`audit_mechanism` / :func:`audit_gaussian_mechanism` — many trials of a raw noise
  mechanism on neighbouring inputs, against its analytic epsilon;
- the statistics alone: :func:`epsilon_lower_bound` (counts), :func:`distinguishing_test`
  (scores of many trials), :func:`one_run_audit` and :func:`one_run_epsilon_lower_bound`;
- :func:`check_sensitivity` — one record's effect on a DP step of the user's own model under the
  real engine, on crafted neighbouring batches, against the bound C (2C for replace-one) that the
  accountant assumes (:class:`SensitivityReport`; ``ppml-fast check-model`` from the shell).

A lower bound above the claimed epsilon (``AuditResult.flagged``) refutes the claim at the
stated confidence. A bound below it proves nothing about the claim's tightness: audits, one-run
audits especially, are loose.
"""

from ppml_fast.audit.bounds import (
    clopper_pearson_interval,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
)
from ppml_fast.audit.canaries import DiracCanaries, DiracCanaryMixin, input_canaries
from ppml_fast.audit.digits import audit_digits, digits_mlp
from ppml_fast.audit.distinguish import DistinguishingTest, distinguishing_test
from ppml_fast.audit.dp_sgd import DPSGDConfig, audit_dp_sgd
from ppml_fast.audit.mechanism import audit_gaussian_mechanism, audit_mechanism, gaussian_epsilon
from ppml_fast.audit.one_run import OneRunTest, one_run_audit, one_run_epsilon_lower_bound, one_run_p_value
from ppml_fast.audit.result import AuditResult
from ppml_fast.audit.sensitivity import check_sensitivity
from ppml_fast.audit.sensitivity_report import SensitivityReport

__all__ = [
    "AuditResult",
    "DPSGDConfig",
    "DiracCanaries",
    "DiracCanaryMixin",
    "DistinguishingTest",
    "OneRunTest",
    "SensitivityReport",
    "audit_digits",
    "audit_dp_sgd",
    "audit_gaussian_mechanism",
    "audit_mechanism",
    "check_sensitivity",
    "clopper_pearson_interval",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "digits_mlp",
    "distinguishing_test",
    "epsilon_from_rates",
    "epsilon_lower_bound",
    "gaussian_epsilon",
    "input_canaries",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]

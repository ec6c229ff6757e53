"""Shared test settings: a deterministic hypothesis profile, a thread-count guard, one local Ray
for the session, and no skipped imports in CI.

Hypothesis runs derandomized and without an example database, so every run draws the same
examples (the suite is deterministic); `deadline=None` because the first call of an op can
include one-off costs (thread pool start, dispatch caches).

In CI (``CI=true``, as ``.ci/run`` sets it) a test that would be skipped by
``pytest.importorskip`` fails instead, and the session stops at once when a package of the
``test`` extra is not installed: the Opacus, Flower, Ray and Hugging Face integration tests must
run there, not skip. Locally, without the extra, they still skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ppml",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ppml")


@pytest.fixture
def restore_threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------- no skipped imports in CI

#: modules that tests import with pytest.importorskip: each is in the `test` extra (or a
#: dependency of ppml_fast), so CI has them all
CI_REQUIRED = ("opacus", "flwr", "ray", "transformers", "peft", "dp_accounting", "mpmath",
               "sklearn", "matplotlib")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_sessionstart(session):
    if not in_ci():
        return
    missing = [m for m in CI_REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        pytest.exit(f"CI=true and the test extra is incomplete: {', '.join(missing)} not installed "
                    "(pip install '.[test]'); these tests must run in CI, not skip", returncode=1)


def _import_skip_reason(longrepr) -> str | None:
    """The reason of a skip that pytest.importorskip raised, else None. A skip report's longrepr
    is (path, lineno, "Skipped: <reason>"); importorskip's reason starts "could not import"."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2]).removeprefix("Skipped: ")
        if reason.startswith("could not import"):
            return reason
    return None


def _fail_import_skip(report) -> None:
    reason = _import_skip_reason(report.longrepr) if report.skipped else None
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = (f"CI=true: {reason}\nThis test needs a package of the `test` extra; "
                           "in CI it must run, not skip (pip install '.[test]').")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level importorskip: in CI the module's collection fails."""
    outcome = yield
    if in_ci():
        _fail_import_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """An importorskip inside a test or fixture: in CI the test fails."""
    outcome = yield
    if in_ci():
        _fail_import_skip(outcome.get_result())


# ---------------------------------------------------------------------- Ray


_RAY_STARTED_HERE = []  # [ray] once ray_cluster started a local Ray (shut down after its last user)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs, no dashboard, no usage report): its start-up
    costs ~10-15 s on 2 cores, so tests share it. It is shut down right after the last collected
    test that uses it (pytest_runtest_teardown below: its idle processes would otherwise hold
    memory and CPU through the rest of the suite), at the latest when the session ends. Left
    running if the caller had started Ray."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 * 1024 ** 2)
        _RAY_STARTED_HERE.append(ray)
    yield ray
    _shutdown_ray()


def _shutdown_ray() -> None:
    while _RAY_STARTED_HERE:
        _RAY_STARTED_HERE.pop().shutdown()


def _uses_ray(item) -> bool:
    return item is not None and "ray_cluster" in getattr(item, "fixturenames", ())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if _RAY_STARTED_HERE and _uses_ray(item):
        rest = item.session.items[item.session.items.index(item) + 1:]
        if not any(_uses_ray(i) for i in rest):
            _shutdown_ray()

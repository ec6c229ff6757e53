"""pytest plumbing for the benchmarks in bench/ (not part of the test run: testpaths = tests).

- collects ``bench_*.py`` so that ``pytest bench`` works as well as ``pytest bench/bench_ops.py``;
- ``--ppml-sizes`` (full | tiny) and ``--ppml-profile`` (full | quick) choose the problem sizes
  and the warm-ups/rounds of the shared case table (:mod:`ppml_fast.benchmarks`);
- keeps one case's inputs alive at a time (the big cases allocate 1 GB);
- records each benchmark's median and, at the end of the session, prints the table of ratios
  against the baselines measured in this same run.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from ppml_fast.benchmarks import PROFILES, SIZES, Case, Timing, case_rows
from ppml_fast.benchmarks.report import cpu_busy, format_table, machine_info
from ppml_fast.benchmarks.run import selected

_timings: dict[str, tuple[Case, dict[str, Timing]]] = {}
_busy_before: list[float | None] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ppml_fast benchmarks")
    group.addoption("--ppml-sizes", choices=tuple(SIZES), default="full",
                    help="problem sizes of the cases (default: full, those of the targets)")
    group.addoption("--ppml-profile", choices=tuple(PROFILES), default="full",
                    help="warm-up and timed rounds per benchmark (default: full)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrizes a test that takes ``case`` and ``impl`` over the (case, impl) pairs of its
    module's ``CASES(sizes)`` table that the chosen profile times."""
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    profile = PROFILES[config.getoption("ppml_profile")]
    pairs = [
        pytest.param(case, impl, id=f"{case.key}-{impl.key}")
        for case in metafunc.module.CASES(config.getoption("ppml_sizes"))
        for impl in case.impls
        if selected(impl, profile)
    ]
    metafunc.parametrize(("case", "impl"), pairs)


def pytest_sessionstart(session: pytest.Session) -> None:
    _busy_before.append(cpu_busy())


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)  # given by name: pytest collects it already
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


class _Inputs:
    """The inputs of the case being benchmarked; switching case frees the previous one first."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: dict | None = None

    def get(self, case: Case) -> dict:
        if self.key != case.key:
            self.clear()
            self.value = case.setup()
            self.key = case.key
        assert self.value is not None
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None
        gc.collect()


@pytest.fixture(scope="session")
def case_inputs():
    inputs = _Inputs()
    yield inputs
    inputs.clear()


@pytest.fixture(scope="session")
def profile(pytestconfig: pytest.Config):
    return PROFILES[pytestconfig.getoption("ppml_profile")]


@pytest.fixture
def record_timing():
    """record_timing(case, impl_key, timing): keep a median for the final table."""

    def record(case: Case, impl_key: str, timing: Timing) -> None:
        _timings.setdefault(case.key, (case, {}))[1][impl_key] = timing

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if not _timings:
        return
    rows = [row for case, timings in _timings.values() for row in case_rows(case, timings)]
    meta = machine_info(
        profile=config.getoption("ppml_profile"),
        sizes=config.getoption("ppml_sizes"),
        cpu_busy_before=_busy_before[0] if _busy_before else None,
    )
    terminalreporter.section("ppml_fast: ratios against baselines measured in this run")
    for line in format_table(rows, meta).splitlines():
        terminalreporter.write_line(line)

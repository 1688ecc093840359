"""One table for `make bench` (bench/report.py says what it shows and how rows get there).

A benchmark adds rows through the ``table`` fixture; one that only fills
``benchmark.extra_info`` is shown from that (``report.legacy_rows``). The table is printed at
the end of the run, with its legend, written to bench/results/table.txt and added to the JSON
file as ``svidd_table``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.report import LEGEND, Row, Table, legacy_rows, render, scale, with_section

RESULTS_DIR = Path(__file__).parent / "results"
_ROWS = pytest.StashKey[dict[str, list[Row]]]()
_FAILED = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    # `make bench` writes bench/results/latest.json and table.txt; the folder is not committed.
    RESULTS_DIR.mkdir(exist_ok=True)
    config.stash[_ROWS] = {}
    config.stash[_FAILED] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    # A test that fails must not vanish from the table, with or without its rows.
    report = yield
    if report.failed and item.config.stash.get(_FAILED, None) is not None:
        item.config.stash[_FAILED].append(item.nodeid)
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # pytest-benchmark's own table times whatever each test handed to `benchmark.pedantic`
    # (often a no-op standing in for a measurement made in rounds): next to ours it would be a
    # second, misleading table. Its statistics stay in the JSON file.
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None and not os.environ.get("SVIDD_BENCH_PYTEST_BENCHMARK_TABLE"):
        bench_session.display = lambda terminalreporter: None


@pytest.fixture
def table(request: pytest.FixtureRequest, benchmark: Any) -> Iterator[Table]:
    """Rows for the table. Asking for it also asks for ``benchmark``, so ``--benchmark-only``
    runs the test; a test that never calls the benchmark fixture gets a no-op call for it."""
    rows = Table()
    yield rows
    section = request.node.nodeid.split("::", maxsplit=1)[0]
    request.config.stash[_ROWS][request.node.nodeid] = with_section(rows.rows, section)
    if getattr(benchmark, "_mode", "used") is None:
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _rows(config: pytest.Config) -> list[Row]:
    stored = config.stash.get(_ROWS, {})
    registered = dict(stored)  # popped as benchmarks claim their rows
    out: list[Row] = []
    session = getattr(config, "_benchmarksession", None)
    for bench in list(getattr(session, "benchmarks", []) or []):
        nodeid = str(getattr(bench, "fullname", ""))
        if nodeid in registered:
            out.extend(registered.pop(nodeid))
            continue
        info = dict(getattr(bench, "extra_info", {}) or {})
        section = nodeid.split("::", maxsplit=1)[0]
        name = str(getattr(bench, "name", nodeid))
        out.extend(with_section((r for r in legacy_rows(info)), f"{section} ({name})"))
    for rows in registered.values():  # tests whose benchmark call failed still show their rows
        out.extend(rows)
    failed = config.stash.get(_FAILED, [])
    for nodeid in dict.fromkeys(failed):
        section, _, name = nodeid.partition("::")
        what = f"{name} failed" + ("" if stored.get(nodeid) else " before adding its rows")
        out.append(Row(what, math.nan, "", section=section, failed=True))
    return out


def _lines(config: pytest.Config) -> list[str]:
    head = f"cpus: {os.cpu_count()}   SVIDD_BENCH_SCALE: {scale():g}"
    return [head, "", *render(_rows(config)), "", LEGEND]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not _rows(config):
        return
    lines = _lines(config)
    terminalreporter.section("svidd benchmark table (every ratio measured in this run)")
    for line in lines:
        terminalreporter.write_line(line)
    (RESULTS_DIR / "table.txt").write_text("\n".join(lines) + "\n")


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]
) -> None:
    output_json["svidd_table"] = [r.as_json() for r in _rows(config)]

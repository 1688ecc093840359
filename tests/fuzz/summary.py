"""The fuzz targets' example counts in the terminal summary, as a plugin of the whole suite.

Each target's run records (examples, rounds, seconds) on its test report (conftest.py). The
reports, not this process's memory, carry them here: with ``make test``'s pytest-xdist workers
the targets run in other processes, and only their reports reach the process that prints.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fuzz._profile import LONG

PROPERTY = "fuzz_examples"  # (examples, rounds, seconds) in a fuzz target's report

# nodeid -> (examples, rounds, seconds)
_COUNTS: dict[str, tuple[int, int, float]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == PROPERTY and isinstance(value, list | tuple):
            examples, rounds, seconds = value  # a list once it crossed from an xdist worker
            _COUNTS[report.nodeid] = (int(examples), int(rounds), float(seconds))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _COUNTS:
        return
    total = sum(n for n, _, _ in _COUNTS.values())
    seconds = sum(s for _, _, s in _COUNTS.values())
    if not LONG:
        terminalreporter.write_line(
            f"fuzz smoke: {len(_COUNTS)} targets, {total} examples in {seconds:.1f} s "
            "(make fuzz FUZZ_SECONDS=N for a long run)"
        )
        return
    terminalreporter.section("fuzz: examples per target")
    for nodeid, (examples, rounds, secs) in sorted(_COUNTS.items()):
        terminalreporter.write_line(
            f"{examples:>9} examples {rounds:>5} rounds {secs:>7.1f} s  {nodeid}"
        )
    terminalreporter.write_line(f"{total:>9} examples in all, {seconds:.0f} s")

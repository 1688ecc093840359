"""Time-budgeted fuzzing for the targets in this folder, and a count of the examples each ran.

Without ``FUZZ_SECONDS`` every target runs once with the smoke profile (see _profile.py). With
``FUZZ_SECONDS=N`` each target is called again and again, each round with a fresh random seed,
until N seconds have passed; the terminal summary lists how many examples each target ran.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Generator
from typing import Any

import pytest

from tests.fuzz._profile import FUZZ_SECONDS, LONG

# nodeid -> (examples, rounds, seconds)
_COUNTS: dict[str, tuple[int, int, float]] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if LONG:
        for item in items:
            if "tests/fuzz/" in item.nodeid:
                item.add_marker(pytest.mark.timeout(int(FUZZ_SECONDS * 2) + 300))


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    handle = getattr(pyfuncitem.obj, "hypothesis", None)
    if handle is None:
        return (yield)
    inner = handle.inner_test
    examples = 0

    @functools.wraps(inner)
    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal examples
        examples += 1
        return inner(*args, **kwargs)

    handle.inner_test = counting
    started = time.monotonic()
    rounds = 1
    try:
        if LONG:
            # Extra rounds before the default call: each draws a new seed. A failure raises here
            # and is reported like any test failure.
            args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
            while time.monotonic() - started < FUZZ_SECONDS:
                pyfuncitem.obj(**args)
                rounds += 1
        return (yield)  # the ordinary call: the last round
    finally:
        handle.inner_test = inner
        _COUNTS[pyfuncitem.nodeid] = (examples, rounds, time.monotonic() - started)


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

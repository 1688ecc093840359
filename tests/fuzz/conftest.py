"""Time-budgeted fuzzing for the targets in this folder, and a count of the examples each ran.

Without ``FUZZ_SECONDS`` every target runs once with the smoke profile (see _profile.py). With
``FUZZ_SECONDS=N`` each target is called again and again, each round with a fresh random seed,
until N seconds have passed; the terminal summary lists how many examples each target ran
(summary.py, from what each target's report carries).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Generator
from typing import Any

import pytest

from tests.fuzz._profile import FUZZ_SECONDS, LONG
from tests.fuzz.summary import PROPERTY


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
        pyfuncitem.user_properties.append(
            (PROPERTY, (examples, rounds, time.monotonic() - started))
        )

"""Hypothesis settings of the fuzz targets: a short derandomized smoke run, or a long fuzz run.

``FUZZ_SECONDS`` unset (``make test``): the ``fuzz-smoke`` profile, a fixed small number of
examples per target from a fixed seed, so the smoke run is quick and repeatable. ``FUZZ_SECONDS=N``
(``make fuzz``): the ``fuzz-long`` profile, random seeds and the example database; conftest.py then
repeats each target with fresh seeds until it has run for N seconds.

The profiles are registered here and used as the parent of each target's own settings, never
loaded globally: the rest of the suite keeps its own hypothesis defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

F = TypeVar("F", bound=Callable[..., Any])

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS") or 0)
LONG = FUZZ_SECONDS > 0

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "fuzz-smoke",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=_QUIET,
    print_blob=True,
)
settings.register_profile(
    "fuzz-long",
    # One round; the conftest loop runs rounds until the time budget is spent.
    max_examples=500,
    derandomize=False,
    # A generous per-example limit: a parser that takes seconds on one input is a finding.
    deadline=5000,
    suppress_health_check=_QUIET,
    print_blob=True,
)
PROFILE = settings.get_profile("fuzz-long" if LONG else "fuzz-smoke")


def fuzz_settings(scale: float = 1.0) -> Callable[[F], F]:
    """The profile's settings for one target; ``scale`` shrinks the example count of slow ones."""
    return settings(PROFILE, max_examples=max(10, int(PROFILE.max_examples * scale)))

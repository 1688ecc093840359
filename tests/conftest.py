from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests import postgres

# Loaded in every process of a run, the one that prints the summary included (pytest-xdist).
pytest_plugins = ["tests.fuzz.summary"]

# No per-example time limit (hypothesis's default is 200 ms): a property test says what holds,
# and a loaded machine made an example of an X.509 path comparison take 257 ms. Speed is the
# benches' to judge (bench/). The fuzz targets set their own profiles (tests/fuzz/_profile.py).
settings.register_profile("svidd", deadline=None)
settings.load_profile("svidd")

# The logger trees the server's and the agent's `logs.configure` route to a stream of their own.
CONFIGURED_LOGGERS = ("svid", "agent_attestor")


def pytest_configure(config: pytest.Config) -> None:
    # The daemons and CLIs the tests start (`python -m server.cli`, from a temporary directory
    # as often as not) must import this checkout's code, not that of whichever checkout the
    # virtualenv was installed from: a run from a git worktree tests the worktree.
    checkout = str(Path(__file__).resolve().parents[1])
    others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != checkout]
    os.environ["PYTHONPATH"] = os.pathsep.join([checkout, *others])


class _ClosedLoopPollerNoise(logging.Filter):
    """grpc.aio's completion-queue poller is one per process, bound to the event loop it began
    on: once a test's asyncio.run() has closed that loop, its late events reach asyncio's
    logger as "Exception in callback PollerCompletionQueue._handle_events" with "Event loop is
    closed", in whichever later test is running, and broke tests reading their own log lines.
    A daemon or a program has one loop for its life, so this is the suite's many loops alone:
    dropped, and nothing else of asyncio's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Exception in callback PollerCompletionQueue"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")


logging.getLogger("asyncio").addFilter(_ClosedLoopPollerNoise())


@pytest.fixture(autouse=True)
def _loggers_as_they_were() -> Iterator[None]:
    """A test that runs a CLI or app in-process configures its logger tree with a handler on
    the sys.stderr of that moment: pytest's capture of that one test, closed when it ends. Put
    the trees back, or a later test's log lines (and those of threads still running) go to a
    closed stream."""
    saved = []
    for name in CONFIGURED_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.level, logger.propagate))
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A DSN on a real PostgreSQL whose search_path is a fresh schema of this test's own
    (tests/postgres.py); skips, or fails under SVIDD_REQUIRE_POSTGRES=1, when there is none."""
    with postgres.fresh_schema(postgres.require_server()) as dsn:
        yield dsn

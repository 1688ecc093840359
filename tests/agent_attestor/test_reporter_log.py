"""What the agent's log says while validation reports cannot reach the server: the reporter
tries again at every flush, and a server away for an hour is 7,200 of them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from agent_attestor.tasks.reporter import FAILURE_LOG_INTERVAL, FLUSH_INTERVAL, ValidationReporter
from svid._clock import FakeClock
from svid._proto import task_pb2
from tests.log_lines import LogLines, log_lines
from tests.rpc_errors import rpc_error

MESSAGE = "cannot report validations to the server"


async def _unreachable(request: task_pb2.ReportValidationsRequest) -> object:
    raise rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")


@pytest.fixture
def said() -> Iterator[LogLines]:
    with log_lines("agent_attestor.tasks.reporter", MESSAGE) as lines:
        yield lines


def test_reports_held_back_are_said_once_an_interval_not_at_every_flush(said: LogLines) -> None:
    """Fails on main: each flush (every 0.5 s) wrote the warning for as long as the server was
    away, after any local process had one token validated."""
    clock = FakeClock()
    reporter = ValidationReporter(_unreachable, clock)
    reporter.report(subject="spiffe://example.org/w", audience=["a"], ok=False, reason="bad")
    flushes = int(FAILURE_LOG_INTERVAL / FLUSH_INTERVAL)

    async def server_away() -> None:
        for _ in range(flushes):
            await reporter.flush()
            clock.advance(FLUSH_INTERVAL)
        await reporter.flush()

    asyncio.run(server_away())
    assert [(getattr(r, "times", None), getattr(r, "pending", None)) for r in said.records] == [
        (1, 1),
        (flushes, 1),
    ]
    assert reporter.pending == 1  # kept for the server's return

"""An agent whose server is away retries every reconnect_max seconds at most, for as long as it
is away: its log says so at the first failure, then once per interval with how many failed
since, not at every attempt (an hour's outage was ~700 lines of it, each the same)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_attestor import sync
from agent_attestor.errors import AttestationError
from agent_attestor.node_client import NodeClient
from agent_attestor.sync import OPERATOR_LOG_INTERVAL
from svid._clock import FakeClock
from tests.e2e.agent_process import new_token
from tests.e2e.attestation_retries import EACH_TIME, in_process_syncer, running, until
from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.e2e


def _failures(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many attempts of the agent's have failed so far: it waits one backoff after each."""
    failures = 0
    real_backoff = sync.reconnect_delay

    def counted(*args: Any, **kwargs: Any) -> float:
        nonlocal failures
        failures += 1
        return real_backoff(*args, **kwargs)

    monkeypatch.setattr(sync, "reconnect_delay", counted)
    return lambda: failures


def test_a_server_away_is_said_at_once_then_once_an_interval(
    server_process: ServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fails on main: each failed attempt wrote its own line."""
    clock = FakeClock()
    syncer = in_process_syncer(
        server_process, tmp_path, clock, join_token=new_token(server_process)
    )
    server_process.stop()  # its ports now refuse every connection
    failures = _failures(monkeypatch)

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if EACH_TIME in r.getMessage()]

    async def scenario() -> None:
        async with running(syncer):
            await until(lambda: failures() >= 6, "six failed attempts")
            assert [getattr(r, "times", None) for r in said()] == [1]
            clock.advance(OPERATOR_LOG_INTERVAL)
            await until(lambda: len(said()) == 2, "the reminder")

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    assert getattr(said()[-1], "times", 0) >= 5  # each failure since the first, counted


def test_another_kind_of_failure_is_said_at_once(
    server_process: ServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fails on main: one throttle for every failure, so the next kind (the server back but the
    agent's attestation failing, after its ports refused) went unsaid for up to 5 minutes."""
    clock = FakeClock()
    syncer = in_process_syncer(
        server_process, tmp_path, clock, join_token=new_token(server_process)
    )
    server_process.stop()
    failures = _failures(monkeypatch)

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if EACH_TIME in r.getMessage()]

    async def scenario() -> None:
        async with running(syncer):
            await until(lambda: failures() >= 2, "two failed attempts")

            async def fails(client: object, **kwargs: object) -> object:
                raise AttestationError("the server's answer holds no agent SVID")

            monkeypatch.setattr(NodeClient, "attest", fails)
            seen = failures()
            await until(lambda: failures() >= seen + 2, "two more failed attempts")

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    errors = [getattr(r, "error", "") for r in said()]
    assert len(errors) == 2, errors
    assert errors[1] == "the server's answer holds no agent SVID"

"""A join token that cannot attest the agent (never issued, expired, or spent already) leaves it
retrying every few seconds until the operator gives a new one: the log says so once, naming
what is wrong and what to do, then once per interval with how many attempts failed since, and
never shows the token."""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

import pytest

from svid._clock import FakeClock
from tests.e2e.agent_process import FAST_RETRIES, RETRY_ROUNDS, agent_stack
from tests.e2e.attestation_retries import Attempts, in_process_syncer, reminded
from tests.e2e.conftest import ServerProcess, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e
# What the agent's one line about it says, in part.
REFUSED = "the join token cannot attest this agent"


def _unknown_token() -> str:
    return f"never-issued.{secrets.token_urlsafe(32)}"


def _refused_attestations(server: ServerProcess) -> int:
    """The attestations the server refused, as its audit log has them."""
    out = server.cli(
        "audit", "export", "--data-dir", str(server.data_dir), "--kind", "node_attestation"
    ).stdout
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    return sum(1 for e in events if e["decision"] == "deny")


def _after_more_refusals(server: ServerProcess, more: int) -> None:
    """Wait until the agent has been refused `more` times past now: retries it made, not time."""
    target = _refused_attestations(server) + more
    wait_for(lambda: _refused_attestations(server) >= target, 30, f"{more} more refusals")


def _assert_said_once_and_never_the_token(logs: str, token: str) -> None:
    assert logs.count(REFUSED) == 1, logs[-4000:]
    assert "svid-server token generate" in logs
    assert "--join-token-file" in logs
    assert token not in logs
    assert token.partition(".")[2] not in logs  # nor its secret alone


@pytest.fixture
def server(server_process: ServerProcess) -> ServerProcess:
    return server_process


def test_a_token_the_server_refuses_is_said_once_over_many_retries(
    server: ServerProcess,
) -> None:
    root = short_tmpdir()
    with agent_stack(root, server, start=False, flags=FAST_RETRIES) as agent:
        agent.join_token = _unknown_token()
        agent.start()
        wait_for(lambda: REFUSED in agent.logs(), 20, "the refused token said")
        _after_more_refusals(server, 3)
        _assert_said_once_and_never_the_token(agent.logs(), agent.join_token)


def test_an_evicted_agent_whose_token_is_spent_says_so_once(server: ServerProcess) -> None:
    root = short_tmpdir()
    with agent_stack(root, server, flags=FAST_RETRIES) as agent:
        server.cli("agent", "evict", "--spiffe-id", agent.agent_id())
        wait_for(lambda: "evicted or banned" in agent.logs(), 20, "the eviction said")
        wait_for(lambda: REFUSED in agent.logs(), 20, "the spent token said")
        # The agent knows its token spent and asks the server nothing: its retries are its own
        # (that they are throttled, not silent, is the in-process test's below).
        time.sleep(RETRY_ROUNDS)
        _assert_said_once_and_never_the_token(agent.logs(), agent.join_token)


def test_the_refused_token_is_said_again_after_the_interval_with_the_attempts_since(
    server: ServerProcess,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock(start=time.time())
    token = _unknown_token()
    syncer = in_process_syncer(server, tmp_path, clock, join_token=token)
    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        first, reminder = reminded(syncer, clock, Attempts(monkeypatch), caplog, REFUSED)
    assert first.levelno == reminder.levelno == logging.ERROR
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(str(v) for v in record.__dict__.values())
        assert token.partition(".")[2] not in text

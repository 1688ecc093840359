"""An x509pop agent the server refuses to attest (its certificate from a CA the server does not
trust, or the agent banned) retries every few seconds until the operator mends it: the log says
so once, as the join-token refusal does, naming what the server said and what to do, then once
per interval with how many attempts failed since. An attestation answered RESOURCE_EXHAUSTED (the
server's attestation budget for the host, spent) is a passing condition, said as such, throttled
too, and never counted as a refused token."""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from pathlib import Path

import pytest

from svid._clock import FakeClock
from tests.e2e.agent_process import FAST_RETRIES, RETRY_ROUNDS, AgentProcess, agent_ids
from tests.e2e.attestation_retries import EACH_TIME, Attempts, in_process_syncer, reminded
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.node_pki import node_pki

pytestmark = pytest.mark.e2e
# What the agent's one line about each says, in part.
REFUSED = "the server refuses this agent's x509pop certificate"
TOKEN_REFUSED = "the join token cannot attest this agent"
LIMITED = "the server's attestation budget for this host is spent"
NOT_ACCEPTED = "the server does not accept this agent's attestation"


def _x509pop_agent(root: Path, server: ServerProcess, cert: Path, key: Path) -> AgentProcess:
    return AgentProcess(root, server, flags=FAST_RETRIES).start(
        "--x509pop-cert", str(cert), "--x509pop-key", str(key)
    )


def _assert_said_once(logs: str, server_said: str) -> None:
    assert logs.count(REFUSED) == 1, logs[-4000:]
    assert server_said in logs  # what the server said, kept
    assert "x509pop_cert" in logs  # what to do
    assert "x509pop_ca_bundle" in logs
    assert EACH_TIME not in logs


def test_a_certificate_from_a_ca_the_server_does_not_trust_is_said_once() -> None:
    root = short_tmpdir()
    trusted_ca, _, _ = node_pki(_dir(root / "trusted"))
    _, cert, key = node_pki(_dir(root / "other"))
    server = make_server(root, x509pop_ca_bundle=str(trusted_ca)).start()
    agent: AgentProcess | None = None
    try:
        agent = _x509pop_agent(root, server, cert, key)
        wait_for(lambda: REFUSED in agent.logs(), 20, "the refused certificate said")
        time.sleep(RETRY_ROUNDS)  # several more attempts, each refused
        _assert_said_once(agent.logs(), "does not chain to a trusted CA")
    finally:
        _stop(root, server, agent)


def test_a_banned_x509pop_agent_says_so_once() -> None:
    root = short_tmpdir()
    ca, cert, key = node_pki(root)
    server = make_server(root, x509pop_ca_bundle=str(ca)).start()
    agent: AgentProcess | None = None
    try:
        agent = _x509pop_agent(root, server, cert, key)
        agent_id = str(wait_for(lambda: _x509pop_agent_id(server), 30, "x509pop attestation"))
        server.cli("agent", "ban", "--spiffe-id", agent_id)
        wait_for(lambda: "evicted or banned" in agent.logs(), 20, "the ban said")
        wait_for(lambda: REFUSED in agent.logs(), 20, "the refused attestation said")
        time.sleep(RETRY_ROUNDS)  # several more attempts, each refused
        _assert_said_once(agent.logs(), f"agent {agent_id} is banned")
    finally:
        _stop(root, server, agent)


def _dir(path: Path) -> Path:
    path.mkdir()
    return path


def _x509pop_agent_id(server: ServerProcess) -> str | None:
    ids = [a for a in agent_ids(server) if "/x509pop/" in a]
    return ids[0] if ids else None


def _stop(root: Path, server: ServerProcess, agent: AgentProcess | None) -> None:
    if agent is not None:
        agent.stop()
        print("---- agent log ----\n" + agent.logs()[-6000:])
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


# -- in process, with a fake clock for the interval --------------------------------------------


def test_a_refused_certificate_is_said_again_after_the_interval_with_the_attempts_since(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = short_tmpdir()
    trusted_ca, _, _ = node_pki(_dir(root / "trusted"))
    _, cert, key = node_pki(_dir(root / "other"))
    server = make_server(root, x509pop_ca_bundle=str(trusted_ca)).start()
    try:
        clock = FakeClock(start=time.time())
        syncer = in_process_syncer(server, tmp_path, clock, x509pop=(cert, key))
        first, reminder = reminded(syncer, clock, Attempts(monkeypatch), caplog, REFUSED)
    finally:
        _stop(root, server, None)
    assert first.levelno == reminder.levelno == logging.ERROR
    assert "does not chain to a trusted CA" in str(getattr(first, "error", ""))


def test_an_attestation_type_the_server_does_not_enable_is_said_once_then_after_the_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INVALID_ARGUMENT (here: x509pop at a server with no x509pop_ca_bundle) is as much the
    operator's to mend as a refused certificate: it was written at every retry."""
    root = short_tmpdir()
    _, cert, key = node_pki(root)
    server = make_server(root).start()  # join_token only
    try:
        clock = FakeClock(start=time.time())
        syncer = in_process_syncer(server, tmp_path, clock, x509pop=(cert, key))
        first, reminder = reminded(syncer, clock, Attempts(monkeypatch), caplog, NOT_ACCEPTED)
    finally:
        _stop(root, server, None)
    assert first.levelno == reminder.levelno == logging.ERROR
    said = str(getattr(first, "error", ""))
    assert "INVALID_ARGUMENT" in said
    assert "'x509pop' is not enabled (enabled: join_token)" in said  # the server's words
    assert "x509pop_ca_bundle" in first.getMessage()  # what to do


def test_an_attestation_over_the_hosts_budget_is_said_as_such_not_as_a_refused_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = short_tmpdir()
    # One attempt in the budget, and none more for the test's length: a join token is checked
    # first, so the first refusal is the token's and every other is RESOURCE_EXHAUSTED.
    server = make_server(root, attest_rate_per_host=0.001, attest_burst_per_host=1).start()
    try:
        clock = FakeClock(start=time.time())
        token = f"never-issued.{secrets.token_urlsafe(32)}"
        syncer = in_process_syncer(server, tmp_path, clock, join_token=token)
        first, reminder = reminded(syncer, clock, Attempts(monkeypatch), caplog, LIMITED)
    finally:
        _stop(root, server, None)
    assert first.levelno == reminder.levelno == logging.WARNING
    assert "RESOURCE_EXHAUSTED" in str(getattr(first, "error", ""))
    # The one refusal of the token, said once: the answers over the budget are not refusals.
    refusals = [r for r in caplog.records if TOKEN_REFUSED in r.getMessage()]
    assert len(refusals) == 1
    assert getattr(refusals[0], "times", None) == 1

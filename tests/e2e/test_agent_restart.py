"""A real agent restarted on its data dir (SIGTERM or kill -9) serves the SVIDs it held without
the server minting them again, and never one whose entry went away or whose agent was evicted
while it was down."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from svid._proto import workload_pb2
from tests.e2e import agent_process
from tests.e2e.agent_process import (
    HEADER,
    AgentProcess,
    agent_stack,
    create_entries,
    create_entry,
)
from tests.e2e.conftest import (
    ServerProcess,
    make_restartable_server,
    short_tmpdir,
    wait_for,
)

pytestmark = pytest.mark.e2e
UID_SELECTOR = f"unix:uid:{os.getuid()}"
ENTRIES = 8


@dataclass
class Stack:
    server: ServerProcess
    agent: AgentProcess
    agent_id: str
    entry_ids: dict[str, str]  # SPIFFE ID -> entry ID


@pytest.fixture
def stack() -> Iterator[Stack]:
    root = short_tmpdir()
    # Fixed ports and a metrics listener, so a restarted server is found and counted.
    server = make_restartable_server(
        root,
        metrics_address="127.0.0.1:0",
    ).start()
    with agent_stack(root, server) as agent:
        agent_id = agent.agent_id()
        ids = create_entries(
            server,
            agent_id,
            [f"spiffe://example.org/w{n:02d}" for n in range(ENTRIES)],
            UID_SELECTOR,
        )
        yield Stack(server, agent, agent_id, ids)


def x509_minted(server: ServerProcess) -> int:
    """X.509-SVIDs this server process has signed, from its own metrics."""
    address = server.runtime["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith('svid_server_svids_issued_total{kind="x509"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def served(agent: AgentProcess) -> dict[str, bytes] | grpc.StatusCode:
    """SPIFFE ID -> leaf DER of the first FetchX509SVID message, or the error code."""
    try:
        msg = next(
            agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5)
        )
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return {s.spiffe_id: bytes(s.x509_svid) for s in msg.svids}


def held_all(stack: Stack) -> dict[str, bytes]:
    def all_served() -> dict[str, bytes] | None:
        got = served(stack.agent)
        return got if isinstance(got, dict) and len(got) == ENTRIES else None

    got: dict[str, bytes] = wait_for(all_served, 60, f"{ENTRIES} SVIDs", interval=0.1)
    return got


def saved_svids(stack: Stack) -> int:
    """SVIDs in the agent's state file (read-only, beside the running agent)."""
    path = stack.agent.data_dir / "agent_state.sqlite3"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM svids").fetchone()[0])
    except sqlite3.Error:
        return 0


def stop(agent: AgentProcess, how: str) -> None:
    if how == "kill -9":
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait(10)
        agent.proc = None
        agent.socket_path.unlink(missing_ok=True)  # a killed agent leaves its socket behind
    else:
        assert agent.stop() == 0


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
@pytest.mark.parametrize("server_restarted", [False, True], ids=["delta", "snapshot"])
def test_a_restarted_agent_serves_what_it_held_without_minting_it_again(
    stack: Stack, how: str, server_restarted: bool
) -> None:
    before = held_all(stack)
    # Saved within a second of minting; a killed agent has no chance to write at the end.
    wait_for(lambda: saved_svids(stack) == ENTRIES, 30, "the SVIDs saved")
    minted = x509_minted(stack.server)
    stop(stack.agent, how)
    gone = "spiffe://example.org/w07"
    stack.server.cli("entry", "delete", "--id", stack.entry_ids[gone])
    if server_restarted:
        # Another server process: another Sync epoch, so the agent catches up by a snapshot.
        stack.server.stop()
        stack.server.start()
        minted = 0
    stack.agent.start()

    def answered() -> tuple[dict[str, bytes] | grpc.StatusCode] | None:
        got = served(stack.agent)
        return None if got == grpc.StatusCode.UNAVAILABLE else (got,)  # not ready yet

    (after,) = wait_for(answered, 30, "the restarted agent to answer")
    assert isinstance(after, dict), after
    # The very SVIDs it held, but the deleted entry's: never served, not even once.
    assert after == {sid: der for sid, der in before.items() if sid != gone}
    assert x509_minted(stack.server) == minted
    assert "restored saved agent state" in stack.agent.logs()


def test_an_agent_evicted_while_down_serves_nothing_it_saved(stack: Stack) -> None:
    held_all(stack)
    wait_for(lambda: saved_svids(stack) == ENTRIES, 30, "the SVIDs saved")
    stop(stack.agent, "SIGTERM")
    stack.server.cli("agent", "evict", "--spiffe-id", stack.agent_id)
    stack.agent.start()

    def refused() -> grpc.StatusCode | None:
        got = served(stack.agent)
        return got if got == grpc.StatusCode.PERMISSION_DENIED else None

    wait_for(refused, 30, "the restarted agent to hear it was evicted")
    # What it had saved is gone with it: nothing to restore at the next start either.
    wait_for(lambda: saved_svids(stack) == 0, 30, "the saved SVIDs dropped")


def test_only_the_svids_missing_from_the_saved_state_are_minted(stack: Stack) -> None:
    before = held_all(stack)
    wait_for(lambda: saved_svids(stack) == ENTRIES, 30, "the SVIDs saved")
    stop(stack.agent, "SIGTERM")
    minted = x509_minted(stack.server)
    # As if the agent had died before saving these two (its last batch lost).
    lost = ["spiffe://example.org/w02", "spiffe://example.org/w05"]
    path = stack.agent.data_dir / "agent_state.sqlite3"
    with sqlite3.connect(path) as db:
        db.executemany(
            "DELETE FROM svids WHERE entry_id = ?", [(stack.entry_ids[sid],) for sid in lost]
        )
    stack.agent.start()
    after = held_all(stack)
    assert {sid for sid in after if after[sid] != before[sid]} == set(lost)
    assert x509_minted(stack.server) == minted + len(lost)


def test_a_stopped_agent_reports_the_validations_it_answered(stack: Stack) -> None:
    """ValidateJWTSVID answers go to the server's audit log in batches (every 0.5 s): a clean
    stop right after some were answered must not drop the batch still gathering."""
    held_all(stack)
    stub = stack.agent.stub()
    subject = "spiffe://example.org/w00"
    # Three tokens: one token validated again is reported once while it is valid.
    for audience in ("db1", "db2", "db3"):
        (svid,) = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=[audience], spiffe_id=subject),
            metadata=HEADER,
            timeout=10,
        ).svids
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=svid.svid),
            metadata=HEADER,
            timeout=10,
        )
    stop(stack.agent, "SIGTERM")
    out = stack.server.cli(
        "audit", "export", "--data-dir", str(stack.server.data_dir), "--kind", "jwt_validated"
    ).stdout
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [(e["agent_id"], e["decision"]) for e in events] == [(subject, "allow")] * 3


# The agent, killed as it closes the channel its attestation came over: the server has spent
# the join token and answered, nothing else has happened yet.
KILLED_AFTER_ATTESTING = """
import os, signal, sys
from agent_attestor import node_client
from agent_attestor.cli import main

async def killed(self):
    os.kill(os.getpid(), signal.SIGKILL)

node_client.NodeClient.close = killed
sys.exit(main(sys.argv[1:]))
"""


def test_an_agent_killed_right_after_attesting_comes_back_without_a_new_join_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = short_tmpdir()
    server = make_restartable_server(root).start()
    with agent_stack(root, server, start=False) as agent:
        monkeypatch.setattr(
            agent_process, "agent_command", lambda: [sys.executable, "-c", KILLED_AFTER_ATTESTING]
        )
        with contextlib.suppress(RuntimeError):  # it may die before start() sees its socket
            agent.start()
        assert agent.proc is not None
        assert agent.proc.wait(30) == -signal.SIGKILL
        agent.proc = None
        agent.socket_path.unlink(missing_ok=True)
        agent_id = agent.agent_id()  # the server admitted it: its join token is spent
        monkeypatch.undo()
        spiffe_id = "spiffe://example.org/after-attest-kill"
        create_entry(server, spiffe_id, agent_id, UID_SELECTOR)
        agent.start()
        agent.wait_svid(spiffe_id)

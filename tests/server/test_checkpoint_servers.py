"""Audit checkpoints while two real servers share one datastore (SQLite file or PostgreSQL
schema), each with its own data directory and the trust domain's key-encryption key: the
housekeeping lease holder signs the stored head once the events since its last checkpoint
chain from it, refuses a rewritten segment, and every server files and pushes what it signed,
under one key that agents and operators of either server check.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from agent_attestor.checkpoint_store import CheckpointStore, PushedCheckpoint
from server.audit.checkpoint import (
    CHECKPOINT,
    CHECKPOINT_FILE,
    PUBLIC_KEY_FILE,
    Checkpoint,
    CheckpointError,
    load_public_key,
)
from server.audit.event import event_from_row
from server.audit.verify import verify_store
from server.cli import main
from server.datastore.postgres_sql import pg
from server.datastore.records import Head
from svid._proto import admin_pb2, node_pb2
from tests.server.fixtures import RunningServer
from tests.server.test_replication_servers import next_matching, wait_until
from tests.server.test_singleton_jobs import Pair, _pair


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """A (the housekeeping lease holder) and B, both started."""
    for started in _pair(request):
        started.start_b()
        yield started


def _b(pair: Pair) -> RunningServer:
    assert pair.b is not None
    return pair.b


def checkpoint(server: RunningServer) -> Checkpoint:
    """The server's checkpoint now (what its interval tick or lease take-over does)."""
    return server.call(asyncio.to_thread(server.server.checkpointer.checkpoint))  # type: ignore[no-any-return]


def stored_head(pair: Pair) -> Head:
    head = pair.a.server.datastore.audit_head()
    assert head is not None
    return head


def execute(pair: Pair, sql: str, params: dict[str, Any]) -> None:
    """Change the shared database behind the servers' backs, as a hostile writer would."""
    datastore = pair.options["datastore"]
    if datastore.startswith("postgresql"):
        import psycopg

        with psycopg.connect(datastore, autocommit=True) as conn:
            conn.execute(pg(sql), params)
    else:
        db = sqlite3.connect(datastore)
        try:
            with db:
                db.execute(sql, params)
        finally:
            db.close()


def rewrite(pair: Pair, seq: int, rechain: bool) -> None:
    """Edit the event at `seq`; with `rechain`, hash it and every later one again and move
    the head row, so the chain reads whole (as an intruder who knows the format would)."""
    rows = [r for r in pair.a.server.datastore.audit_rows() if r["seq"] >= seq]
    prev = None
    for row in rows:
        event = event_from_row(row)
        if event.seq == seq:
            event = replace(event, reason="nothing to see here")
        if prev is not None:
            event = replace(event, prev_hash=prev)
        digest = event.compute_hash() if rechain else row["hash"]
        execute(
            pair,
            "UPDATE audit_events SET reason = :reason, prev_hash = :prev, hash = :hash "
            "WHERE seq = :seq",
            {"reason": event.reason, "prev": event.prev_hash, "hash": digest, "seq": event.seq},
        )
        if not rechain:
            return
        prev = digest
    execute(pair, "UPDATE audit_head SET hash = :hash WHERE id = 1", {"hash": prev})


def refusals(server: RunningServer) -> float:
    total = 0.0
    for metric in server.server.metrics.audit_checkpoint_refusals.collect():
        total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


# -- the head the holder signs ------------------------------------------------------------------


def test_the_holders_checkpoint_covers_events_written_through_the_other_server(
    pair: Pair,
) -> None:
    b = _b(pair)
    assert pair.a.server.housekeeping.held
    for _ in range(4):
        b.attest()  # every event of these through B
    committed = pair.a.server.tasks.audit.committed_head()
    head = stored_head(pair)
    assert committed is None or committed.seq < head.seq  # A's own last write is behind
    made = checkpoint(pair.a)
    assert (made.seq, made.hash, made.count) == (head.seq, head.hash, head.seq)
    # Unchanged: the next tick signs nothing new; more events through B: covered again.
    assert checkpoint(pair.a) == made
    b.attest()
    assert checkpoint(pair.a).seq == stored_head(pair).seq > made.seq


@pytest.mark.parametrize("rechain", [False, True], ids=["edited", "rechained"])
def test_a_rewritten_segment_is_not_signed(pair: Pair, rechain: bool) -> None:
    b = _b(pair)
    b.attest()
    signed = checkpoint(pair.a)
    for _ in range(3):
        b.attest()
    # An event after the last checkpoint edited in place, or one at it edited and every
    # later one re-hashed (the chain whole again, but no longer through the signed hash).
    rewrite(pair, signed.seq + 2 if not rechain else signed.seq, rechain)
    file = pair.checkpoints(pair.a)
    with pytest.raises(CheckpointError, match="refused to sign"):
        checkpoint(pair.a)
    assert file.last(CHECKPOINT) == signed
    assert pair.a.server.checkpointer.last == signed
    assert refusals(pair.a) == 1
    with pytest.raises(CheckpointError):  # and again at the next tick: nothing to sign
        checkpoint(pair.a)
    assert file.last(CHECKPOINT) == signed


# -- what every server and its agents get -------------------------------------------------------


def test_a_checkpoint_signed_by_the_holder_reaches_an_agent_on_the_other_server(
    pair: Pair,
) -> None:
    b = _b(pair)
    agent = b.attest()
    stream = b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=60)
    assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
    made = pair.a.admin().AuditCheckpoint(admin_pb2.AuditCheckpointRequest(), timeout=10)
    pushed = next_matching(stream, lambda u: bool(u.audit_checkpoints))
    stream.cancel()
    assert [c.line for c in pushed.audit_checkpoints] == [made.line]
    # The agent keeps it, and later ones whichever server signs them: one key for all.
    agent_store = CheckpointStore(pair.root / "agent-checkpoint.jsonl")
    assert agent_store.offer(PushedCheckpoint(made.line, pushed.audit_checkpoints[0].public_key))
    b.attest()
    by_b = b.admin().AuditCheckpoint(admin_pb2.AuditCheckpointRequest(), timeout=10)
    assert by_b.key_id == made.key_id
    line = Checkpoint.parse(by_b.line)
    assert agent_store.offer(PushedCheckpoint(by_b.line, line.public_key_der()))
    assert agent_store.held is not None
    assert agent_store.held.seq == by_b.seq > made.seq


def test_a_server_started_later_serves_the_holders_latest_checkpoint(pair: Pair) -> None:
    b = _b(pair)
    made = checkpoint(pair.a)
    b.stop()
    pair.a.attest()
    later = checkpoint(pair.a)
    assert later.seq > made.seq
    b = pair.start_b()
    agent = b.attest()
    stream = b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=60)
    first = next(stream)
    stream.cancel()
    lines = [Checkpoint.parse(c.line) for c in first.audit_checkpoints]
    assert next(c for c in lines if c.kind == CHECKPOINT).seq >= later.seq


def test_verify_with_either_servers_checkpoint_file_accepts_the_chain(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    b = _b(pair)
    for server in (pair.a, b, b):
        server.attest()
    made = checkpoint(pair.a)
    b_file = pair.checkpoints(b)
    wait_until(lambda: b_file.last(CHECKPOINT) == made, 5, "B to file A's checkpoint")
    public = [s.config.data_dir / PUBLIC_KEY_FILE for s in (pair.a, b)]
    assert public[0].read_bytes() == public[1].read_bytes()  # one key to pin
    pinned, _ = load_public_key(public[1])
    for server in (pair.a, b):
        anchors, note = pair.checkpoints(server).anchors(pinned)
        assert "pinned" in note
        result = verify_store(server.server.datastore, anchors)
        assert result.ok, str(result)
        assert result.anchor is not None
        assert result.anchor.seq == made.seq
        # And as an operator on that server runs it.
        datastore = pair.options["datastore"]
        where = ["--datastore" if datastore.startswith("postgresql") else "--audit-db", datastore]
        checkpoints = str(server.config.data_dir / CHECKPOINT_FILE)
        code = main(
            ["audit", "verify", *where, "--anchor", checkpoints, "--anchor-key", str(public[0])]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "audit chain OK" in out
        assert "matches the checkpoint of" in out

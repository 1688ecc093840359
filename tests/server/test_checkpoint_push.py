"""Signed audit checkpoints reach agents over Sync: the latest in every snapshot, each new one as
a delta on open streams, and to a reconnecting agent that missed it. Real server, real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from server.audit.retention import Cut
from svid import AuditCheckpoint
from svid._audit_checkpoint import load_public_der
from svid._proto import admin_pb2, node_pb2
from tests.server.fixtures import RunningServer, running_server


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def records(message: node_pb2.SyncUpdate) -> list[AuditCheckpoint]:
    out = []
    for pushed in message.audit_checkpoints:
        record = AuditCheckpoint.parse(pushed.line)
        record.verify_signature(load_public_der(pushed.public_key))
        out.append(record)
    return out


def verified(message: node_pb2.SyncUpdate) -> AuditCheckpoint:
    (checkpoint,) = [r for r in records(message) if r.kind == "checkpoint"]
    return checkpoint


def test_a_snapshot_carries_the_latest_checkpoint(srv: RunningServer) -> None:
    agent = srv.attest()
    made = srv.admin().AuditCheckpoint(admin_pb2.AuditCheckpointRequest(), timeout=10)
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    first = next(stream)
    stream.cancel()
    assert first.kind == node_pb2.SyncUpdate.SNAPSHOT
    assert [c.line for c in first.audit_checkpoints] == [made.line]
    checkpoint = verified(first)
    assert checkpoint.key_id == srv.server.checkpointer.key_id
    assert checkpoint.count == made.count >= 1  # the attestation is on record


def test_a_new_checkpoint_is_pushed_to_open_streams_and_to_those_that_missed_it(
    srv: RunningServer,
) -> None:
    agent = srv.attest()
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    first = next(stream)
    before = verified(first)  # the one signed at start
    made = srv.admin().AuditCheckpoint(admin_pb2.AuditCheckpointRequest(), timeout=10)
    pushed = next(stream)
    stream.cancel()
    assert pushed.kind == node_pb2.SyncUpdate.DELTA
    assert [c.line for c in pushed.audit_checkpoints] == [made.line]
    assert list(pushed.entries) == []
    assert list(pushed.revocations) == []
    assert not pushed.crl_changed
    assert not pushed.HasField("bundle")
    assert verified(pushed).count > before.count

    # Reconnecting from before it: the delta carries it; from after it: nothing to send.
    missed = srv.node_stub(agent).Sync(
        node_pb2.SyncRequest(since_revision=first.revision, epoch=first.epoch), timeout=30
    )
    caught_up = next(missed)
    missed.cancel()
    assert [c.line for c in caught_up.audit_checkpoints] == [made.line]
    current = srv.node_stub(agent).Sync(
        node_pb2.SyncRequest(since_revision=pushed.revision, epoch=pushed.epoch), timeout=30
    )
    nothing = next(current)
    current.cancel()
    assert nothing.kind == node_pb2.SyncUpdate.DELTA
    assert list(nothing.audit_checkpoints) == []


def test_a_prune_record_is_pushed_and_rides_with_the_checkpoint_in_snapshots(
    srv: RunningServer,
) -> None:
    agent = srv.attest()
    srv.create_entry("/ckpt/w", agent.spiffe_id)
    made = srv.admin().AuditCheckpoint(admin_pb2.AuditCheckpointRequest(), timeout=10)
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    next(stream)
    report = srv.call(asyncio.to_thread(srv.server.pruner.prune, Cut(through=1)))
    assert report.record is not None
    pushed = next(stream)
    stream.cancel()
    assert [(r.kind, r.seq) for r in records(pushed)] == [("checkpoint", made.seq), ("prune", 1)]
    assert pushed.audit_checkpoints[1].line == report.record.to_line()
    again = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    snapshot = next(again)
    again.cancel()
    assert list(snapshot.audit_checkpoints) == list(pushed.audit_checkpoints)

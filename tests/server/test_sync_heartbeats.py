"""Sync heartbeats: an agent that asks for them (SyncRequest.heartbeats) has one right after the
stream's first messages, then one an interval while nothing else comes, so that it notices a
server hung without closing the stream before keepalive does. An agent that does not ask (one
older than heartbeats) is sent none: it reads an unknown kind as an empty snapshot."""

from __future__ import annotations

from svid._proto import node_pb2
from tests.server.fixtures import managed_server

HEARTBEAT = node_pb2.SyncUpdate.HEARTBEAT


def test_an_agent_asking_has_heartbeats_and_one_not_asking_has_none() -> None:
    with managed_server(sync_heartbeat_interval=0.1) as server:
        agent = server.attest()
        stub = server.node_stub(agent)
        old = stub.Sync(node_pb2.SyncRequest(), timeout=30)
        new = stub.Sync(node_pb2.SyncRequest(heartbeats=True), timeout=30)
        assert next(old).kind == node_pb2.SyncUpdate.SNAPSHOT
        assert next(new).kind == node_pb2.SyncUpdate.SNAPSHOT
        first = next(new)  # at once, not an interval later
        assert first.kind == HEARTBEAT
        assert first.heartbeat_interval_ms == 100
        assert [next(new).kind for _ in range(3)] == [HEARTBEAT] * 3
        # Heartbeats went out meanwhile; the old agent's next message is the change itself.
        entry = server.create_entry("/beat", agent.spiffe_id)
        change = next(old)
        assert change.kind == node_pb2.SyncUpdate.DELTA
        assert [e.id for e in change.entries] == [entry.id]
        old.cancel()
        new.cancel()

"""Sync heartbeats: an agent that asks for them (SyncRequest.heartbeats) has one right after the
stream's first messages, then one an interval while nothing else comes, so that it notices a
server hung without closing the stream before keepalive does. An agent that does not ask (one
older than heartbeats) is sent none: it reads an unknown kind as an empty snapshot."""

from __future__ import annotations

import grpc
import pytest

from server.config import MIN_OWN_SVID_TTL
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


def test_a_stream_woken_for_heartbeats_alone_ends_once_its_agent_svid_expires() -> None:
    """A heartbeat says the agent is still served: on a quiet stream, woken by nothing else,
    the agent's SVID running out (its in-memory record's expiry, no datastore read) ends the
    stream PERMISSION_DENIED at the next beat, not once something else changes."""
    with managed_server(
        sync_heartbeat_interval=0.1, agent_svid_ttl=MIN_OWN_SVID_TTL, lag=0
    ) as server:
        agent = server.attest()
        stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(heartbeats=True), timeout=10)
        assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
        assert next(stream).kind == HEARTBEAT
        server.clock.advance(agent.chain[0].not_valid_after_utc.timestamp() - server.clock.now())
        with pytest.raises(grpc.RpcError) as ended:
            list(stream)
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "expired SVID" in (ended.value.details() or "")

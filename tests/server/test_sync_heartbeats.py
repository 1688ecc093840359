"""Sync heartbeats: an agent that asks for them (SyncRequest.heartbeats) has one right after the
stream's first messages, then one an interval while nothing else comes, so that it notices a
server hung without closing the stream before keepalive does. An agent that does not ask (one
older than heartbeats) is sent none: it reads an unknown kind as an empty snapshot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from server import propagation
from server.config import MIN_OWN_SVID_TTL
from svid._proto import node_pb2
from tests.server.fixtures import Agent, HeldCatchUp, RunningServer, managed_server
from tests.waits import wait_for

HEARTBEAT = node_pb2.SyncUpdate.HEARTBEAT


def beating_stream(server: RunningServer, agent: Agent) -> Iterator[node_pb2.SyncUpdate]:
    """`agent`'s Sync stream asking for heartbeats, read past its snapshot and the beat that
    follows it right away."""
    stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(heartbeats=True), timeout=30)
    try:
        assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
        assert next(stream).kind == HEARTBEAT
    except BaseException:
        stream.cancel()
        raise
    return stream


def hold_catch_ups(server: RunningServer, held_catch_up: HeldCatchUp) -> None:
    """The server's view catches up at `held_catch_up`'s gate from now on, its staleness bound
    far off: a stream whose backlog overflows waits for the gate, not for the bound."""
    node = server.server.node
    assert node is not None
    node._view._catch_up = held_catch_up
    node._view.bound = 60.0


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


def test_a_live_stream_starting_again_from_a_snapshot_beats_while_its_view_catches_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A live stream whose backlog overflowed (a bulk change) starts again from a snapshot,
    and first waits for the view to catch up with the datastore: a slow feed read, on a busy
    database, up to the staleness bound. Its agent, caught up and counting silence, ended the
    stream as its server's silence past two intervals and moved: every overflowed stream of the
    server at once, onto the next one, while the server was healthy. Heartbeats go on while it
    waits; the snapshot follows once the view is current."""
    monkeypatch.setattr(propagation, "MAX_INBOX", 0)  # every change overflows the backlog
    with managed_server(sync_heartbeat_interval=0.1) as server:
        held_catch_up = HeldCatchUp(server.call)

        agent = server.attest()
        stream = beating_stream(server, agent)
        try:
            hold_catch_ups(server, held_catch_up)
            entry = server.create_entry("/bulk", agent.spiffe_id)
            wait_for(lambda: held_catch_up.waiting == 1, 10, "the stream to wait for the view")
            with ThreadPoolExecutor(1) as reader:
                # Twenty intervals: beats then, or none until the view caught up.
                beats = reader.submit(lambda: [next(stream).kind for _ in range(3)])
                try:
                    kinds = beats.result(timeout=2)
                except TimeoutError:
                    pytest.fail("no heartbeat while the view caught up: the agent ends the stream")
                finally:
                    held_catch_up.release()
            assert kinds == [HEARTBEAT] * 3
            for update in stream:
                if update.kind == node_pb2.SyncUpdate.SNAPSHOT:
                    assert [e.id for e in update.entries] == [entry.id]
                    break
                assert update.kind == HEARTBEAT
        finally:
            held_catch_up.release()
            stream.cancel()


def test_the_first_beat_while_the_view_catches_up_comes_an_interval_after_the_last_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catch-up's heartbeats were timed from its start: a stream whose backlog overflowed
    just before its next beat was due had that beat (its subscription gone) and the catch-up's
    first only an interval later, near two intervals after the last message: the very silence
    its agent ends the stream for, every overflowed stream of a healthy server that was about
    to beat."""
    monkeypatch.setattr(propagation, "MAX_INBOX", 0)  # every change overflows the backlog
    interval = 1.0
    with managed_server(sync_heartbeat_interval=interval) as server:
        held_catch_up = HeldCatchUp(server.call)

        agent = server.attest()
        stream = beating_stream(server, agent)
        try:
            assert next(stream).kind == HEARTBEAT  # on the stream's turn: the next one's due
            last = time.monotonic()  # an interval from now
            hold_catch_ups(server, held_catch_up)
            time.sleep(0.8 * interval)
            server.create_entry("/bulk", agent.spiffe_id)
            wait_for(lambda: held_catch_up.waiting == 1, 10, "the stream to wait for the view")
            assert next(stream).kind == HEARTBEAT
            silent = time.monotonic() - last
            assert silent < 1.4 * interval, f"{silent:.2f} s without a message"
        finally:
            held_catch_up.release()
            stream.cancel()


def test_a_stream_catching_up_beats_no_longer_than_what_it_holds_is_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A heartbeat tells the agent it holds the server's view (its verifiers' staleness is
    counted from the last one), and the view is never older than the staleness bound. A
    stream whose backlog overflowed holds the view as of its last wake, without what the
    backlog dropped (a revocation), until the snapshot comes: it beat for the whole catch-up,
    its agent in sync with what it held growing past the bound, up to twice it. Once what it
    holds is as old as the bound, it ends as a stale view does (UNAVAILABLE): the agent moves."""
    monkeypatch.setattr(propagation, "MAX_INBOX", 0)  # every change overflows the backlog
    with managed_server(sync_heartbeat_interval=0.1) as server:
        node = server.server.node
        assert node is not None
        freshness = node._view.freshness
        held_catch_up = HeldCatchUp(server.call)

        async def followed() -> None:  # a healthy follower: the view always fresh
            while not held_catch_up.gate.is_set():
                freshness.caught_up(freshness.now())
                await asyncio.sleep(0.05)

        freshness.limit = 1.0
        following = asyncio.run_coroutine_threadsafe(followed(), server._loop)
        agent = server.attest()
        try:
            stream = beating_stream(server, agent)
            hold_catch_ups(server, held_catch_up)
            server.create_entry("/bulk", agent.spiffe_id)
            began = time.monotonic()
            with ThreadPoolExecutor(1) as reader:
                ended = reader.submit(lambda: [update.kind for update in stream])
                try:
                    error = ended.exception(timeout=3)
                except TimeoutError:
                    pytest.fail("heartbeats went on past the bound while the stream caught up")
                finally:
                    stream.cancel()
            assert time.monotonic() - began < 2.0
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            held_catch_up.release()
            following.result(10)

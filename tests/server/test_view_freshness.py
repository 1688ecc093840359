"""A server that cannot read the shared datastore's change feed stops serving Sync from the view
it last read: new streams are refused and open ones end (UNAVAILABLE), so its agents move to a
server that reads; it serves again once a read of the feed succeeds."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from server.app import NODE_SERVICE
from server.errors import UnavailableError
from server.view_freshness import MIN_STALE_AFTER, CurrentView, ViewFreshness, stale_after
from svid._clock import FakeClock
from svid._proto import node_pb2
from tests.server import test_sync_attack
from tests.server.fixtures import Agent, RunningServer
from tests.server.test_sync_attack import Partitioned
from tests.waits import wait_for

# The fixture: servers A and B on one PostgreSQL database, B reaching it through a relay a test
# cuts.
partitioned = test_sync_attack.partitioned


def test_a_view_is_stale_past_its_bound_and_fresh_again_once_caught_up() -> None:
    clock = FakeClock()
    view = ViewFreshness(clock, 3.0)
    clock.advance(2.9)
    view.check()
    read_began = view.now()
    clock.advance(0.2)
    with pytest.raises(UnavailableError, match=r"view is 3 s old: its datastore is unreachable"):
        view.check()
    view.caught_up(read_began)  # fresh as of when the read began: 0.2 s ago
    view.check()
    view.caught_up(read_began - 10)  # a slower read finishing late moves nothing back
    assert view.age() == pytest.approx(0.2)


def test_what_a_stream_holds_is_stale_past_the_bound_though_the_view_is_fresh() -> None:
    """A Sync stream catching up holds the view as of its last messages (`held`): the same
    bound as the view's, each named apart, the view's own staleness first."""
    clock = FakeClock()
    view = ViewFreshness(clock, 3.0)
    held = view.as_of
    clock.advance(2.9)
    view.caught_up(view.now())
    view.check(held)
    clock.advance(0.1)
    view.check()  # the view was read 0.1 s ago
    with pytest.raises(UnavailableError, match=r"could not bring a Sync stream up to its view"):
        view.check(held)
    clock.advance(3.0)
    with pytest.raises(UnavailableError, match=r"view is 3 s old"):
        view.check(held)
    ViewFreshness(clock, None).check(held)  # no feed: nothing is ever stale


def test_a_view_with_no_feed_to_lag_is_never_stale() -> None:
    clock = FakeClock()
    view = ViewFreshness(clock, None)
    clock.advance(86_400)
    view.check()


def test_the_bound_is_a_few_polls_and_never_under_a_few_seconds() -> None:
    assert stale_after(0.1) == MIN_STALE_AFTER
    assert stale_after(5.0) == 15.0


def test_the_watcher_wakes_the_streams_once_as_the_view_turns_stale() -> None:
    clock = FakeClock()
    view = ViewFreshness(clock, 3.0)
    woken: list[float] = []

    async def watch_a_while() -> None:
        stop = asyncio.Event()
        watching = asyncio.create_task(view.watch(stop, lambda: woken.append(view.age())))
        await asyncio.sleep(0.05)
        assert woken == []
        clock.advance(4)  # due 0.01 s after it started: it looks again meanwhile
        await asyncio.sleep(0.6)
        stop.set()
        await watching

    clock.advance(2.99)
    asyncio.run(watch_a_while())
    assert woken == [pytest.approx(6.99)]


def test_a_server_cut_off_from_postgresql_ends_its_open_sync_streams(
    partitioned: Partitioned,
) -> None:
    """An agent on B holds a stream; B loses its database. Within a few feed polls the stream
    ends with UNAVAILABLE naming why (the agent then moves to A), and a new one is refused."""
    a, b = partitioned.a, partitioned.b
    agent = a.attest()
    wait_for(lambda: agent.spiffe_id in b.server.state.agents, 10, "B to learn the agent")
    stream = b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    try:
        assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
        partitioned.relay.cut()
        cut = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        took = time.monotonic() - cut
    finally:
        stream.cancel()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "datastore is unreachable" in ended.value.details()  # type: ignore[attr-defined]
    assert took < stale_after(b.server.config.feed_poll_interval) + 2
    again = b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as refused:
        next(again)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    # The node service's health says so too, for a load balancer, and turns back once B reads.
    assert _node_health(b, agent) == health_pb2.HealthCheckResponse.NOT_SERVING
    partitioned.relay.restore()
    wait_for(
        lambda: _node_health(b, agent) == health_pb2.HealthCheckResponse.SERVING,
        10,
        "B's node service to be healthy again",
    )


def _node_health(server: RunningServer, agent: Agent) -> int:
    stub = health_pb2_grpc.HealthStub(server.node_channel(agent))
    request = health_pb2.HealthCheckRequest(service=NODE_SERVICE)
    return int(stub.Check(request, timeout=5).status)


def test_a_server_on_postgresql_that_reads_its_feed_goes_on_serving_sync(
    partitioned: Partitioned,
) -> None:
    """No false alarm: an idle stream on a server whose feed reads succeed stays up well past
    the bound, and is handed the next change."""
    a, b = partitioned.a, partitioned.b
    agent = a.attest()
    wait_for(lambda: agent.spiffe_id in b.server.state.agents, 10, "B to learn the agent")
    stream = b.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    try:
        assert next(stream).kind == node_pb2.SyncUpdate.SNAPSHOT
        time.sleep(stale_after(b.server.config.feed_poll_interval) + 1)
        entry = a.create_entry("/web", agent.spiffe_id)
        assert [e.id for e in next(stream).entries] == [entry.id]
    finally:
        stream.cancel()


def test_a_snapshot_waits_for_the_catch_up_and_is_refused_when_it_fails_or_lingers() -> None:
    """Before a snapshot, the view is caught up with the datastore: a catch-up that fails, or
    outlasts the staleness bound, refuses the stream rather than serve what memory holds."""
    caught_up: list[str] = []

    async def catch_up() -> None:
        caught_up.append("read")

    async def fails() -> None:
        raise OSError("connection reset")

    async def lingers() -> None:
        await asyncio.sleep(30)

    async def scenario() -> None:
        view = ViewFreshness(FakeClock(), 0.1)
        await CurrentView(view, catch_up).current()
        assert caught_up == ["read"]
        await CurrentView(ViewFreshness(FakeClock(), None)).current()  # no feed: nothing to do
        with pytest.raises(UnavailableError, match="could not read its datastore's changes"):
            await CurrentView(view, fails).current()
        started = time.monotonic()
        with pytest.raises(UnavailableError, match=r"within 0.1 s; use another server"):
            await CurrentView(view, lingers).current()
        assert time.monotonic() - started < 2

    asyncio.run(scenario())

"""The Revocations service tells verifiers how long the agent has been out of sync with its
server (out_of_sync_ms), in a message when its link is lost and when it is back: the stream to
a verifier is quiet and stays healthy through a partition behind the agent, and said nothing
of it, so verifiers counted the list fresh while revocations made at the server could not
arrive. Over the real endpoint and relay; the link is driven by hand."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from agent_attestor.endpoint import WorkloadEndpoint
from agent_attestor.server_link import MIN_HEARTBEAT_INTERVAL, SILENT_BEATS, ServerLink
from agent_attestor.tasks.revocations import RevocationsApi
from agent_attestor.workload_attestor import UnixAttestor
from svid._clock import FakeClock
from svid._proto import revocation_pb2, revocation_pb2_grpc
from tests.agent_attestor.harness import HEADER, Harness


@dataclass
class LinkedAgent:
    h: Harness
    link: ServerLink
    endpoint: WorkloadEndpoint

    def watch(self) -> tuple[queue.Queue[revocation_pb2.RevocationList], grpc.Future]:
        """The messages of a Watch stream, read in a thread as they come."""
        channel = grpc.insecure_channel(f"unix:{self.endpoint.socket_path}")
        self.h.channels.append(channel)
        stream = revocation_pb2_grpc.RevocationsStub(channel).Watch(
            revocation_pb2.WatchRequest(), metadata=HEADER, timeout=30
        )
        got: queue.Queue[revocation_pb2.RevocationList] = queue.Queue()

        def read() -> None:
            try:
                for msg in stream:
                    got.put(msg)
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        return got, stream


@pytest.fixture
def la() -> Iterator[LinkedAgent]:
    h = Harness()
    link = ServerLink(h.clock)
    revs = RevocationsApi(h.cache, h.registry, h.api.streams, link=link)
    endpoint = WorkloadEndpoint(
        socket_path=h.root / "public" / "revs.sock",
        private_dir=h.root / "private2",
        servicer=h.api,
        registry=h.registry,
        attestors=[UnixAttestor()],
        extra_servicers=[
            lambda server: revocation_pb2_grpc.add_RevocationsServicer_to_server(revs, server),
        ],
    )
    h.lt.run(endpoint.start())
    try:
        yield LinkedAgent(h, link, endpoint)
    finally:
        h.lt.run(endpoint.stop(0))
        h.close()


def _next(got: queue.Queue[revocation_pb2.RevocationList]) -> revocation_pb2.RevocationList:
    return got.get(timeout=10)


def test_the_link_is_out_of_sync_from_the_start_and_bumps_only_when_it_changes() -> None:
    clock = FakeClock()
    link = ServerLink(clock)  # an agent restored from its state file has not synced this run
    clock.advance(2)
    assert not link.in_sync
    assert link.out_of_sync_ms() == 2000
    link.up()
    link.up()
    assert link.in_sync
    assert link.out_of_sync_ms() == 0
    assert link.changed.version == 1
    link.down()
    assert link.out_of_sync_ms() == 1  # just lost: not 0, which says in sync
    clock.advance(1.5)
    link.down()  # a failed reconnect does not restart the count
    assert link.out_of_sync_ms() == 1500
    assert link.changed.version == 2


def test_the_stream_says_when_the_agent_loses_and_regains_its_server(la: LinkedAgent) -> None:
    la.h.add_entry("/bot")
    la.h.clock.advance(3)  # three seconds after the start, not yet in sync this run
    got, stream = la.watch()
    first = _next(got)
    assert first.out_of_sync_ms == 3000
    la.h.lt.call(la.link.up)
    back = _next(got)
    assert back.out_of_sync_ms == 0
    assert list(back.items) == list(first.items)
    la.h.lt.call(la.link.down)
    lost = _next(got)
    assert lost.out_of_sync_ms == 1
    la.h.clock.advance(7)
    la.h.revoked = frozenset({"abc123"})  # the list changes meanwhile
    la.h.sync(issue=False)
    changed = _next(got)
    assert [i.value for i in changed.items] == ["abc123"]
    assert changed.out_of_sync_ms == 7000  # counted from the loss, not from the change
    la.h.lt.call(la.link.up)
    assert _next(got).out_of_sync_ms == 0
    stream.cancel()
    assert got.empty()  # one message per change of the link, none in between


def test_a_stream_opened_in_sync_says_so(la: LinkedAgent) -> None:
    la.h.add_entry("/bot")
    la.h.lt.call(la.link.up)
    la.h.clock.advance(60)
    got, stream = la.watch()
    assert _next(got).out_of_sync_ms == 0
    stream.cancel()


def test_a_server_sending_heartbeats_counts_lost_once_silent_since_it_was_last_heard() -> None:
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    link.beat(0.5)  # this server sends heartbeats, every 0.5 s
    clock.advance(0.9)
    assert link.check() == pytest.approx(0.1)  # two intervals of silence are allowed
    assert link.in_sync
    link.beat(0.5)
    clock.advance(1.0)
    assert link.check() is None  # silent for longer: lost, since the last heartbeat
    assert not link.in_sync
    assert link.out_of_sync_ms() == 1000
    clock.advance(2.0)
    link.down()  # keepalive notices at last: the count goes on from the last heard
    assert link.out_of_sync_ms() == 3000
    assert link.changed.version == 2


def test_only_a_live_stream_whose_server_fell_silent_is_to_be_ended() -> None:
    """ServerLink.silent_left, by which the agent ends the stream (sync.Syncer._watch_silence):
    not while the stream is catching up, not within the heartbeats' promise, not for a server
    that sends none, and no more once the stream ended."""
    clock = FakeClock()
    link = ServerLink(clock)
    link.beat(0.5)  # a heartbeat before the stream is caught up: not yet a live stream
    clock.advance(5)
    link.check()
    assert link.silent_left() is None
    link.up()
    link.beat(0.5)
    clock.advance(0.9)
    link.check()
    assert link.silent_left() is None
    assert link.silence == 1.0
    clock.advance(0.2)
    link.check()
    assert link.silent_left() == pytest.approx(-0.1, abs=1e-3)  # due since the promise ran out
    link.down()
    assert link.silent_left() is None
    link.up()  # another server, which sends no heartbeats
    clock.advance(3600)
    link.check()
    assert link.silent_left() is None


def test_every_message_of_a_live_stream_is_heard_not_only_its_heartbeats() -> None:
    """The parts of a long run come back to back, without a heartbeat between them, and only
    its last one is applied (up): each part is the server heard, so silence is not counted
    while they come, and the stream is not ended as silent."""
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    link.beat(0.5)
    for _ in range(10):  # a part every 0.3 s for 3 s: silent at none of them
        clock.advance(0.3)
        link.hear()
        link.handled()
        assert link.check() == pytest.approx(1.0)  # two intervals from the part
        assert link.silent_left() is None
    clock.advance(1.1)
    link.check()
    assert link.silent_left() == pytest.approx(-0.1, abs=1e-3)  # nothing more: since the last
    assert link.out_of_sync_ms() == 1100


def test_the_agents_own_time_on_a_message_ends_no_stream_but_counts_the_link_lost() -> None:
    """A message the agent is slow to handle (its bundle saved on a stalled disk): verifiers are
    told of the silence on time (check counts the link lost, as before), but the stream is ended
    only if the server says nothing once the agent reads again: a heartbeat it sent meanwhile is
    waiting there."""
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    link.beat(0.5)
    link.hear()  # a delta with a bundle, saved slowly
    clock.advance(3.0)
    assert link.check() is None
    assert not link.in_sync  # stale for verifiers since the delta came
    assert link.silent_left() is None  # but not ended while the agent is busy with it
    link.handled()
    assert link.silent_left() == pytest.approx(1.0, abs=1e-3)  # a whole promise from reading again
    link.hear()  # the heartbeat sent meanwhile
    link.beat(0.5)
    link.handled()
    assert link.in_sync
    assert link.silent_left() is None
    clock.advance(1.5)
    link.check()
    assert link.silent_left() == pytest.approx(-0.5, abs=1e-3)  # then silent for real


def test_a_stream_ended_within_its_heartbeats_promise_is_lost_from_its_end() -> None:
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    link.beat(3.0)
    clock.advance(2.0)
    link.down()  # the server closed it (a stop, a reset): it was there until now
    assert link.out_of_sync_ms() == 1


def test_a_hung_server_that_comes_back_is_in_sync_at_its_next_heartbeat() -> None:
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    link.beat(1.0)
    clock.advance(5)
    link.check()
    assert link.out_of_sync_ms() == 5000
    link.beat(1.0)
    assert link.in_sync
    assert link.changed.version == 3


def test_a_server_sending_no_heartbeats_is_in_sync_while_its_stream_lives() -> None:
    """An older server: its quiet stream says nothing of it, and counted lost from the last
    message, the agent would call itself stale all along."""
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    clock.advance(3600)
    assert link.check() is None
    assert link.in_sync
    link.down()
    assert link.out_of_sync_ms() == 1  # from the stream's end, not from the last message


def test_a_stream_to_a_server_without_heartbeats_forgets_the_last_ones() -> None:
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    link.beat(0.5)
    link.down()
    link.up()  # failed over to an older server: no heartbeat on this stream
    clock.advance(10)
    assert link.check() is None
    assert link.in_sync


def test_a_server_beating_less_often_than_the_agent_waits_for_is_no_outage_between_beats() -> None:
    """A server set to beat every 200 s: capped at 60 s, its promise had the agent counted lost
    120 s after each beat, 80 s of every 200 on a quiet stream, the server there all along."""
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    link.beat(200.0)
    clock.advance(199.0)
    assert link.check() is None  # keepalive, not a promise this long, notices a hung server
    assert link.in_sync


def test_a_promise_of_beats_too_close_to_keep_is_held_to_the_shortest_interval() -> None:
    """A server's promise of a beat every millisecond counted the agent lost at any pause of
    2 ms (a GC, a busy loop), and back at the next beat: every verifier told of each turn."""
    clock = FakeClock()
    link = ServerLink(clock)
    link.up()
    link.beat(0.001)
    clock.advance(SILENT_BEATS * MIN_HEARTBEAT_INTERVAL - 0.01)
    assert link.check() == pytest.approx(0.01, abs=1e-6)
    assert link.in_sync

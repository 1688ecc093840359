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
from agent_attestor.server_link import ServerLink
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

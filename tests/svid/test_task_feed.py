"""The task clients' revocation feeds against an agent that serves no revocation stream (a real
gRPC server on a Unix socket, the fake agent's Workload API only): they stop watching, quietly,
and the tasks work as before (tests/e2e/test_tasks_sdk_revocation.py has the rest)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator

import grpc
import pytest

from svid._proto import revocation_pb2, revocation_pb2_grpc
from svid._task_feed import RevocationFeed
from svid._task_feed_aio import AsyncRevocationFeed
from svid._workload_calls import METADATA, REVOCATIONS, RevocationsUpdate
from svid._workload_client import Watch
from svid._workload_client_aio import AsyncWatch
from tests.svid.workload_fake import WAIT, Server, State
from tests.tmpdirs import short_tmpdir


@pytest.fixture
def plain_agent() -> Iterator[Server]:
    """An agent with the Workload API and no Revocations service."""
    root = short_tmpdir("tfd")
    server = Server(State(), root / "agent.sock", revocations=False).start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _quiet_stop(caplog: pytest.LogCaptureFixture) -> None:
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "svid.tasks"]
    # Once, at INFO (not a warning), and saying what a runtime then goes without.
    assert [level for level, _ in said] == [logging.INFO]
    assert "serves no revocation stream" in said[0][1]


def test_the_sync_feed_stops_watching_an_agent_without_the_stream(
    plain_agent: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="svid.tasks")
    delivered: list[RevocationsUpdate] = []
    with grpc.insecure_channel(plain_agent.address) as channel:
        stub = revocation_pb2_grpc.RevocationsStub(channel)

        def open_watch() -> Watch[RevocationsUpdate]:
            call = stub.Watch(revocation_pb2.WatchRequest(), metadata=METADATA)
            return Watch(call, REVOCATIONS, plain_agent.address)

        def deliver(update: RevocationsUpdate) -> bool:
            delivered.append(update)
            return True

        feed = RevocationFeed(open_watch, deliver, plain_agent.address)
        feed.start()  # its thread may be over before the next line: only its end is checked
        feed.join(WAIT)  # ends by itself: no close()
        assert not feed.running
        feed.close()
    assert delivered == []
    _quiet_stop(caplog)


def test_the_async_feed_stops_watching_an_agent_without_the_stream(
    plain_agent: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="svid.tasks")
    delivered: list[RevocationsUpdate] = []

    async def run() -> None:
        async with grpc.aio.insecure_channel(plain_agent.address) as channel:
            stub = revocation_pb2_grpc.RevocationsStub(channel)

            def open_watch() -> AsyncWatch[RevocationsUpdate]:
                call = stub.Watch(revocation_pb2.WatchRequest(), metadata=METADATA)
                return AsyncWatch(call, REVOCATIONS, plain_agent.address)

            async def deliver(update: RevocationsUpdate) -> None:
                delivered.append(update)

            feed = AsyncRevocationFeed(open_watch, deliver, plain_agent.address)
            feed.start()
            assert feed.running
            async with asyncio.timeout(WAIT):  # ends by itself: no close()
                while feed.running:
                    await asyncio.sleep(0.01)
            await feed.close()

    asyncio.run(run())
    assert delivered == []
    _quiet_stop(caplog)

"""Adversarial checks of the Sync stream and its propagation across servers on one datastore.

Each test here shows a defect found on purpose (it fails until the defect is mended): what a
compromised node agent can make a server do through Sync, and what an agent is served by a
server that lost its datastore.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from svid._proto import node_pb2
from tests.server.fixtures import RunningServer, running_server

# Sync streams one agent can sensibly need at once: one per server connection, plus a few
# while it reconnects or moves its stream to a renewed certificate.
SANE_STREAMS_PER_AGENT = 8


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def _refused(stream: Any) -> int:
    """1 when the stream was refused for the agent's budget, 0 when its snapshot came."""
    try:
        first = next(stream)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return 1
    assert first.kind == node_pb2.SyncUpdate.SNAPSHOT
    return 0


def test_one_agent_cannot_hold_hundreds_of_sync_streams(srv: RunningServer) -> None:
    """A compromised agent opens Sync after Sync on one connection: each costs a snapshot
    (every entitled entry, every revocation, the CRLs and the bundle), a subscription that every
    bundle, revocation, CRL and checkpoint change wakes, and up to MAX_INBOX changes held. The
    server should refuse an agent's streams past a small number (RESOURCE_EXHAUSTED)."""
    agent = srv.attest()
    stub = srv.node_stub(agent)
    streams = []
    refused = 0
    try:
        for _ in range(200):
            stream = stub.Sync(node_pb2.SyncRequest(), timeout=30)
            streams.append(stream)
            refused += _refused(stream)
        propagator = srv.server.propagator
        assert propagator is not None
        held = propagator.subscriber_count
        assert held <= SANE_STREAMS_PER_AGENT, (
            f"one agent holds {held} open Sync streams on one server ({refused} refused)"
        )
    finally:
        for stream in streams:
            stream.cancel()
        time.sleep(0.1)

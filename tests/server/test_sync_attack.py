"""Adversarial checks of the Sync stream and its propagation across servers on one datastore.

Each test here shows a defect found on purpose (it fails until the defect is mended): what a
compromised node agent can make a server do through Sync, and what an agent is served by a
server that lost its datastore.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from server.ca.sealing import KeyEncryptionKey
from svid._proto import admin_pb2, node_pb2
from tests.server.fixtures import Agent, RunningServer, running_server, short_tmpdir, start_server
from tests.server.tcp_cut import CuttableRelay, upstream_of

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


@dataclass
class Partitioned:
    """A reaches PostgreSQL directly, B through a relay the test cuts."""

    a: RunningServer
    b: RunningServer
    relay: CuttableRelay


@pytest.fixture
def partitioned(postgres_dsn: str) -> Iterator[Partitioned]:
    root = short_tmpdir()
    KeyEncryptionKey.generate().write_new(root / "kek")
    relay = CuttableRelay(upstream_of(postgres_dsn))
    shared = {"key_encryption_key_file": str(root / "kek")}
    a = start_server(
        root, admin_socket=str(root / "a" / "admin.sock"), datastore=postgres_dsn, **shared
    )
    b = start_server(
        root,
        admin_socket=str(root / "b" / "admin.sock"),
        datastore=relay.dsn_through(postgres_dsn),
        **shared,
    )
    try:
        yield Partitioned(a, b, relay)
    finally:
        b.stop()
        a.stop()
        shutil.rmtree(root, ignore_errors=True)


def _wait(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _snapshot_ids(server: RunningServer, agent: Agent) -> set[str] | grpc.StatusCode:
    """The entry ids of a fresh Sync snapshot on `server`, or the code it refused with."""
    stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=5)
    try:
        ids: set[str] = set()
        while True:
            update = next(stream)
            ids.update(e.id for e in update.entries)
            if not update.more:
                return ids
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    finally:
        stream.cancel()


def test_a_server_cut_off_from_postgresql_does_not_serve_an_entry_deleted_meanwhile(
    partitioned: Partitioned,
) -> None:
    """B loses its database (a partition); the entry is deleted through A, which still has it.
    B's feed cannot bring the deletion, yet B goes on answering Sync from memory: a snapshot
    made long after the deletion still hands the agent the deleted entry, and the agent,
    connected, never moves to A. The README promises a change reaches every server's agents
    within feed_poll_interval (1 s); failing closed, B would refuse Sync (UNAVAILABLE) once
    its view can no longer be known fresh, and the agent would move to A."""
    a, b = partitioned.a, partitioned.b
    agent = a.attest()
    entry = a.create_entry("/web", agent.spiffe_id)
    _wait(lambda: entry.id in b.server.state.entries.by_id, "B to learn the entry")
    assert _snapshot_ids(b, agent) == {entry.id}

    partitioned.relay.cut()
    a.admin().DeleteEntry(admin_pb2.DeleteEntryRequest(id=entry.id), timeout=10)
    assert _snapshot_ids(a, agent) == set()
    # Several feed poll intervals (1 s) later: B has had every chance to notice.
    time.sleep(3.5)
    served = _snapshot_ids(b, agent)
    assert served in (set(), grpc.StatusCode.UNAVAILABLE), (
        f"B, cut off from the database for 3.5 s, still serves the deleted entry: {served}"
    )

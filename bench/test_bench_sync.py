"""Sync at scale (issue 13): what a write costs the server, and entry -> SVID, with 100k entries
held by a connected agent. In-process server, node API over mTLS, real SQLite.

Rows:
- server event-loop CPU per unrelated write (an entry for an agent that is not connected,
  created then deleted), with 1 and with 100,000 entries held by a connected agent's open Sync
  stream; and their ratio. Goal: the ratio <= 2 (a write costs what it touches, not what
  connected agents hold). CPU is the loop thread's own (time.thread_time read on the loop), so
  the client calls in this process and SQLite's worker threads do not count.
- entry -> SVID with 100,000 entries on the agent: CreateEntry for the agent until its Sync
  delta is applied to an agent Cache (Cache.apply_delta) and the X.509-SVID for the new entry is
  back from BatchNewX509SVID. Goal: p99 <= 1 s.
- the snapshot of 100,000 entries: messages, the largest message, seconds to receive it whole.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from agent_attestor.cache import Cache, SyncState, join_parts
from agent_attestor.node_client import sync_delta, sync_state
from bench.report import Table, at_most, latency_row, value_row
from svid._proto import admin_pb2, common_pb2, node_pb2
from tests.server.fixtures import Agent, RunningServer, make_csr, short_tmpdir, start_server

HELD = 100_000
WRITES = 200
SAMPLES = 150
TD = "spiffe://example.org"


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    root = short_tmpdir()
    server = start_server(root)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _create(srv: RunningServer, parent: str, count: int, prefix: str) -> None:
    admin = srv.admin()
    for start in range(0, count, 1000):
        entries = [
            common_pb2.Entry(
                spiffe_id=f"{TD}/{prefix}/{n}",
                parent_id=parent,
                selectors=[common_pb2.Selector(type="unix", value=f"uid:{n}")],
            )
            for n in range(start, min(count, start + 1000))
        ]
        admin.BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=entries), timeout=300)


class Reader:
    """An agent's Sync stream, applied to a real agent Cache on a thread."""

    def __init__(self, srv: RunningServer, agent: Agent) -> None:
        options = {"grpc.max_receive_message_length": 4 * 1024 * 1024}
        self.stream = srv.node_stub(agent, **options).Sync(node_pb2.SyncRequest(), timeout=3600)
        self.cache = Cache()
        self.ready = threading.Event()
        self.applied: queue.Queue[tuple[float, frozenset[str]]] = queue.Queue()
        self.messages = 0
        self.largest = 0
        self.snapshot_seconds = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        started = time.perf_counter()
        parts: list[SyncState] = []
        with contextlib.suppress(grpc.RpcError):
            for update in self.stream:
                self.messages += 1
                self.largest = max(self.largest, update.ByteSize())
                if update.kind == node_pb2.SyncUpdate.SNAPSHOT:
                    parts.append(sync_state(update))
                    if not update.more:
                        self.cache.apply_sync(join_parts(parts))
                        parts = []
                        self.snapshot_seconds = time.perf_counter() - started
                        self.ready.set()
                    continue
                delta = sync_delta(update)
                self.cache.apply_delta(delta)
                self.applied.put((time.perf_counter(), frozenset(e.id for e in delta.upserts)))


def _loop_cpu(srv: RunningServer) -> float:
    async def read() -> float:
        return time.thread_time()

    return float(srv.call(read()))


def _cpu_per_unrelated_write(srv: RunningServer, other: str) -> float:
    admin = srv.admin()
    entry = common_pb2.Entry(
        parent_id=other, selectors=[common_pb2.Selector(type="unix", value="uid:1")]
    )
    before = _loop_cpu(srv)
    for n in range(WRITES):
        entry.spiffe_id = f"{TD}/unrelated/{n}"
        created = admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=10).entry
        admin.DeleteEntry(admin_pb2.DeleteEntryRequest(id=created.id), timeout=10)
    return (_loop_cpu(srv) - before) / (2 * WRITES)


def test_unrelated_write_cpu_and_entry_to_svid_at_100k(
    benchmark: Any, table: Table, srv: RunningServer
) -> None:
    agent = srv.attest()
    other = f"{TD}/svid/agent/join_token/not-connected"
    srv.create_entry("/one", agent.spiffe_id)
    small = Reader(srv, agent)
    assert small.ready.wait(60)
    _cpu_per_unrelated_write(srv, other)  # warm-up
    cpu_small = _cpu_per_unrelated_write(srv, other)
    small.stream.cancel()

    _create(srv, agent.spiffe_id, HELD, "held")
    big = Reader(srv, agent)
    assert big.ready.wait(600)
    assert big.cache.counts()[0] == HELD + 1
    cpu_big = _cpu_per_unrelated_write(srv, other)

    node = srv.node_stub(agent)
    samples: list[float] = []
    for n in range(SAMPLES):
        started = time.perf_counter()
        entry = srv.create_entry(f"/fresh/{n}", agent.spiffe_id)
        while True:
            _, ids = big.applied.get(timeout=30)
            if entry.id in ids:
                break
        results = node.BatchNewX509SVID(
            node_pb2.BatchNewX509SVIDRequest(
                params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=make_csr()[1])]
            ),
            timeout=30,
        ).results
        assert results[0].cert_chain
        samples.append(time.perf_counter() - started)
    big.stream.cancel()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    table.add(
        value_row("server loop CPU per unrelated write, 1 entry held (ms)", cpu_small * 1e3, ""),
        value_row(
            f"server loop CPU per unrelated write, {HELD:,} entries held (ms)", cpu_big * 1e3, ""
        ),
        value_row(
            "unrelated write CPU: 100k held / 1 held",
            cpu_big / cpu_small,
            "x",
            goal=at_most(2.0),
            note="CreateEntry + DeleteEntry for an agent that is not connected",
        ),
        latency_row(
            f"entry -> SVID, {HELD:,} entries on the agent (Sync delta)",
            samples,
            goal=at_most(1000.0, "p99"),
            note="CreateEntry -> delta applied to an agent Cache -> BatchNewX509SVID",
        ),
        value_row(f"Sync snapshot of {HELD:,} entries: seconds", big.snapshot_seconds, ""),
        value_row(f"Sync snapshot of {HELD:,} entries: largest message", float(big.largest), "B"),
    )
    print(
        f"\n[bench] unrelated write loop CPU: {cpu_small * 1e6:.0f} us (1 held), "
        f"{cpu_big * 1e6:.0f} us ({HELD:,} held), ratio {cpu_big / cpu_small:.2f}; "
        f"entry->SVID p50 {sorted(samples)[len(samples) // 2] * 1000:.1f} ms, "
        f"p99 {sorted(samples)[int(len(samples) * 0.99) - 1] * 1000:.1f} ms; snapshot "
        f"{big.snapshot_seconds:.2f} s, largest message {big.largest:,} B"
    )

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
- Sync heartbeats: the server loop's CPU per heartbeat with 1,000 streams asking for them, and
  heartbeats per second of loop CPU as a ratio to the physical limit measured in the same
  rounds: a bare grpc.aio server on its own loop, over TLS, sending the same prebuilt message
  on as many streams, a tenth at a time, each stream's handler woken by an asyncio.Event (its
  write, its wake-up and grpc's own work are what a heartbeat cannot do without). Goal >= 0.8.
  The readers are a process of their own; 4 streams a connection (an agent's cap). Loop CPU
  is time.thread_time read on each server's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_attestor.cache import Cache, SyncState, join_parts
from agent_attestor.node_client import sync_delta, sync_state
from bench.report import Rounds, Table, at_least, at_most, latency_row, rounds, value_row
from server.propagation import HEARTBEAT_SLICES, MAX_STREAMS_PER_AGENT
from svid._proto import admin_pb2, common_pb2, node_pb2
from tests.server.fixtures import (
    PEM,
    Agent,
    RunningServer,
    bundle_pem,
    key_pem,
    make_csr,
    short_tmpdir,
    start_server,
    write_tls_files,
)
from tests.waits import wait_for

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


# -- heartbeats -------------------------------------------------------------------------------

BEAT_STREAMS = 1000
BEAT_INTERVAL = 1.0  # a tenth of the streams every 0.1 s: 1,000 heartbeats a second
BEAT_WINDOW = 2.0
# One channel per agent, holding as many streams as an agent may.
BEAT_STREAMS_PER_AGENT = MAX_STREAMS_PER_AGENT
BARE_METHOD = "/bench.Beat/Beat"

# The readers, in a process of their own: reading 1,000 streams, in the servers' process they
# would take the GIL from the loops measured and their garbage would be collected on them.
_BEAT_READERS = textwrap.dedent(
    """
    import asyncio, json, sys, grpc

    async def main():
        spec = json.load(open(sys.argv[1]))
        counted = [0]

        async def read(call):
            async for _ in call:
                counted[0] += 1

        calls = []
        for creds in spec["channels"]:
            credentials = grpc.ssl_channel_credentials(
                creds["ca"].encode(),
                creds.get("key", "").encode() or None,
                creds.get("chain", "").encode() or None,
            )
            options = [("grpc.ssl_target_name_override", spec["name"])]
            channel = grpc.aio.secure_channel(spec["target"], credentials, options=options)
            open_stream = channel.unary_stream(spec["method"])
            for _ in range(spec["per_channel"]):
                calls.append(asyncio.ensure_future(read(open_stream(bytes.fromhex(spec["request"])))))
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.readline():
            print(counted[0], flush=True)

    asyncio.run(main())
    """
)


class BeatReaders:
    """A process holding `per_channel` streams on each of `channels`, counting what comes."""

    def __init__(self, root: Path, name: str, spec: dict[str, Any]) -> None:
        script = root / "beat_readers.py"
        script.write_text(_BEAT_READERS)
        (root / f"{name}.json").write_text(json.dumps(spec))
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(root / f"{name}.json")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def count(self) -> int:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class BareBeats:
    """The physical limit: a bare grpc.aio server on its own loop, over TLS, sending one
    prebuilt message on each stream in turn, a tenth of them at a time, as Propagator beats."""

    def __init__(self, root: Path, message: bytes, interval: float) -> None:
        self.ca, cert, key = write_tls_files(root)
        self.message = message
        self.interval = interval
        self.slices: list[set[asyncio.Event]] = [set() for _ in range(HEARTBEAT_SLICES)]
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        self.server, self.port = self.call(self._start(creds))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, creds: grpc.ServerCredentials) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        handler = grpc.unary_stream_rpc_method_handler(self._beats)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Beat", {"Beat": handler}),)
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        self._ticks = asyncio.ensure_future(self._tick())
        return server, port

    async def _beats(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        wake = asyncio.Event()
        self.slices[min(range(HEARTBEAT_SLICES), key=lambda n: len(self.slices[n]))].add(wake)
        while True:
            await wake.wait()
            wake.clear()
            yield self.message

    async def _tick(self) -> None:
        turn = 0
        while True:
            await asyncio.sleep(self.interval / HEARTBEAT_SLICES)
            for wake in self.slices[turn]:
                wake.set()
            turn = (turn + 1) % HEARTBEAT_SLICES

    def stop(self) -> None:
        async def stop() -> None:
            self._ticks.cancel()
            await self.server.stop(0)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


def _per_loop_cpu_second(cpu: Callable[[], float], readers: BeatReaders) -> float:
    """Messages the readers got per second of the server loop's CPU, over one window."""
    cpu0, got0 = cpu(), readers.count()
    time.sleep(BEAT_WINDOW)
    cpu1, got1 = cpu(), readers.count()
    return (got1 - got0) / max(1e-9, cpu1 - cpu0)


def test_heartbeat_cpu_vs_bare_grpc(benchmark: Any, table: Table) -> None:
    root = short_tmpdir()
    (root / "svidd").mkdir()
    srv = start_server(root / "svidd", sync_heartbeat_interval=BEAT_INTERVAL)
    heartbeat = node_pb2.SyncUpdate(
        kind=node_pb2.SyncUpdate.HEARTBEAT, heartbeat_interval_ms=round(BEAT_INTERVAL * 1000)
    )
    bare = BareBeats(root, heartbeat.SerializeToString(), BEAT_INTERVAL)
    readers: list[BeatReaders] = []
    try:
        agents = [srv.attest() for _ in range(BEAT_STREAMS // BEAT_STREAMS_PER_AGENT)]
        svidd = BeatReaders(
            root,
            "svidd",
            {
                "target": srv.runtime.node_address,
                "name": "svid-server",
                "method": "/svid.node.v1.Node/Sync",
                "request": node_pb2.SyncRequest(heartbeats=True).SerializeToString().hex(),
                "per_channel": BEAT_STREAMS_PER_AGENT,
                "channels": [
                    {
                        "ca": bundle_pem(a.bundle).decode(),
                        "key": key_pem(a.key).decode(),
                        "chain": b"".join(c.public_bytes(PEM) for c in a.chain).decode(),
                    }
                    for a in agents
                ],
            },
        )
        readers.append(svidd)
        plain = BeatReaders(
            root,
            "bare",
            {
                "target": f"127.0.0.1:{bare.port}",
                "name": "localhost",
                "method": BARE_METHOD,
                "request": "",
                "per_channel": BEAT_STREAMS_PER_AGENT,
                "channels": [{"ca": bare.ca.read_text()}]
                * (BEAT_STREAMS // BEAT_STREAMS_PER_AGENT),
            },
        )
        readers.append(plain)
        # Every stream open and beating: each has had its first heartbeat and a few more.
        wait_for(lambda: svidd.count() >= 3 * BEAT_STREAMS, 60, "the svidd streams to beat", 0.2)
        wait_for(lambda: plain.count() >= 3 * BEAT_STREAMS, 60, "the bare streams to beat", 0.2)

        def loop_cpu(call: Callable[[Any], Any]) -> Callable[[], float]:
            async def read() -> float:
                return time.thread_time()

            return lambda: float(call(read()))

        measured = Rounds(
            {
                "svidd": lambda: _per_loop_cpu_second(loop_cpu(srv.call), svidd),
                "bare": lambda: _per_loop_cpu_second(loop_cpu(bare.call), plain),
            },
            rounds(5),
        )
    finally:
        for r in readers:
            r.stop()
        bare.stop()
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    us = 1e6 / measured.rate("svidd")
    bare_us = 1e6 / measured.rate("bare")
    table.add(
        value_row(f"server loop CPU per Sync heartbeat, {BEAT_STREAMS:,} streams (us)", us, ""),
        value_row(
            f"bare grpc.aio loop CPU per prebuilt message, {BEAT_STREAMS:,} streams (us)",
            bare_us,
            "",
        ),
        measured.ratio_row(
            "heartbeats per loop CPU second / bare grpc.aio's messages",
            "svidd",
            "bare",
            goal=at_least(0.8),
            note=f"{BEAT_STREAMS:,} TLS streams, {BEAT_STREAMS_PER_AGENT} a connection, a "
            f"tenth every {BEAT_INTERVAL / HEARTBEAT_SLICES:g} s",
        ),
    )
    print(f"\n[bench] heartbeat loop CPU: {us:.1f} us (bare grpc.aio {bare_us:.1f} us)")

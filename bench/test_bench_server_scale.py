"""The server at scale (issue 13), against real `svid-server run` processes: admin API over its
Unix socket (BatchCreateEntry), agents attested with join tokens, Sync streams held open by light
clients (one asyncio loop in this process, each stream drained and counted, nothing applied).

Rows (sizes from the SVIDD_SERVER_SCALE_* variables below; `make bench` runs the small ones,
`make bench-scale` the issue's full sizes):

- server CPU per unrelated write, with one connected agent holding 1 / 1k / 10k / 100k entries:
  the ms of the server process's CPU (/proc/<pid>/stat utime + stime) per CreateEntry for a
  second agent (the "witness"), whose Sync stream is how we know the write went through. Writes
  are paced (the next one after the witness saw the last), then the server is left to go quiet,
  so no wake-up of the big agent's stream is coalesced away; the idle rate measured just before is
  subtracted. Judged: the ratio of the largest size to 1 entry, goal <= 2x. For reference, the
  same writes once that agent's stream is closed (the entries stay in the trust domain).
- the same with 10 / 100 / 1,000 light agents connected (each holding 10 entries), plus the
  server's RSS with them connected.
- server RSS per entry with N entries in the trust domain (100k and 1M): (RSS after start with N
  entries - RSS after start with none) / N, each in a fresh server process, after it answered
  ListEntries for one page (so it has loaded what it loads at start). The entries are bulk-loaded
  by writing the SQLite datastore before the server starts, through the datastore's own
  `SqliteDataStore.create_entries` in transactions of 10,000 (so rows are exactly what the server
  writes, without 1,000 admin round trips and their audit events: 1M through the admin API is
  ten times the 100k row of test_bench_admin.py, and grows with every entry already held). Goal
  <= 2 KB per entry.
- a real `svid-agent run` process holding 1k / 10k / 100k entries (its own, selectors no local
  process matches, so they only cost it prefetching): entry -> SVID p99, from the CreateEntry ack
  to the SVID on an already open FetchX509SVID stream (>= 100 samples; goal p99 <= 1 s); and agent
  restart -> all SVIDs ready (SIGTERM, start again on the same data dir; from the start to the
  agent's `svid_agent_x509_svids` gauge reaching min(entries, max_prefetched_svids) with
  `svid_agent_entries` at every entry and /healthz answering 200 (synced: a restarted agent
  holds its saved SVIDs at once and serves them after its first Sync message); the default cap
  is 20k, so at 100k "all ready" means the 20k it prefetches, the rest are minted on demand;
  goal <= 30 s). For reference, the time from the last BatchCreate ack to the first fill (the
  agent starts prefetching while the batches are still arriving, so this is shorter than a fill
  from nothing).
- workloads per agent at a 5-minute TTL (100 / 1k / 10k; `make bench-scale` only, 3 minutes
  each): a real agent holding W entries with TTL 300 s, every SVID held; then agent and server
  process CPU over the next 175 s, in which each SVID renews once (at 1/2 of its life +-10 %).
  Renewals are counted from the server's credential records (read-only SQLite), at least 90 % of
  W or the test fails. Agent CPU per renewal -> workloads per agent core (150 s / that; goal >=
  10k), and server CPU per renewal. No workload streams are open (one test process cannot be W
  distinct callers; bench/test_bench_agent_scale.py has in-process figures with a stream each),
  and the idle CPU of both processes is inside the figure.
- 100k entries through the batch API: bench/test_bench_admin.py (in `make bench`), not repeated.

Today's Sync sends full state on every change, so one SyncUpdate for 100k entries is ~15 MB: the
bench raises the server's max_message_bytes to 64 MiB so the O(entries) cost can be measured at
all (with the default 4 MiB, by our estimate of ~160 B per entry, the stream of an agent holding
more than ~25k entries fails). The machine is shared (2 cores, other engineers' runs): numbers
vary run to run.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import sqlite3
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import tests.e2e.conftest as e2e
from agent_attestor.config import AgentConfig
from bench.report import Row, Table, at_least, at_most, latency_row, percentile, value_row
from server.datastore.records import Entry, Selector
from server.datastore.sqlite import SqliteDataStore
from svid._clock import SystemClock
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc, workload_pb2
from tests.e2e.agent_process import HEADER, AgentProcess
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.test_server_cli import attest
from tests.ports import free_port
from tests.server.fixtures import TLS_NAME

pytestmark = pytest.mark.timeout(3600)


def _sizes(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(n) for n in os.environ.get(name, default).split(",") if n.strip())


# `make bench` defaults; `make bench-scale` sets the sizes.
HELD = _sizes("SVIDD_SERVER_SCALE_HELD", "1,1000,10000")  # entries of the connected agent
AGENTS = _sizes("SVIDD_SERVER_SCALE_AGENTS", "10,100")  # light Sync clients
TOTALS = _sizes("SVIDD_SERVER_SCALE_TOTALS", "100000")  # entries in the trust domain (RSS)
ON_AGENT = _sizes("SVIDD_SERVER_SCALE_ON_AGENT", "1000")  # entries on a real agent
WORKLOADS = _sizes("SVIDD_SERVER_SCALE_WORKLOADS", "")  # renewals on a real agent (3 min each)

TD = f"spiffe://{TRUST_DOMAIN}"
KB = 1024
BATCH = 1000
MAX_MESSAGE = 64 * 1024 * 1024
WRITES = (10, 100)  # unrelated writes per size: at least, at most
WRITE_BUDGET = 45.0  # seconds of writing per size, after the minimum
ROUNDS = 5  # the writes of a size fall in this many rounds, for the spread
PROBES = 100  # entry -> SVID samples (a p99 needs 100)
PROBE_BUDGET = 300.0
TTL = 300  # the workload X.509-SVID TTL of the renewal rows (the server's default)
RENEW_WINDOW = 175.0  # renewal at 1/2 of life +-10 %: every SVID renews once in this window
GOAL_WORKLOADS_PER_CORE = 10_000
CAP = AgentConfig().max_prefetched_svids
UID = f"uid:{os.getuid()}"
TICK = os.sysconf("SC_CLK_TCK")


# -- the server process, seen from /proc -----------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def settle(pid: int, timeout: float = 120.0) -> None:
    """Wait until the process uses (almost) no CPU for half a second: its work is done."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now - last <= 2 / TICK:
            return
        last = now
    raise TimeoutError(f"the server did not go quiet within {timeout:g} s")


def idle_rate(pid: int, seconds: float = 1.0) -> float:
    """CPU seconds per second of the quiet server (timers, keepalives)."""
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


# -- the stack -------------------------------------------------------------------------------


class Stack:
    """A `svid-server run` process and its admin API."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = make_server(root, log_level="warning", max_message_bytes=MAX_MESSAGE)
        self.server.start()
        self.channel = grpc.insecure_channel(f"unix:{self.server.admin_socket}")
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.bundle = self.server.cli("bundle", "show").stdout.encode()
        self._serial = 0

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def token(self) -> str:
        return str(self.admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest()).token)

    def entries(self, parent: str, count: int, selector: str = "") -> list[common_pb2.Entry]:
        """`count` new entries under `parent`, each with a selector of its own."""
        out = []
        for _ in range(count):
            self._serial += 1
            n = self._serial
            value = selector or f"uid:{100_000 + n}"
            out.append(
                common_pb2.Entry(
                    spiffe_id=f"{TD}/scale/w{n}",
                    parent_id=parent,
                    selectors=[common_pb2.Selector(type="unix", value=value)],
                )
            )
        return out

    def create(self, entries: list[common_pb2.Entry]) -> None:
        for start in range(0, len(entries), BATCH):
            request = admin_pb2.BatchCreateEntryRequest(entries=entries[start : start + BATCH])
            results = self.admin.BatchCreateEntry(request, timeout=300).results
            refused = [r.status.message for r in results if r.status.code]
            assert not refused, refused[:3]

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


@pytest.fixture
def stack() -> Iterator[Stack]:
    root = short_tmpdir()
    stack: Stack | None = None
    try:
        stack = Stack(root)
        yield stack
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(root, ignore_errors=True)


class LightAgents:
    """Agents attested with join tokens, each with a Sync stream open on one asyncio loop in a
    thread; a stream only counts the messages it gets."""

    def __init__(self, stack: Stack, count: int) -> None:
        self.agents = [attest(stack.server, stack.token(), stack.bundle) for _ in range(count)]
        self.messages = [0] * count
        self.errors: list[str] = []
        self._address = stack.server.runtime["node_address"]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._tasks = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(120)
        wait_for(lambda: all(self.messages), 120, "every light agent's first Sync message")

    @property
    def ids(self) -> list[str]:
        return [a.spiffe_id for a in self.agents]

    async def _open(self) -> list[asyncio.Task[None]]:
        options = (*TLS_NAME, ("grpc.max_receive_message_length", -1))
        self._channels = [
            grpc.aio.secure_channel(self._address, a.credentials(), options=options)
            for a in self.agents
        ]
        return [asyncio.create_task(self._drain(i, ch)) for i, ch in enumerate(self._channels)]

    async def _drain(self, i: int, channel: grpc.aio.Channel) -> None:
        try:
            async for _ in node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest()):
                self.messages[i] += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"{exc.code().name}: {exc.details()}")

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(ch.close() for ch in self._channels))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def cpu_per_write(stack: Stack) -> tuple[list[float], int]:
    """Server CPU ms per write that concerns none of the connected agents but a fresh witness,
    in `ROUNDS` rounds (the mean of each): paced by the witness's Sync stream, the server let go
    quiet before and after each round, its idle rate subtracted."""
    witness = LightAgents(stack, 1)
    per_round: list[float] = []
    writes = 0
    try:
        settle(stack.pid)
        idle = idle_rate(stack.pid)
        started = time.monotonic()
        for turn in range(ROUNDS):
            before, began, count = cpu_seconds(stack.pid), time.monotonic(), 0
            while count < WRITES[1] // ROUNDS:
                seen = witness.messages[0]
                entry = stack.entries(witness.ids[0], 1)[0]
                stack.admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=120)
                wait_for(lambda s=seen: witness.messages[0] > s, 120, "the witness's update")
                count += 1
                spent = time.monotonic() - started
                if count >= WRITES[0] // ROUNDS and spent > WRITE_BUDGET * (turn + 1) / ROUNDS:
                    break
            settle(stack.pid)
            used = cpu_seconds(stack.pid) - before - idle * (time.monotonic() - began)
            per_round.append(max(used, 0.0) / count * 1000)
            writes += count
        assert not witness.errors, witness.errors
    finally:
        witness.close()
    return per_round, writes


def _write_row(what: str, per_round: list[float], writes: int, note: str) -> Row:
    return Row(
        what,
        statistics.median(per_round),
        "ms",
        per_round=tuple(per_round),
        n=writes,
        n_of="writes",
        note=note,
    )


# -- rows ------------------------------------------------------------------------------------


def test_cpu_per_write_vs_entries_held(benchmark: Any, table: Table, stack: Stack) -> None:
    held = LightAgents(stack, 1)
    try:
        per_write: dict[int, list[float]] = {}
        have = 0
        for n in sorted(HELD):
            stack.create(stack.entries(held.ids[0], n - have))
            have = n
            per_round, writes = cpu_per_write(stack)
            assert not held.errors, held.errors
            per_write[n] = per_round
            row = _write_row(
                f"server CPU per unrelated write, agent holding {n:,} entries",
                per_round,
                writes,
                "median of per-round means; /proc utime+stime, idle subtracted",
            )
            print(f"\n[bench] agent holding {n:,} entries: {row.value:.1f} ms CPU per write")
            table.add(row)
        rss = rss_bytes(stack.pid)
        # The same entries with their agent gone: what the domain's size alone costs a write.
        held.close()
        gone, gone_writes = cpu_per_write(stack)
    finally:
        held.close()
    small, large = min(per_write), max(per_write)
    table.add(
        _write_row(
            f"server CPU per unrelated write, {large:,} entries, their agent disconnected",
            gone,
            gone_writes,
            "for reference: the entries' count alone, no stream holding them",
        )
    )
    if large > small:
        pairs = zip(per_write[small], per_write[large], strict=True)
        ratios = [b / a if a else math.nan for a, b in pairs]
        table.add(
            Row(
                f"CPU per write: {large:,} entries held / {small:,}",
                statistics.median(ratios),
                "x",
                at_most(2.0),
                tuple(ratios),
                ROUNDS,
                note="per-round ratio; issue goal <= 2x from 1 to 100k (`make bench-scale`)",
            ),
            value_row(f"server RSS, agent holding {large:,} entries", rss, "B"),
        )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_cpu_per_write_vs_connected_agents(benchmark: Any, table: Table, stack: Stack) -> None:
    baseline = rss_bytes(stack.pid)
    table.add(value_row("server RSS, no agent connected", baseline, "B"))
    connected: list[LightAgents] = []
    try:
        have = 0
        for count in sorted(AGENTS):
            group = LightAgents(stack, count - have)
            connected.append(group)
            # In batches of 1,000 (100 agents' entries each): one wake-up of every stream per
            # batch, not per agent.
            stack.create([e for a in group.ids for e in stack.entries(a, 10)])
            have = count
            per_round, writes = cpu_per_write(stack)
            assert not any(g.errors for g in connected), [g.errors for g in connected]
            rss = rss_bytes(stack.pid)
            row = _write_row(
                f"server CPU per unrelated write, {count:,} agents connected",
                per_round,
                writes,
                "light Sync clients, 10 entries each; median of per-round means",
            )
            print(f"\n[bench] {count} agents: {row.value:.1f} ms per write, RSS {rss:,} B")
            table.add(
                row,
                value_row(
                    f"server RSS, {count:,} agents connected",
                    rss,
                    "B",
                    note=f"{(rss - baseline) / count / KB:,.0f} KB per agent over none",
                ),
            )
    finally:
        for group in connected:
            group.close()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _bulk_load(path: Path, total: int) -> None:
    """Write `total` entries into the datastore file with the datastore's own code."""
    store = SqliteDataStore(path, SystemClock())
    try:
        chunk = 10_000
        for start in range(0, total, chunk):
            store.create_entries(
                [
                    Entry(
                        id="",
                        spiffe_id=f"{TD}/bulk/w{n}",
                        parent_id=f"{TD}/svid/agent/join_token/bulk{n % 1000}",
                        selectors=(Selector("unix", f"uid:{n}"),),
                    )
                    for n in range(start, min(total, start + chunk))
                ]
            )
    finally:
        store.close()


def _started_rss(server: ServerProcess) -> int:
    server.start()
    with grpc.insecure_channel(f"unix:{server.admin_socket}") as channel:
        admin_pb2_grpc.AdminStub(channel).ListEntries(
            admin_pb2.ListEntriesRequest(page_size=10), timeout=120
        )
    assert server.proc is not None
    settle(server.proc.pid)
    return rss_bytes(server.proc.pid)


@pytest.mark.parametrize("total", TOTALS)
def test_server_rss_per_entry(
    benchmark: Any, table: Table, monkeypatch: pytest.MonkeyPatch, total: int
) -> None:
    # Loading 1M entries at start takes longer than the e2e helpers' 30 s.
    monkeypatch.setattr(e2e, "START_TIMEOUT", 900.0)
    root = short_tmpdir()
    server = make_server(root, log_level="warning", max_message_bytes=MAX_MESSAGE)
    try:
        empty = _started_rss(server)  # also creates the datastore, keys and schema
        server.stop()
        started = time.perf_counter()
        _bulk_load(server.data_dir / "datastore.sqlite3", total)
        load = time.perf_counter() - started
        start = time.perf_counter()
        full = _started_rss(server)
        start_s = time.perf_counter() - start
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    per_entry = (full - empty) / total
    print(
        f"\n[bench] {total:,} entries: RSS {full:,} B ({empty:,} B empty) = {per_entry:,.0f} B "
        f"per entry; bulk load {load:.0f} s, server start + first page {start_s:.1f} s"
    )
    table.add(
        value_row(
            f"server RSS per entry, {total:,} entries in the trust domain",
            per_entry,
            "B",
            goal=at_most(2 * KB),
            note=f"(RSS - {empty / KB / KB:.0f} MB empty) / N; bulk-loaded in the datastore",
        ),
        value_row(
            f"server start with {total:,} entries, to its first ListEntries page",
            start_s * 1000,
            "ms",
        ),
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _gauges(address: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("svid_agent_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _ready(address: str, entries: int, svids: int) -> bool:
    g = _gauges(address)
    return g.get("svid_agent_entries", 0) >= entries and g.get("svid_agent_x509_svids", 0) >= svids


def _serving(address: str) -> bool:
    """/healthz answers 200 once the agent serves: after a restart, its saved SVIDs are held
    at once but served only once the server's first Sync message has caught them up."""
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as reply:
            return bool(reply.status == 200)
    except OSError:  # 503 (HTTPError) before then, or not listening yet
        return False


@pytest.mark.parametrize("n", ON_AGENT)
def test_real_agent_holding_entries(benchmark: Any, table: Table, stack: Stack, n: int) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    agent = AgentProcess(stack.root, stack.server, stack.token())
    flags = ("--log-level", "warning", "--metrics-address", metrics)
    stream: Any = None
    try:
        agent.start(*flags)
        agent_id = agent.agent_id()
        base = stack.entries(agent_id, 1, UID)
        stack.create(base + stack.entries(agent_id, n - 1))
        want = min(n, CAP)
        started = time.perf_counter()
        wait_for(lambda: _ready(metrics, n, want), 900, f"{want:,} SVIDs", interval=0.5)
        first_fill = time.perf_counter() - started
        stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
        have = {s.spiffe_id for s in next(stream).svids}
        latencies: list[float] = []
        probe_started = time.monotonic()
        while len(latencies) < PROBES and time.monotonic() - probe_started < PROBE_BUDGET:
            entry = stack.entries(agent_id, 1, UID)[0]
            began = time.perf_counter()
            stack.admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=120)
            while entry.spiffe_id not in have:
                have = {s.spiffe_id for s in next(stream).svids}
            latencies.append(time.perf_counter() - began)
        stream.cancel()
        stream = None
        # Restart: the same data dir, so the agent comes back with its identity.
        total = n + len(latencies)
        agent.stop()
        started = time.perf_counter()
        agent.start(*flags)
        wait_for(
            lambda: _ready(metrics, total, min(total, CAP)) and _serving(metrics),
            900,
            "restart",
            interval=0.2,
        )
        restart = time.perf_counter() - started
    finally:
        if stream is not None:
            stream.cancel()
        agent.stop()
    complete = len(latencies) >= PROBES
    # Fewer than 100 samples in the budget: no p99, but a p50 already past the goal bounds it.
    slow = not complete and percentile([x * 1000 for x in latencies], 50) > 1000
    goal = at_most(1000, "p99") if complete else at_most(1000, "p50") if slow else None
    print(
        f"\n[bench] real agent, {n:,} entries: first fill {first_fill:.1f} s, {len(latencies)} "
        f"entry->SVID samples, restart -> ready {restart:.1f} s"
    )
    ready = f"{min(total, CAP):,} SVIDs" + (f" (cap {CAP:,})" if total > CAP else "")
    table.add(
        latency_row(
            f"real agent holding {n:,} entries: entry -> SVID",
            latencies,
            goal=goal,
            note="CreateEntry ack to the open FetchX509SVID stream"
            + ("" if complete else f"; only {len(latencies)} in {PROBE_BUDGET:g} s")
            + ("; judged on p50: p99 >= p50 > 1 s" if slow else ""),
        ),
        value_row(
            f"real agent holding {n:,} entries: restart -> all SVIDs ready",
            restart * 1000,
            "ms",
            goal=at_most(30_000),
            note=f"process start to {ready} held and served (metrics gauges, /healthz)",
        ),
        value_row(
            f"real agent, {n:,} entries created -> {min(n, CAP):,} SVIDs first held",
            first_fill * 1000,
            "ms",
            note="for reference: the first prefetch after BatchCreate",
        ),
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _credentials(stack: Stack, agent_id: str) -> int:
    """X.509-SVIDs the server recorded as issued to this agent (read-only, beside the server)."""
    path = stack.server.data_dir / "datastore.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        sql = "SELECT count(*) FROM credentials WHERE agent_id = ? AND kind LIKE 'x509%'"
        return int(db.execute(sql, (agent_id,)).fetchone()[0])


@pytest.mark.parametrize("w", WORKLOADS)
def test_real_agent_renewals_at_5_min_ttl(
    benchmark: Any, table: Table, stack: Stack, w: int
) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    agent = AgentProcess(stack.root, stack.server, stack.token())
    try:
        agent.start("--log-level", "warning", "--metrics-address", metrics)
        agent_id = agent.agent_id()
        entries = stack.entries(agent_id, w)
        for entry in entries:
            entry.x509_svid_ttl = TTL
        stack.create(entries)
        wait_for(lambda: _ready(metrics, w, min(w, CAP)), 900, f"{w:,} SVIDs", interval=0.5)
        assert agent.proc is not None
        apid = agent.proc.pid
        issued = _credentials(stack, agent_id)
        agent_before, server_before = cpu_seconds(apid), cpu_seconds(stack.pid)
        time.sleep(RENEW_WINDOW)
        assert _ready(metrics, w, min(w, CAP)), "SVIDs were lost during renewal"
        agent_used = cpu_seconds(apid) - agent_before
        server_used = cpu_seconds(stack.pid) - server_before
        renewals = _credentials(stack, agent_id) - issued
    finally:
        agent.stop()
    # Every SVID renews once in the window, counted by the server's own credential records.
    assert renewals >= 0.9 * min(w, CAP), f"{renewals} renewals of {min(w, CAP)} SVIDs"
    per_renewal = agent_used / renewals
    per_core = (TTL / 2) / per_renewal if per_renewal else math.inf
    print(
        f"\n[bench] real agent, {w:,} workloads at {TTL} s TTL: agent {per_renewal * 1000:.2f} ms, "
        f"server {server_used / renewals * 1000:.2f} ms CPU per renewal -> {per_core:,.0f} per core"
    )
    table.add(
        value_row(
            f"real agent, {w:,} workloads at 5 min TTL: workloads per agent core",
            per_core,
            "",
            goal=at_least(GOAL_WORKLOADS_PER_CORE),
            note=f"150 s / agent CPU per renewal; {renewals:,} renewed in {RENEW_WINDOW:g} s",
        ),
        value_row(
            f"real agent, {w:,} workloads at 5 min TTL: server CPU per renewal",
            server_used / renewals * 1000,
            "ms",
            note="server process CPU over the same window / SVIDs renewed",
        ),
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

"""Node agent at scale (issue 13), in process: the real Cache, Rotator and WorkloadApi servicer.

What is measured, per number of entries the agent serves (1k and 10k by default; `make
bench-scale` adds 100k):

- entry -> SVID p99: from the entry reaching the cache to the FetchX509SVID stream of a caller it
  matches yielding a message that carries it. Two ways in: the delta path (Cache.update_entries,
  what a Sync delta will call) and today's full-state Sync message (Cache.apply_sync with every
  entry). gRPC transport and the server are not in it (bench/test_bench_agent.py times the whole
  path through real processes).
- restart -> all SVIDs ready: a fresh cache is handed the full entry set and the rotation loop
  runs until every entry (or, with a cap, the capped number) holds an SVID.
- agent RSS per entry, with every SVID held (and with the default cap at 100k).
- first message for an entry beyond the cap (minted on demand), p99.
- workloads per agent core at a 5-minute TTL with every workload connected: W entries, each with
  its own selectors and its own open FetchX509SVID stream (an in-process consumer of the
  servicer's async generator, with a stub context: no sockets). The fake clock then walks
  through the renewal window (0.39 -> 0.61 of the lifetime) in 0.3 s steps, the rotation batch
  window, ticking the rotator each step; every SVID is renewed once and every stream sends one
  message. CPU time of that walk (process time, every thread) over W is the agent's cost per
  workload per renewal; each workload renews once per 150 s, so one core holds 150 s / that.

The signer is a fake: it signs real leaf certificates for the agent's CSRs with a local CA key,
and the time spent inside it is subtracted from every CPU and wall figure that says "agent".
Signing is the server's work (and its own benchmarks measure it); this file measures the agent.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_attestor.cache import Cache, SyncState
from agent_attestor.config import AgentConfig
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.model import Entry, Selector
from agent_attestor.peer import Caller, CallerRegistry, abstract_peer
from agent_attestor.rotation import Rotator, rotation_point
from agent_attestor.signer import MintedJwt, X509Result
from agent_attestor.workload_api import WorkloadApi
from svid._clock import FakeClock
from svid._proto import workload_pb2
from tests.agent_attestor.pki import FakeSigner, LocalCa

# 100k entries take minutes (mostly the fake signer): past the suite's per-test timeout.
pytestmark = pytest.mark.timeout(3600)

SIZES = tuple(int(n) for n in os.environ.get("SVIDD_SCALE_SIZES", "1000,10000").split(","))
WORKLOADS = tuple(int(n) for n in os.environ.get("SVIDD_SCALE_WORKLOADS", "1000,10000").split(","))
SAMPLES = 30
TTL = 300
KB = 1024
COMMON = Selector("unix", "uid:1000")  # every entry shares it: the index must not scan them all
# What issue 13 asks of the agent.
GOAL_ENTRY_TO_SVID = 1.0
GOAL_RESTART = 30.0
GOAL_WORKLOADS_PER_CORE = 10_000
GOAL_RSS_PER_ENTRY = 5 * KB
# The cap measured: the agent's default unless SVIDD_SCALE_CAP says otherwise.
CAP = int(os.environ.get("SVIDD_SCALE_CAP", AgentConfig().max_prefetched_svids))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _row(
    name: str, value: float, unit: str, baseline: str, ratio: float, *, goal: Any = None
) -> Any:
    return {
        "row": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "goal": goal,
    }


class TimedSigner:
    """FakeSigner that keeps count of the time spent signing (not the agent's)."""

    def __init__(self, ca: LocalCa) -> None:
        self.inner = FakeSigner(ca)
        self.seconds = 0.0  # wall time inside the signer
        self.cpu = 0.0  # CPU time of the signing thread inside it
        self.signed = 0

    async def batch_new_x509(self, params: list[tuple[str, bytes]]) -> list[X509Result]:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return await self.inner.batch_new_x509(params)
        finally:
            self.seconds += time.perf_counter() - started
            self.cpu += time.thread_time() - cpu
            self.signed += len(params)

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        return await self.inner.new_jwt(spiffe_id, audience, entry_id)


class StubContext:
    """What the servicer reads of a gRPC context: metadata, peer, abort."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("workload.spiffe.io", "true"),)

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


class Agent:
    """The agent's cache, rotator and Workload API servicer, as app.py wires them."""

    def __init__(self, n: int, cap: int = 0) -> None:
        self.clock = FakeClock(start=time.time())
        self.ca = LocalCa(self.clock, ttl=TTL)
        self.signer = TimedSigner(self.ca)
        self.cache = Cache()
        self.registry = CallerRegistry()
        self.rotator = Rotator(self.cache, self.signer, self.clock, max_prefetched=cap)
        self.api = WorkloadApi(
            self.cache,
            self.registry,
            JwtCache(self.signer, self.clock),
            self.clock,
            demand=self.rotator,
        )
        self.entries = [self.entry(i) for i in range(n)]
        self._callers = 0

    def entry(
        self, i: int, tag: str = "pod", selectors: frozenset[Selector] | None = None
    ) -> Entry:
        """Entry `i`; by default with selectors of its own (one pod each) plus the shared one."""
        eid = f"{tag}-{i}"
        sid = f"spiffe://example.org/ns/default/sa/{eid}"
        self.signer.inner.spiffe_ids[eid] = sid
        if selectors is None:
            selectors = frozenset({COMMON, Selector("k8s", f"pod-uid:{tag}-{i}")})
        return Entry(eid, sid, selectors, created_at=i)

    def state(self, extra: tuple[Entry, ...] = ()) -> SyncState:
        return SyncState(entries=(*self.entries, *extra), bundle=self.ca.bundle())

    def stream(self, selectors: frozenset[Selector]) -> AsyncIterator[Any]:
        """A workload's FetchX509SVID stream, served in process."""
        self._callers += 1
        peer = abstract_peer(f"bench-{self._callers}")
        # A uid each, as pods of their own: one uid's streams are capped (max_streams_per_uid).
        uid = 100_000 + self._callers
        self.registry.add(peer, Caller(peer, 1, uid, uid, selectors))
        return self.api.FetchX509SVID(workload_pb2.X509SVIDRequest(), StubContext(peer))  # type: ignore[no-any-return]


async def _until(predicate: Any, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.001)


async def _restart(agent: Agent, want: int) -> tuple[float, float]:
    """Wall seconds until `want` SVIDs are held, and the signer's share of them."""
    started = time.perf_counter()
    agent.cache.apply_sync(agent.state())
    await _until(lambda: agent.cache.counts()[1] >= want, 600)
    return time.perf_counter() - started, agent.signer.seconds


async def _entry_to_svid(agent: Agent, full_state: bool) -> list[float]:
    """Per new entry: seconds until the open stream of a caller it matches carries it."""
    tag = "full" if full_state else "delta"
    probe = frozenset({COMMON, Selector("bench", f"probe-{tag}")})
    base = agent.entry(0, f"{tag}-base", probe)
    agent.cache.update_entries([base], [])
    stream = agent.stream(probe)
    await asyncio.wait_for(anext(stream), 30)  # the stream is open and has its first message
    added = [base]
    latencies: list[float] = []
    for i in range(SAMPLES):
        entry = agent.entry(len(agent.entries) + i, tag, probe)
        added.append(entry)
        started = time.perf_counter()
        if full_state:
            agent.cache.apply_sync(agent.state(tuple(added)))
        else:
            agent.cache.update_entries([entry], [])
        while True:
            msg = await asyncio.wait_for(anext(stream), 30)
            if entry.spiffe_id in {s.spiffe_id for s in msg.svids}:
                break
        latencies.append(time.perf_counter() - started)
    await stream.aclose()  # type: ignore[attr-defined]
    return latencies


async def _cold_first_messages(agent: Agent, cold: list[Entry]) -> list[float]:
    latencies: list[float] = []
    for entry in cold[:SAMPLES]:
        stream = agent.stream(entry.selectors)
        started = time.perf_counter()
        msg = await asyncio.wait_for(anext(stream), 30)
        latencies.append(time.perf_counter() - started)
        assert [s.spiffe_id for s in msg.svids] == [entry.spiffe_id]
        await stream.aclose()  # type: ignore[attr-defined]
    return latencies


def measure(n: int, cap: int) -> dict[str, Any]:
    """One agent of `n` entries from its restart on; run in a fresh interpreter (fresh_process),
    so its RSS is its own and not what earlier runs freed."""

    async def warm_up() -> None:
        # One-time costs (thread pool, OpenSSL tables, lazily imported modules) are not per entry.
        spare = Agent(200)
        loop = asyncio.create_task(spare.rotator.run())
        await _restart(spare, 200)
        loop.cancel()

    asyncio.run(warm_up())
    gc.collect()
    rss_before = _rss()
    agent = Agent(n, cap)

    async def scenario() -> dict[str, Any]:
        loop = asyncio.create_task(agent.rotator.run())
        try:
            wall, signing = await _restart(agent, min(n, cap or n))
            gc.collect()
            got: dict[str, Any] = {
                "wall": wall,
                "agent": wall - signing,
                "rss": (_rss() - rss_before) / n,
            }
            if cap:
                cold = [e for e in agent.entries if agent.cache.svid(e.id) is None]
                got["first"] = await _cold_first_messages(agent, cold)
            else:
                got["delta"] = await _entry_to_svid(agent, full_state=False)
                got["full"] = await _entry_to_svid(agent, full_state=True)
        finally:
            loop.cancel()
        return got

    return asyncio.run(scenario())


def fresh_process(n: int, cap: int) -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    code = (
        "import json, sys; sys.path[:0] = sys.argv[1:3]; "
        "from test_bench_agent_scale import measure; "
        "print(json.dumps(measure(int(sys.argv[3]), int(sys.argv[4]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(here.parent), str(here), str(n), str(cap)],
        check=True,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("n", SIZES)
def test_agent_scale(benchmark: Any, n: int) -> None:
    got = fresh_process(n, 0)
    rows = [
        _row(
            f"agent {n:,} entries: entry -> SVID p99 (delta)",
            _pct(got["delta"], 99) * 1000,
            "ms",
            "1 s goal",
            GOAL_ENTRY_TO_SVID / _pct(got["delta"], 99),
            goal=1.0,
        ),
        _row(
            f"agent {n:,} entries: entry -> SVID p99 (full-state Sync)",
            _pct(got["full"], 99) * 1000,
            "ms",
            "1 s goal",
            GOAL_ENTRY_TO_SVID / _pct(got["full"], 99),
            goal=1.0,
        ),
        _row(
            f"agent {n:,} entries: restart -> all SVIDs ready, agent only",
            got["agent"],
            "s",
            "30 s goal",
            GOAL_RESTART / got["agent"],
            goal=1.0,
        ),
        _row(
            f"agent {n:,} entries: restart -> all SVIDs ready, with fake signer",
            got["wall"],
            "s",
            "30 s goal",
            GOAL_RESTART / got["wall"],
        ),
        _row(
            f"agent {n:,} entries: RSS per entry (every SVID held)",
            got["rss"],
            "B",
            "5 KB goal",
            GOAL_RSS_PER_ENTRY / got["rss"],
            goal=1.0,
        ),
    ]
    print(
        f"\n{n:,} entries: entry->SVID p50/p99 delta {_pct(got['delta'], 50) * 1000:.1f}/"
        f"{_pct(got['delta'], 99) * 1000:.1f} ms, full-state {_pct(got['full'], 50) * 1000:.1f}/"
        f"{_pct(got['full'], 99) * 1000:.1f} ms; restart {got['wall']:.1f} s "
        f"({got['agent']:.1f} s agent); RSS {got['rss']:,.0f} B/entry"
    )
    benchmark.extra_info["rows"] = rows
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("n", [n for n in SIZES if n > CAP])
def test_agent_scale_with_default_cap(benchmark: Any, n: int) -> None:
    got = fresh_process(n, CAP)
    p99 = _pct(got["first"], 99)
    benchmark.extra_info["rows"] = [
        _row(
            f"agent {n:,} entries, cap {CAP:,}: restart -> cap ready, agent only",
            got["agent"],
            "s",
            "30 s goal",
            GOAL_RESTART / got["agent"],
            goal=1.0,
        ),
        _row(
            f"agent {n:,} entries, cap {CAP:,}: RSS per entry",
            got["rss"],
            "B",
            "5 KB goal",
            GOAL_RSS_PER_ENTRY / got["rss"],
            goal=1.0,
        ),
        _row(
            f"agent {n:,} entries, cap {CAP:,}: first message beyond the cap p99",
            p99 * 1000,
            "ms",
            "100 ms",
            0.1 / p99,
        ),
    ]
    print(
        f"\n{n:,} entries, cap {CAP:,}: ready {got['wall']:.1f} s ({got['agent']:.1f} s "
        f"agent); RSS {got['rss']:,.0f} B/entry; first message beyond the cap "
        f"p50/p99 {_pct(got['first'], 50) * 1000:.1f}/{p99 * 1000:.1f} ms"
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("w", WORKLOADS)
def test_workloads_per_agent_core(benchmark: Any, w: int) -> None:
    agent = Agent(w)
    messages = 0

    async def consume(stream: AsyncIterator[Any]) -> None:
        nonlocal messages
        async for msg in stream:
            msg.SerializeToString()  # what gRPC would do with it (the transport is not counted)
            messages += 1

    async def scenario() -> tuple[float, float, int]:
        agent.cache.apply_sync(agent.state())
        await agent.rotator.tick()
        consumers = [asyncio.create_task(consume(agent.stream(e.selectors))) for e in agent.entries]
        await _until(lambda: messages >= w, 120)
        first = agent.cache.svids()
        span_start = min(s.not_before for s in first.values())
        span = TTL + 10  # the test CA back-dates 10 s
        agent.clock.set(span_start + 0.39 * span)
        signing = agent.signer.cpu
        cpu = time.process_time()
        step = 0.3
        while agent.clock.now() < span_start + 0.61 * span:
            agent.clock.advance(step)
            await agent.rotator.tick()
            for _ in range(3):  # let the woken streams build and yield their messages
                await asyncio.sleep(0)
        await _until(lambda: messages >= 2 * w, 60)
        used = time.process_time() - cpu - (agent.signer.cpu - signing)
        renewed = sum(1 for eid, s in agent.cache.svids().items() if s is not first[eid])
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        return used, agent.signer.cpu - signing, renewed

    used, signing, renewed = asyncio.run(scenario())
    assert renewed == w
    per_workload = used / w  # agent CPU seconds per workload per renewal (+ its stream message)
    renew_every = rotation_point(0, TTL)  # a 5-minute SVID renews every 150 s
    per_core = renew_every / per_workload
    print(
        f"\n{w:,} connected workloads: {per_workload * 1e6:.0f} us agent CPU per renewal "
        f"(signer {signing / w * 1e6:.0f} us excluded) -> {per_core:,.0f} workloads per core "
        f"at a {TTL} s TTL"
    )
    benchmark.extra_info["rows"] = [
        _row(
            f"agent {w:,} connected: workloads per core at 5 min TTL",
            per_core,
            "",
            "10k goal",
            per_core / GOAL_WORKLOADS_PER_CORE,
            goal=1.0,
        ),
    ]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

"""Node agent benchmarks against real `svid-server` and `svid-agent` processes (`make bench`).

Rows:
- entry create -> X.509-SVID on an already open FetchX509SVID stream (p50 / p99; goal p99 <= 1 s,
  SPIRE takes 5-10 s): timed from the admin CreateEntry call to the stream message.
- rotation point as a fraction of the SVID's lifetime, as seen by a workload (goal 0.5 +- 0.1), and
  that the new SVID always arrives before the old one expires.
- FetchJWTSVID served from the agent's cache, calls per second, as a ratio to a no-op unary gRPC
  call on the same kind of socket (goal >= 0.7), against two baselines timed in the same run,
  interleaved: a no-op server in another process on a plain Unix socket, and the agent's own
  health Check through its public socket (same relay hop and server: the handler's cost alone).
  A third row shows what the relay hop and the agent process cost a no-op call. Each ratio is
  the median over turns of 0.1 s windows of every call kind, so a burst of outside load lands
  on one turn, not on the result.
- first FetchX509SVID message latency on a new connection (p50 / p99).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from svid._der import parse_der_certs
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, workload_pb2, workload_pb2_grpc
from tests.e2e.agent_process import HEADER, AgentProcess, create_entry, new_token
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir

UID = f"uid:{os.getuid()}"
CREATES = 30
ROTATIONS = 3
# The shortest TTL issue 11 names: the server's 10 s back-dating is a quarter of its span.
ROTATION_TTL = 30
CALL_SECONDS = 3.0  # per kind of call
RATE_WINDOW = 0.1
FIRST_MESSAGES = 200

_NOOP_SERVER = textwrap.dedent(
    """
    import asyncio, sys, grpc
    from svid._proto import workload_pb2, workload_pb2_grpc

    class Noop(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
        async def FetchJWTSVID(self, request, context):
            return workload_pb2.JWTSVIDResponse()

    async def main():
        server = grpc.aio.server()
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(Noop(), server)
        server.add_insecure_port("unix:" + sys.argv[1])
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
    """
)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[ServerProcess, AgentProcess, str]]:
    root = short_tmpdir()
    server = make_server(root, log_level="warning").start()
    agent = AgentProcess(root, server, new_token(server))
    try:
        agent.start("--log-level", "warning")
        agent_id = agent.agent_id()
        create_entry(server, "spiffe://example.org/bench/base", agent_id, f"unix:{UID}")
        agent.wait_svid("spiffe://example.org/bench/base")
        yield server, agent, agent_id
    finally:
        agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _row(
    name: str, value: float, unit: str, baseline: str, ratio: float, *, goal: Any = None
) -> dict[str, Any]:
    return {
        "row": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "goal": goal,
    }


def test_entry_create_to_svid_on_open_stream(benchmark: Any, stack: Any) -> None:
    server, agent, agent_id = stack
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    have = {s.spiffe_id for s in next(stream).svids}
    latencies: list[float] = []
    created: list[str] = []
    with grpc.insecure_channel(f"unix:{server.admin_socket}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for i in range(CREATES):
            sid = f"spiffe://example.org/bench/new{i}"
            entry = common_pb2.Entry(
                spiffe_id=sid,
                parent_id=agent_id,
                selectors=[common_pb2.Selector(type="unix", value=UID)],
            )
            started = time.perf_counter()
            reply = admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry))
            while sid not in have:
                have = {s.spiffe_id for s in next(stream).svids}
            latencies.append(time.perf_counter() - started)
            created.append(reply.entry.id)
        # Later rows measure a workload with one identity, not one holding CREATES of them.
        for entry_id in created:
            admin.DeleteEntry(admin_pb2.DeleteEntryRequest(id=entry_id))
        while len(have) > 1:
            have = {s.spiffe_id for s in next(stream).svids}
    stream.cancel()
    p50, p99 = _pct(latencies, 50), _pct(latencies, 99)
    print(
        f"\nentry create -> SVID on open stream: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
    benchmark.extra_info["rows"] = [
        _row(
            "agent: entry create -> SVID on stream p50",
            p50 * 1000,
            "ms",
            "1 s goal",
            1.0 / max(p50, 1e-9),
            goal=1.0,
        ),
        _row(
            "agent: entry create -> SVID on stream p99",
            p99 * 1000,
            "ms",
            "1 s goal",
            1.0 / max(p99, 1e-9),
            goal=1.0,
        ),
    ]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert p99 <= 1.0


def test_rotation_point_fraction_and_no_gap(benchmark: Any, stack: Any) -> None:
    server, agent, agent_id = stack
    sid = "spiffe://example.org/bench/rotating"
    entry_id = create_entry(server, sid, agent_id, f"unix:{UID}", x509_ttl=ROTATION_TTL)
    agent.wait_svid(sid)
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    fractions: list[float] = []
    gaps: list[float] = []
    prev_serial, prev_before, prev_after = None, 0.0, 0.0
    while len(fractions) < ROTATIONS:
        msg = next(stream)
        svid = next((s for s in msg.svids if s.spiffe_id == sid), None)
        if svid is None:
            continue
        leaf = parse_der_certs(svid.x509_svid)[0]
        now = time.time()
        if leaf.serial_number == prev_serial:
            continue
        if prev_serial is not None:
            # On the certificate's own NotBefore -> NotAfter, as SPIRE and clients measure it.
            fractions.append((now - prev_before) / (prev_after - prev_before))
            gaps.append(prev_after - now)
        prev_serial = leaf.serial_number
        prev_before = leaf.not_valid_before_utc.timestamp()
        prev_after = leaf.not_valid_after_utc.timestamp()
    stream.cancel()
    server.cli("entry", "delete", "--id", entry_id)  # its rotations would load later rows
    mean = statistics.mean(fractions)
    print(
        f"\nrotation at {mean:.3f} of lifetime (min {min(fractions):.3f}, "
        f"max {max(fractions):.3f}); smallest margin before expiry {min(gaps):.2f} s"
    )
    benchmark.extra_info["rows"] = [
        _row(
            "agent: rotation point / lifetime (mean)",
            mean,
            "",
            "0.5 target",
            1 - abs(mean - 0.5),
            goal=0.9,
        ),
    ]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(0.4 <= f <= 0.62 for f in fractions)  # 0.6 plus delivery (0.6 s of 30)
    assert min(gaps) > 0


def _interleaved_rates(
    calls: dict[str, Callable[[], object]], seconds: float
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Calls per second of each callable over `seconds` each, timed in alternating short windows:
    load from elsewhere on the machine drifts, and this way it falls on every row alike. Returns
    the overall rates and each turn's rates (for per-turn ratios, which a burst of outside load
    in one window cannot move as far)."""
    counts = dict.fromkeys(calls, 0)
    spent = dict.fromkeys(calls, 0.0)
    turns: list[dict[str, float]] = []
    names = list(calls)
    turn = 0
    while min(spent.values()) < seconds:
        turn += 1
        this: dict[str, float] = {}
        # Rotate who goes first: the call after an idle gap pays for waking its server.
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            call = calls[name]
            n = 0
            start = time.perf_counter()
            while (elapsed := time.perf_counter() - start) < RATE_WINDOW:
                call()
                n += 1
            counts[name] += n
            spent[name] += elapsed
            this[name] = n / elapsed
        turns.append(this)
    return {name: counts[name] / spent[name] for name in calls}, turns


def _median_ratio(turns: list[dict[str, float]], row: str, baseline: str) -> float:
    return statistics.median(t[row] / t[baseline] for t in turns)


def test_fetch_jwt_from_cache_vs_noop_grpc(benchmark: Any, stack: Any) -> None:
    """Two baselines: a no-op gRPC server in its own process on a plain Unix socket (the
    issue's reading), and the agent's own health Check through its public socket, which pays the
    same relay hop and server as FetchJWTSVID and so isolates the handler's cost."""
    _, agent, _ = stack
    noop_sock = agent.root / "noop.sock"
    noop = subprocess.Popen(
        [sys.executable, "-c", _NOOP_SERVER, str(noop_sock)], stdout=subprocess.PIPE
    )
    try:
        assert noop.stdout is not None
        assert noop.stdout.readline().strip() == b"ready"
        with (
            grpc.insecure_channel(f"unix:{noop_sock}") as nch,
            grpc.insecure_channel(f"unix:{agent.socket_path}") as ach,
        ):
            noop_stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(nch)
            agent_stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ach)
            health_stub = health_pb2_grpc.HealthStub(ach)
            req = workload_pb2.JWTSVIDRequest(audience=["bench"])
            check = health_pb2.HealthCheckRequest()
            first = agent_stub.FetchJWTSVID(req, metadata=HEADER)  # later calls hit the cache
            assert first.svids
            noop_stub.FetchJWTSVID(req, metadata=HEADER)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert health_stub.Check(check).status == serving
            rates, turns = _interleaved_rates(
                {
                    "noop": lambda: noop_stub.FetchJWTSVID(req, metadata=HEADER),
                    "relay_noop": lambda: health_stub.Check(check),
                    "jwt": lambda: agent_stub.FetchJWTSVID(req, metadata=HEADER),
                },
                CALL_SECONDS,
            )
    finally:
        noop.terminate()
        noop.wait(10)
    jwt_rate, noop_rate, relay_rate = rates["jwt"], rates["noop"], rates["relay_noop"]
    vs_noop = _median_ratio(turns, "jwt", "noop")
    vs_relay = _median_ratio(turns, "jwt", "relay_noop")
    relay_vs_noop = _median_ratio(turns, "relay_noop", "noop")
    print(
        f"\nFetchJWTSVID from cache {jwt_rate:,.0f}/s; no-op gRPC {noop_rate:,.0f}/s "
        f"({vs_noop:.2f}x); no-op through the agent's socket {relay_rate:,.0f}/s "
        f"({vs_relay:.2f}x); ratios are medians of {len(turns)} interleaved turns"
    )
    benchmark.extra_info["rows"] = [
        _row(
            "agent: FetchJWTSVID (cached) calls/s",
            jwt_rate,
            "/s",
            "no-op gRPC on a Unix socket",
            vs_noop,
            goal=0.7,
        ),
        _row(
            "agent: FetchJWTSVID (cached) calls/s",
            jwt_rate,
            "/s",
            "no-op via the agent's socket",
            vs_relay,
            goal=0.7,
        ),
        _row(
            "agent: no-op via the agent's socket calls/s",
            relay_rate,
            "/s",
            "no-op gRPC on a Unix socket",
            relay_vs_noop,
        ),
    ]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_first_x509_message_latency(benchmark: Any, stack: Any) -> None:
    _, agent, _ = stack
    latencies: list[float] = []
    for _ in range(FIRST_MESSAGES):
        started = time.perf_counter()
        with grpc.insecure_channel(f"unix:{agent.socket_path}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
            next(stream)
            latencies.append(time.perf_counter() - started)
            stream.cancel()
    p50, p99 = _pct(latencies, 50), _pct(latencies, 99)
    print(
        f"\nfirst FetchX509SVID message on a new connection: p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms"
    )
    benchmark.extra_info["rows"] = [
        _row(
            "agent: first X.509 message, new connection p99",
            p99 * 1000,
            "ms",
            "100 ms",
            0.1 / max(p99, 1e-9),
        ),
    ]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

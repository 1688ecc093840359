"""The agent's health: the /metrics and /healthz endpoint over a real socket, and the gRPC
health service beside the Workload API."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from grpc_health.v1 import health_pb2  # type: ignore[import-untyped]

from agent_attestor.app import HEALTH_SERVICE, AgentApp
from agent_attestor.cache import SyncState
from agent_attestor.config import build_config
from agent_attestor.metrics import Metrics, MetricsHttpServer
from agent_attestor.model import TrustBundle


@pytest.fixture
def endpoint() -> Iterator[tuple[str, int]]:
    server = MetricsHttpServer(Metrics(), lambda: True, read_timeout=0.5)
    host, port = server.start("127.0.0.1:0").rsplit(":", 1)
    try:
        yield host, int(port)
    finally:
        server.stop()


def test_a_connection_that_sends_no_request_is_closed(endpoint: tuple[str, int]) -> None:
    """Each connection holds a thread until its request is read: one that sent nothing held
    it for ever, so idle connections piled up threads without bound."""
    with socket.create_connection(endpoint, timeout=5) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""  # closed by the endpoint, not by our timeout
        assert time.monotonic() - started < 4
    host, port = endpoint
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as answer:
        assert answer.read() == b"ok\n"


def test_an_ipv6_address_is_served() -> None:
    """The config takes [::1]:port as a metrics_address; the endpoint gave it, brackets and
    all, to an IPv4 server, and the agent failed to start with a resolver traceback."""
    server = MetricsHttpServer(Metrics(), lambda: True)
    bound = server.start("[::1]:0")
    try:
        assert bound.startswith("[::1]:")
        with urllib.request.urlopen(f"http://{bound}/healthz", timeout=5) as answer:
            assert answer.read() == b"ok\n"
    finally:
        server.stop()


def test_grpc_health_follows_readiness_after_the_first_sync_too(tmp_path: Path) -> None:
    """It was set SERVING once, at the first Sync message, and never again: an agent the
    server then refused (evicted, banned), serving nothing, still said SERVING there while
    /healthz said 503."""

    async def scenario() -> list[tuple[bool, int]]:
        app = AgentApp(build_config({"data_dir": str(tmp_path / "agent")}, {}))
        seen: list[tuple[bool, int]] = []

        async def status() -> int:
            request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
            answer = await app.health.Check(request, cast(Any, None))
            return cast(int, answer.status)

        async def settled(ready: bool) -> None:
            status_of = health_pb2.HealthCheckResponse
            want = status_of.SERVING if ready else status_of.NOT_SERVING
            for _ in range(100):
                if await status() == want:
                    break
                await asyncio.sleep(0.01)
            seen.append((app.ready(), await status()))

        await app.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.create_task(app._health_loop())
        app.cache.apply_sync(SyncState((), TrustBundle("example.org", (b"ca",))))
        await settled(True)
        app.cache.refuse("evicted")
        await settled(False)
        app.cache.apply_sync(SyncState((), TrustBundle("example.org", (b"ca",))))
        await settled(True)
        loop.cancel()
        return seen

    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert asyncio.run(scenario()) == [(True, serving), (False, not_serving), (True, serving)]


def test_a_request_trickled_a_byte_at_a_time_is_cut_at_the_read_timeout(
    endpoint: tuple[str, int],
) -> None:
    """The timeout bounded each read, not the request: a client sending a byte every 0.4 s
    (under the 0.5 s given) held its connection and thread for as long as it kept on."""
    with socket.create_connection(endpoint, timeout=5) as slow:
        slow.settimeout(0.4)
        started = time.monotonic()
        closed = False
        for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 100:
            try:
                slow.sendall(bytes([byte]))
                closed = slow.recv(1) == b""
            except TimeoutError:  # nothing from the endpoint yet: it still reads
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed, "the endpoint read a trickled request for 40 s"
        assert time.monotonic() - started < 3

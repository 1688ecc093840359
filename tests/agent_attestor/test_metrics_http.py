"""The agent's /metrics and /healthz endpoint over a real socket."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from agent_attestor.metrics import Metrics, MetricsHttpServer


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

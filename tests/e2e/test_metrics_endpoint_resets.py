"""The daemons' /metrics and /healthz endpoint, against clients that reset their connections
(a probe that gave up, a scanner): what the daemon says of them on stderr."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import urllib.request
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import ServerProcess, make_server
from tests.tmpdirs import short_tmpdir
from tests.waits import wait_for

RESETS = 20


@pytest.fixture
def server_with_metrics() -> Iterator[ServerProcess]:
    root = short_tmpdir()
    server = make_server(root, metrics_address="127.0.0.1:0").start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Threads:"))
    return int(line.split()[1])


def test_connections_reset_by_their_clients_write_nothing_past_the_log(
    server_with_metrics: ServerProcess,
) -> None:
    """Fails on main: socketserver printed each reset connection's traceback (~18 lines) to
    stderr, in no log format, as fast as anyone reaching the port reset connections."""
    server = server_with_metrics
    assert server.proc is not None
    host, port = server.runtime["metrics_address"].rsplit(":", 1)
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as answer:
        assert answer.read() == b"ok\n"
    idle = _threads(server.proc.pid)
    for _ in range(RESETS):
        conn = socket.create_connection((host, int(port)), timeout=5)
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset: the endpoint's read or write of it fails
    pid = server.proc.pid
    wait_for(lambda: _threads(pid) <= idle, 10, "the endpoint's connection threads to end")
    lines = server.logs().splitlines()
    assert not [line for line in lines if "Traceback" in line], lines
    for line in lines:
        json.loads(line)  # every line is the daemon's log (log_format json)
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as answer:
        assert answer.read() == b"ok\n"

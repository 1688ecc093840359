"""The server's gRPC health service, against anyone who reaches its attest port (server-auth TLS:
no client certificate is asked there) and opens a Watch that grants no HTTP/2 window.

grpcio's asyncio HealthServicer writes each Watch answer while holding the lock its `set` takes
too, and the stop's first step (enter_graceful_shutdown) takes it: a write that cannot go out
held the server's SIGTERM for as long as the stranger kept the connection.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

from grpc_health.v1 import health_pb2  # type: ignore[import-untyped]

from tests.agent_attestor import raw_h2
from tests.e2e.conftest import ServerProcess


def _stalled_watch(address: str) -> ssl.SSLSocket:
    """A TLS connection to `address` holding a health Watch the server may send no data on,
    returned once the server began answering it (its HEADERS)."""
    host, _, port = address.rpartition(":")
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # a stranger: it checks nothing and holds no certificate
    tls.set_alpn_protocols(["h2"])
    conn = tls.wrap_socket(socket.create_connection((host, int(port)), timeout=20))
    conn.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + raw_h2.frame(raw_h2.SETTINGS, 0, 0, struct.pack(">HI", raw_h2.INITIAL_WINDOW_SIZE, 0))
        + raw_h2.grpc_call(
            1, "/grpc.health.v1.Health/Watch", health_pb2.HealthCheckRequest().SerializeToString()
        )
    )
    buf = b""
    while True:
        data = conn.recv(65536)
        assert data, "the server closed the connection before answering the Watch"
        buf += data
        while len(buf) >= 9 and len(buf) >= 9 + (length := int.from_bytes(buf[:3], "big")):
            kind, flags = buf[3], buf[4]
            buf = buf[9 + length :]
            if kind == raw_h2.SETTINGS and not flags & raw_h2.ACK:
                conn.sendall(raw_h2.frame(raw_h2.SETTINGS, raw_h2.ACK, 0))
            elif kind == raw_h2.HEADERS:
                return conn


def test_a_strangers_stalled_health_watch_does_not_hold_the_servers_stop(
    server_process: ServerProcess,
) -> None:
    """Fails on main: the stop hangs for as long as the Watch is held (here until killed)."""
    watch = _stalled_watch(server_process.runtime["attest_address"])
    try:
        started = time.monotonic()
        code = server_process.stop(timeout=15)
        took = time.monotonic() - started
    finally:
        watch.close()
    assert code == 0
    assert took < 10, f"the stop took {took:.1f} s"

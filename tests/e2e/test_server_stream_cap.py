"""Anyone reaching the server's attestation port, before any proof, opened Attest streams
without sending their message, as many as it liked on one connection: the server grew by ~600
MiB in 8 s. Past NODE_MAX_STREAMS open at once, grpc-core now refuses a new stream."""

from __future__ import annotations

import socket
import ssl
import struct
import time

import pytest

from server.app import NODE_MAX_STREAMS
from tests.agent_attestor.raw_h2 import SETTINGS, call_headers, frame
from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.e2e

RST_STREAM = 3
# A client that acknowledged the server's SETTINGS is told REFUSED_STREAM, one that did not
# ENHANCE_YOUR_CALM: refused either way.
REFUSALS = (0x7, 0xB)
OPENED = NODE_MAX_STREAMS + 50


@pytest.fixture
def server(server_process: ServerProcess) -> ServerProcess:
    return server_process


class Frames:
    """The frames a TLS connection reads, (type, payload) each."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self.buffer = b""

    def next(self, deadline: float) -> tuple[int, bytes] | None:
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3]):
            if time.monotonic() >= deadline:
                return None
            try:
                data = self.tls.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return None
            self.buffer += data
        length = int.from_bytes(self.buffer[:3])
        kind, payload = self.buffer[3], self.buffer[9 : 9 + length]
        self.buffer = self.buffer[9 + length :]
        return kind, payload


def refused_streams(address: str, opened: int) -> int:
    """Opens `opened` Attest calls at once on one TLS connection, sending no message, once the
    server has said its SETTINGS; how many streams it refused within 5 s."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # anyone: no trust in the server, no certificate
    context.set_alpn_protocols(["h2"])
    refused = 0
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=5)) as tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))
        tls.settimeout(0.2)
        frames = Frames(tls)
        deadline = time.monotonic() + 5
        while (got := frames.next(deadline)) is not None and got[0] != SETTINGS:
            pass
        assert got is not None, "no SETTINGS from the server"
        tls.sendall(
            b"".join(
                call_headers(stream, "/svid.node.v1.Node/Attest")
                for stream in range(1, 2 * opened, 2)
            )
        )
        while refused < opened - NODE_MAX_STREAMS and (got := frames.next(deadline)) is not None:
            kind, payload = got
            if kind == RST_STREAM and struct.unpack(">I", payload)[0] in REFUSALS:
                refused += 1
    return refused


def test_streams_past_the_cap_are_refused_on_the_attestation_port(server: ServerProcess) -> None:
    assert refused_streams(server.runtime["attest_address"], OPENED) >= OPENED - NODE_MAX_STREAMS

"""Two workloads, each with its own fake agent (a real Workload API on a temp Unix socket) and its
own X509Source, plus a real HTTPS server that records every request its application receives."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svid import X509Source, der_concat, tls
from svid._proto import revocation_pb2
from svid.workloadapi import Backoff
from tests.svid.tls_pki import Pki
from tests.svid.workload_fake import Server, State, eventually
from tests.tmpdirs import short_tmpdir

SERVER = "spiffe://example.org/server"
CLIENT = "spiffe://example.org/client"
INTRUDER = "spiffe://example.org/intruder"
FAST = Backoff(0.02, 0.2)


@dataclass
class Workload:
    pki: Pki
    spiffe_id: str
    state: State
    agent: Server
    source: X509Source

    @property
    def serial(self) -> int:
        return int(self.source.svid.leaf.serial_number)

    def rotate(self) -> int:
        """Push a new SVID; returns its serial once the source holds it."""
        svid = self.pki.svid(self.spiffe_id)
        self.state.change(svids=[svid])
        serial = int(svid.leaf.serial_number)
        eventually(lambda: self.serial == serial, "the rotated SVID")
        return serial

    def revoke(self, serial: int) -> None:
        """The agent pushes ``serial`` on its revocation stream."""
        item = revocation_pb2.Revoked(kind="x509_serial", value=format(serial, "x"))
        self.state.change(revoked=[*self.state.revoked, item])


@contextlib.contextmanager
def workload(pki: Pki, spiffe_id: str, root: Path) -> Iterator[Workload]:
    state = State(
        x509={str(pki.trust_domain.id): der_concat([pki.root.cert])}, svids=[pki.svid(spiffe_id)]
    )
    agent = Server(state, root / f"{spiffe_id.rsplit('/', 1)[-1]}.sock").start()
    try:
        with X509Source(agent.address, backoff=FAST, ready_timeout=10) as source:
            yield Workload(pki, spiffe_id, state, agent, source)
    finally:
        agent.stop()


@contextlib.contextmanager
def sock_root() -> Iterator[Path]:
    root = short_tmpdir("tls")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Recorder:
    """What the application behind a server saw: one entry per request it was handed."""

    requests: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    recorder: Recorder
    protocol_version = "HTTP/1.1"  # keep-alive: connections stay open between requests

    def do_GET(self) -> None:
        self.recorder.requests.append(self.path)
        self.recorder.peers.append(str(tls.peer_of(self.connection).spiffe_id))
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def finish(self) -> None:
        super().finish()
        self.recorder.closed.set()

    def log_message(self, *args: object) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    errors: list[BaseException]

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        self.errors.append(sys.exc_info()[1])  # type: ignore[arg-type]


@contextlib.contextmanager
def https_server(
    ctx: ssl.SSLContext, *, handshake_on_connect: bool = False
) -> Iterator[tuple[int, Recorder, QuietServer]]:
    """``http.server`` as the README shows it: the listening socket wrapped once."""
    recorder = Recorder()
    handler = type("Handler", (RecordingHandler,), {"recorder": recorder})
    httpd = QuietServer(("127.0.0.1", 0), handler)
    httpd.errors = []
    httpd.socket = ctx.wrap_socket(
        httpd.socket, server_side=True, do_handshake_on_connect=handshake_on_connect
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], recorder, httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


REQUEST = b"GET /secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def raw_request(ctx: ssl.SSLContext, port: int) -> bytes:
    """A hand-written TLS client: completes its side of the handshake, sends a request at once
    (TLS 1.3: before the server has judged its certificate), and reads what comes back."""
    answer = b""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        contextlib.suppress(OSError),  # reset, broken pipe, TLS alert: all refusals
        ctx.wrap_socket(raw, server_hostname="x") as conn,
    ):
        conn.sendall(REQUEST)
        while chunk := conn.recv(4096):
            answer += chunk
    return answer

"""The /metrics and /healthz HTTP endpoint of svidd's daemons: the server and the node agent
serve their own metrics, in their own words, through this one small threaded HTTP server."""

from __future__ import annotations

import io
import logging
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from svid._clock import Clock, SystemClock

# Seconds a connection may take to send its whole request, and over each write. Every
# connection holds a thread until its request is read: a bound on each read alone let a client
# trickling a byte at a time hold one for as long as it kept on.
READ_TIMEOUT = 10.0
# Connections served at once; past these, one is closed as it is accepted. Each holds a thread
# and a descriptor for up to READ_TIMEOUT: anyone reaching the port took, without a bound, the
# descriptors the rest of the daemon needs. A scraper or a probe takes one at a time.
MAX_CONNECTIONS = 64

_log = logging.getLogger(__name__)


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, each given only what is left of one deadline."""

    def __init__(self, sock: socket.socket, deadline: float, clock: Clock) -> None:
        self._sock = sock
        self._deadline = deadline
        self._clock = clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - self._clock.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not read in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _HttpServer(ThreadingHTTPServer):
    # socketserver's 5: connections past it waited for the kernel's SYN-ACK retries (1 s, 3 s,
    # ...) while a flood was accepted and closed.
    request_queue_size = MAX_CONNECTIONS

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], cap: int
    ) -> None:
        super().__init__(address, handler)
        self._cap = cap
        self._open = 0
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = self._open >= self._cap
            if not full:
                self._open += 1
        if full:
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed_one()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one()

    def _closed_one(self) -> None:
        with self._open_lock:
            self._open -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection its client reset or left (a probe that gave up, a scanner): its own
        doing, and nothing to say; socketserver printed its traceback to stderr, ~1.3 KB past
        the daemon's log and its format, as fast as anyone reaching the port closed
        connections. Anything else is a fault of ours, logged."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        _log.exception("the metrics endpoint failed to answer a request")


class _Ipv6HttpServer(_HttpServer):
    address_family = socket.AF_INET6


class MetricsEndpoint:
    """GET /metrics: what `render` returns, as `content_type`; GET /healthz: 200 `ok` while
    `healthy()`, else 503 with `unhealthy`, or with `unhealthy: ` and `reasons()` joined when
    it names any (for whoever reads the probe's answer: no path, no secret in them); anything
    else 404. Requests are not logged."""

    def __init__(
        self,
        render: Callable[[], bytes],
        healthy: Callable[[], bool],
        *,
        content_type: str,
        unhealthy: bytes,
        thread_name: str,
        read_timeout: float = READ_TIMEOUT,
        reasons: Callable[[], Sequence[str]] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        clock: Clock | None = None,
    ) -> None:
        self._render = render
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._clock = clock or SystemClock()
        self._healthy = healthy
        self._content_type = content_type
        self._unhealthy = unhealthy
        self._reasons = reasons
        self._thread_name = thread_name
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, address: str) -> str:
        """Listen on `address` (host:port, port 0 for any) and serve; returns the bound one."""
        host, _, port = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # [::1]:9090, as the config takes it
        render, healthy = self._render, self._healthy
        content_type, unhealthy = self._content_type, self._unhealthy_answer
        clock = self._clock

        class Handler(BaseHTTPRequestHandler):
            timeout = self._read_timeout  # socketserver sets it on the connection

            def setup(self) -> None:
                super().setup()
                deadline = clock.monotonic() + self.timeout
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline, clock))

            def do_GET(self) -> None:
                self.connection.settimeout(self.timeout)  # the reads left it what was left
                if self.path == "/metrics":
                    body, ctype, code = render(), content_type, 200
                elif self.path == "/healthz":
                    ok = healthy()
                    body, ctype, code = (
                        (b"ok\n" if ok else unhealthy()),
                        "text/plain",
                        (200 if ok else 503),
                    )
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        server_class = _Ipv6HttpServer if ":" in host else _HttpServer
        self._httpd = server_class((host, int(port)), Handler, self._max_connections)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=self._thread_name, daemon=True
        )
        self._thread.start()
        bound_host, bound_port = self._httpd.server_address[:2]
        if ":" in str(bound_host):
            return f"[{bound_host!s}]:{bound_port}"
        return f"{bound_host!s}:{bound_port}"

    def _unhealthy_answer(self) -> bytes:
        reasons = self._reasons() if self._reasons is not None else ()
        if not reasons:
            return self._unhealthy
        said = "; ".join(reasons).replace("\n", " ")
        return self._unhealthy.rstrip(b"\n") + b": " + said.encode("utf-8", "replace") + b"\n"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

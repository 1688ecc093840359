"""A small HTTPS listener: h11 parses HTTP/1.1 on asyncio streams, handlers see plain values.

Why h11: it is the HTTP/1.1 state machine httpx and uvicorn are built on, sans-I/O, so the
server keeps its own asyncio loop, limits and shutdown; nothing here parses HTTP by hand.
Routes are exact paths: `mount(path, handler)` lets another feature (a SPIFFE federation
bundle endpoint) share the listener.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import h11

from server.descriptor_budget import HANDSHAKE_TIMEOUT
from server.oauth.admission import Admission, ConnectionCaps, ConnectionMetrics
from server.oauth.sockets import listening_sockets
from svid._clock import Clock, SystemClock
from svid._log_throttle import LogThrottle

_log = logging.getLogger("svid.server.oauth")
MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024
READ_TIMEOUT = 30.0
ACCEPT_BATCH = 64
ACCEPT_RETRY_DELAY = 1.0
# Out of descriptors, accept fails again at each retry, for as long as it lasts: a line a minute
# says so, and svid_server_http_accept_failures counts each.
ACCEPT_FAILURE_LOG_INTERVAL = 60.0
CLOSE_TIMEOUT = 1.0
_CHUNK = 65536
_CONTINUE = h11.InformationalResponse(status_code=100, headers=[])


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    # Credentials travel in both (an Authorization header, a form's assertion): not in a repr.
    headers: Mapping[str, str] = field(repr=False)  # lower-case names; the last of a repeat
    body: bytes = field(repr=False)
    # The client's address as the socket has it ("" when unknown): what a client cannot
    # choose by what it sends, unlike any header (X-Forwarded-For) or form field.
    client_host: str = ""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = field(default=b"", repr=False)  # a token endpoint's answer holds its token
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, body: bytes, *headers: tuple[str, str]) -> Response:
    return Response(status, body, "application/json", tuple(headers))


_NOT_FOUND = Response(404, b'{"error":"not_found"}')


def _host(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


@dataclass(slots=True)
class _Connection:
    """An accepted connection's socket, until its task takes it, and its writer once its
    handshake is done."""

    sock: socket.socket | None
    writer: asyncio.StreamWriter | None = None


def _framed_twice(head: h11.Request) -> bool:
    """Both Content-Length and Transfer-Encoding: h11 reads the body as chunked, an
    intermediary may read the Content-Length, and what one takes for a body the other takes for
    the next request (smuggling). RFC 9112 §6.1: refuse it, and close the connection."""
    names = {name for name, _ in head.headers}
    return b"content-length" in names and b"transfer-encoding" in names


class HttpListener:
    """Serves mounted handlers on one address, over TLS when given an SSL context.

    It accepts connections itself: one over its client's cap, or the listener's, is closed as
    soon as it is accepted, before any TLS (server/oauth/admission.py)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None,
        *,
        caps: ConnectionCaps,
        name: str = "http",
        clock: Clock | None = None,
        metrics: ConnectionMetrics | None = None,
    ) -> None:
        """``name``: the listener's in logs; ``metrics``: what it reports of its connections."""
        self._ssl = ssl_context
        self._routes: dict[str, Handler] = {}
        self._sockets: list[socket.socket] = []
        clock = clock or SystemClock()
        self._name = name
        self._metrics = metrics or ConnectionMetrics()
        self.admission = Admission(caps, name, clock, self._metrics)
        self._accept_failures = LogThrottle(ACCEPT_FAILURE_LOG_INTERVAL, clock)
        self._connections: dict[asyncio.Task[None], _Connection] = {}

    def mount(self, path: str, handler: Handler) -> None:
        if path in self._routes:
            raise ValueError(f"{path} is mounted already")
        self._routes[path] = handler

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._sockets = listening_sockets(host, port)
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept_ready, sock)
        return int(self._sockets[0].getsockname()[1])

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            if sock.fileno() != -1:
                loop.remove_reader(sock.fileno())
                sock.close()
        # Idle keep-alive clients would hold a TLS close handshake open: cut them.
        for task, connection in list(self._connections.items()):
            if connection.writer is not None:
                connection.writer.transport.abort()
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def _accept_ready(self, sock: socket.socket) -> None:
        """Accept what is waiting (up to a batch, then let the loop run other work), refusing
        each connection over a cap before anything else is done with it."""
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors or buffers all the same: wait a moment instead of spinning
                # on a socket that stays readable (asyncio's own server does so too).
                self._accept_failed(exc)
                loop.remove_reader(sock.fileno())
                loop.call_later(ACCEPT_RETRY_DELAY, self._resume, sock)
                return
            host = str(address[0]) if isinstance(address, tuple) and address else ""
            key = self.admission.admit(host)
            if key is None:
                conn.close()
                continue
            conn.setblocking(False)
            connection = _Connection(conn)
            task = loop.create_task(self._connection(connection))
            self._connections[task] = connection
            # Not the coroutine's finally: a task cancelled (by stop()) before its first step
            # never runs it, and would keep its socket and its client's slot for ever.
            task.add_done_callback(functools.partial(self._ended, connection, key))

    def _accept_failed(self, exc: OSError) -> None:
        self._metrics.accept_failed()
        count = self._accept_failures.due()
        if count:
            _log.warning(
                "accepting an HTTP connection failed",
                extra={"listener": self._name, "error": str(exc), "failures": count},
            )

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() != -1:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_ready, sock)

    def _ended(self, connection: _Connection, key: str, task: asyncio.Task[None]) -> None:
        self._connections.pop(task, None)
        if connection.sock is not None:  # never taken: the task was cancelled at once
            connection.sock.close()
        self.admission.release(key)

    async def _connection(self, connection: _Connection) -> None:
        # From here on the socket is ours to close (_open does, if it cannot be served).
        conn, connection.sock = connection.sock, None
        assert conn is not None
        try:
            reader, writer = await self._open(conn)
            connection.writer = writer
            await self._handle(reader, writer)
        except (TimeoutError, ConnectionError, ssl.SSLError, h11.ProtocolError):
            pass  # a client that went away or spoke no HTTP (nor TLS): nothing to answer
        except asyncio.CancelledError:
            pass

    async def _open(self, conn: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The streams of an accepted socket, once its TLS handshake (if any) is done; the
        socket is closed if they cannot be had."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        taken = False

        def factory() -> asyncio.StreamReaderProtocol:
            # Called as the loop makes the socket its transport's (no await between): from then
            # on the loop closes it, and closing it here too would pull it from under the
            # loop's selector. Before (cancelled at once), nothing but us would close it.
            nonlocal taken
            taken = True
            return protocol

        try:
            transport, _ = await loop.connect_accepted_socket(
                factory,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self._ssl is not None else None,
            )
        except BaseException:
            if not taken:
                conn.close()
            raise
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
                # cancellation of the listener's stop (CPython gh-86296).
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await writer.wait_closed()
            except TimeoutError:
                # Answers its client does not read would keep the socket for ever.
                writer.transport.abort()
            except Exception:  # noqa: S110 - the connection is going away either way
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            # One deadline for the whole request (or the wait for the next one), not one for
            # each read: a client trickling a byte now and then would hold its connection for
            # ever. asyncio.timeout, not wait_for: no task of its own for every request.
            async with asyncio.timeout(READ_TIMEOUT):
                request = await self._read_request(conn, reader, writer)
            if request is None:
                return
            if isinstance(request, Response):  # refused while reading (too large, framed twice)
                await self._send(conn, writer, request, close=True)
                return
            handler = self._routes.get(request.path)
            response = _NOT_FOUND if handler is None else await self._answer(handler, request)
            head_only = request.method == "HEAD"
            await self._send(conn, writer, response, close=False, head_only=head_only)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _answer(self, handler: Handler, request: Request) -> Response:
        try:
            return await handler(request)
        except Exception:
            _log.exception("HTTP handler failed", extra={"path": request.path})
            return Response(500, b'{"error":"server_error"}')

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | Response | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    # RFC 9110 §10.1.1: the body is read, so say so at once (curl would wait a
                    # second before sending it anyway).
                    writer.write(conn.send(_CONTINUE) or b"")
                conn.receive_data(await reader.read(_CHUNK))
                continue
            if isinstance(event, h11.Request):
                if _framed_twice(event):
                    return Response(400, b'{"error":"invalid_request"}')
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    return Response(413, b'{"error":"invalid_request"}')
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("ascii", "replace")
                path, _, query = target.partition("?")
                headers = {k.decode("ascii").lower(): v.decode("latin-1") for k, v in head.headers}
                return Request(
                    head.method.decode("ascii"), path, query, headers, bytes(body), _host(writer)
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        response: Response,
        *,
        close: bool,
        head_only: bool = False,
    ) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        # One write: one TLS record and one send for the whole answer, not three.
        head = conn.send(h11.Response(status_code=response.status, headers=headers))
        # An answer to HEAD has GET's headers and no body: h11 refuses to send one (and the
        # connection was cut with nothing answered).
        body = b"" if head_only else conn.send(h11.Data(data=response.body))
        writer.write(b"".join((head or b"", body or b"", conn.send(h11.EndOfMessage()) or b"")))
        # Bounded as a read is: a client that sends requests but never reads the answers would
        # otherwise hold its connection for ever once the buffers are full.
        async with asyncio.timeout(READ_TIMEOUT):
            await writer.drain()

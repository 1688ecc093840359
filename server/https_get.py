"""One bounded GET of another party's JSON document (a federated trust domain's bundle, a
trusted issuer's discovery document and keys): no redirect followed, at most ``limit`` bytes
read, within ``timeout`` in all, the connection closed. Blocking (http.client): callers run it
in a worker thread, and map its errors (OSError, TimeoutError among them,
http.client.HTTPException, ssl.SSLError) to their own."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes  # at most limit + 1 bytes: longer means the document was over the limit
    headers: http.client.HTTPMessage


def get(
    url: str,
    *,
    context: ssl.SSLContext | None,
    limit: int,
    timeout: float,
    check_peer: Callable[[bytes | None], None] | None = None,
) -> Reply:
    """GET ``url`` (https with ``context``; plain http only where the caller allowed it).
    ``check_peer`` is given the server's certificate (DER) before the request is read: it
    raises to refuse the server. ``timeout`` bounds the whole GET, not each read: a server
    that trickles its answer a byte at a time would otherwise hold the caller for ever."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fired = threading.Event()
    deadline = threading.Timer(timeout, _cut, (conn, fired))
    deadline.daemon = True
    deadline.start()
    try:
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            if check_peer is not None:
                sock = conn.sock
                check_peer(
                    sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
                )
            response = conn.getresponse()
            reply = Reply(response.status, response.read(limit + 1), response.headers)
        except (OSError, http.client.HTTPException):
            if fired.is_set():  # what the cut made of the read (EOF, a TLS error) is not news
                raise _late(timeout) from None
            raise
        if fired.is_set():  # cut short: what was read may end anywhere
            raise _late(timeout)
        return reply
    finally:
        deadline.cancel()
        deadline.join()  # a cut under way finishes before the socket is closed and let go
        conn.close()


def _cut(conn: http.client.HTTPConnection, fired: threading.Event) -> None:
    """At the deadline: end the reads the GET's thread is blocked in. Shutting the socket down
    (not closing it: its descriptor stays the GET's) is what another thread may safely do; the
    plain socket's shutdown, as a TLS socket's own would drop its TLS state under the reader."""
    fired.set()
    sock = conn.sock
    if sock is not None:
        # OSError: not connected yet, or closed already; nothing is read from it then.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _late(timeout: float) -> TimeoutError:
    return TimeoutError(f"no whole answer within {timeout:g} s")


def holds_userinfo(url: str) -> bool:
    """Whether `url`'s authority (what follows the scheme, up to the first /, ? or #) holds
    user info (user@ or user:pw@): a URL of another party to fetch never should, and the
    password it may carry must not be logged or quoted with the URL."""
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    return "@" in authority

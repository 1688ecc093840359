"""One bounded GET of another party's JSON document (a federated trust domain's bundle, a
trusted issuer's discovery document and keys): no redirect followed, at most ``limit`` bytes
read, the connection closed. Blocking (http.client): callers run it in a worker thread, and
map its errors (OSError, http.client.HTTPException, ssl.SSLError) to their own."""

from __future__ import annotations

import http.client
import ssl
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
    raises to refuse the server."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        if check_peer is not None:
            sock = conn.sock
            check_peer(
                sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
            )
        response = conn.getresponse()
        return Reply(response.status, response.read(limit + 1), response.headers)
    finally:
        conn.close()

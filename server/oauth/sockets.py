"""Listening TCP sockets for an address, bound as asyncio.start_server binds them.

Why not asyncio's server: it accepts and starts TLS before any code of ours sees the client's
address, so a connection over its client's cap would cost a handshake before it was refused.
The listener accepts on these sockets itself (server/oauth/http.py).
"""

from __future__ import annotations

import socket

BACKLOG = 1024


def listening_sockets(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Non-blocking sockets listening on every address `host` resolves to ("" or a wildcard:
    every interface). Port 0: the first gets a free port, and the others the same one."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, resolved in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" and "0.0.0.0" both resolved: each socket takes its own family only.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            address = resolved
            if port == 0 and len(sockets) > 1:
                address = (resolved[0], sockets[0].getsockname()[1], *resolved[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets

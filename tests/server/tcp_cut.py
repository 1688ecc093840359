"""A TCP relay a test can cut: one server reaches PostgreSQL through it, the others directly,
so that server alone loses the database (a network partition), as in a real outage."""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse


class CuttableRelay:
    """Relays 127.0.0.1:<port> to `upstream`; `cut()` drops every connection and refuses new
    ones (connection refused), as a host cut off from the database sees; `freeze()` keeps every
    connection open and drops what is sent on it, as a firewall dropping packets or a database
    host gone silent does (no RST: only TCP's own timeouts, many minutes, would tell)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False
        self._frozen = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream, timeout=3)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._cut:
                    client.close()
                    server.close()
                    continue
                self._open += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self._frozen.is_set():
                    dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def freeze(self) -> None:
        self._frozen.set()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            self._listener.close()
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def restore(self) -> None:
        """Take connections again after `cut()`, on the same port."""
        with self._lock:
            self._cut = False
            self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def dsn_through(self, dsn: str) -> str:
        """`dsn` (a URL) with its host and port this relay's."""
        parts = urllib.parse.urlsplit(dsn)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def upstream_of(dsn: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432

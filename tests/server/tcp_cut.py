"""A TCP relay a test can cut: one server reaches PostgreSQL through it, the others directly,
so that server alone loses the database (a network partition), as in a real outage."""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
from dataclasses import dataclass

# The simple-query message psycopg sends to end a transaction block: Q, length, "COMMIT\0".
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"


@dataclass
class _Cut:
    """Where `cut_on` severs one connection: at the first client message holding `then`, once
    one holding `marker` was sent on it (at that message itself when `then` is empty); set
    `severed` when the database answered the severing message."""

    marker: bytes
    then: bytes
    severed: threading.Event
    # Not closed but gone silent (`freeze_on`): every connection drops what is sent on it.
    silent: bool = False


@dataclass
class _Link:
    client: socket.socket
    server: socket.socket
    # The cut whose marker this connection sent, and the one that severed it.
    marked: _Cut | None = None
    cut: _Cut | None = None


class CuttableRelay:
    """Relays 127.0.0.1:<port> to `upstream`; `cut()` drops every connection and refuses new
    ones (connection refused), as a host cut off from the database sees; `freeze()` keeps every
    connection open and drops what is sent on it, as a firewall dropping packets or a database
    host gone silent does (no RST: only TCP's own timeouts, many minutes, would tell);
    `cut_on()` severs the one connection that sends a given message, after passing it on, as a
    connection lost while the database ran it does."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False
        self._frozen = threading.Event()
        self._cut_on: _Cut | None = None
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
            link = _Link(client, server)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, link), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, link: _Link) -> None:
        upstream = src is link.client
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream and self._severs(link, data):
                    dst.sendall(data)  # the database runs it; no answer reaches the client
                    assert link.cut is not None
                    if link.cut.silent:
                        self._frozen.set()
                        continue
                    with contextlib.suppress(OSError):
                        link.client.shutdown(socket.SHUT_RDWR)
                    return
                if link.cut is not None:
                    if link.cut.silent:  # the database's answer, dropped
                        link.cut.severed.set()
                        continue
                    break  # the database's answer to the severed message
                if not self._frozen.is_set():
                    dst.sendall(data)
        if link.cut is not None and not upstream:
            with contextlib.suppress(OSError):
                link.server.shutdown(socket.SHUT_RDWR)
            link.cut.severed.set()
            return
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _severs(self, link: _Link, data: bytes) -> bool:
        """Whether `data`, sent by the client of `link`, is the message `cut_on` waits for
        (then `link` is marked severed before the message goes on)."""
        with self._lock:
            cut = self._cut_on
            if cut is None:
                return False
            if cut.marker in data:
                link.marked = cut
            if link.marked is not cut or (cut.then and cut.then not in data):
                return False
            link.cut, self._cut_on = cut, None
        return True

    def cut_on(self, marker: bytes, then: bytes = b"") -> threading.Event:
        """Sever the first connection whose client sends `then` after (or with) a message
        holding `marker` (that message itself, `then` empty): the message reaches the database,
        and the client's side of the connection is closed before any answer comes back. Once;
        the event is set when the database answered it (a COMMIT is then done), or closed."""
        severed = threading.Event()
        with self._lock:
            self._cut_on = _Cut(marker, then, severed)
        return severed

    def freeze_on(self, marker: bytes, then: bytes) -> threading.Event:
        """As `cut_on`, but the message once passed on every connection goes silent
        (`freeze`), the database's answer dropped too, until `thaw`: a database host frozen,
        or the network to it gone, while it ran the message. The event is set once the
        database answered it."""
        severed = threading.Event()
        with self._lock:
            self._cut_on = _Cut(marker, then, severed, silent=True)
        return severed

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        """Pass what is sent again, after `freeze`: what was dropped stays lost."""
        self._frozen.clear()

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

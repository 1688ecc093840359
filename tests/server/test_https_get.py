"""server/https_get: one bounded GET of another party's document, over a real socket (plain
HTTP and TLS)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from server import https_get
from tests.server.fixtures import short_tmpdir, write_tls_files


class Peer:
    """A server that answers one GET with ``answer``; over TLS when asked."""

    def __init__(self, answer: Callable[[socket.socket], None], tls: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.client_context: ssl.SSLContext | None = None
        server_context = None
        if tls:
            ca_file, cert, key = write_tls_files(short_tmpdir("hg"))
            server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server_context.load_cert_chain(cert, key)
            self.client_context = ssl.create_default_context(cafile=ca_file)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}/doc"
        self._done = threading.Event()

        def serve() -> None:
            raw, _ = self.listener.accept()
            conn = raw if server_context is None else server_context.wrap_socket(raw, True)
            with conn:
                try:
                    conn.recv(65536)  # the request
                    answer(conn)
                except OSError:  # the client went away
                    pass
                self._done.wait(10)

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()

    def get(self, timeout: float) -> https_get.Reply:
        return https_get.get(self.url, context=self.client_context, limit=1 << 20, timeout=timeout)

    def close(self) -> None:
        self._done.set()
        self._thread.join(10)
        self.listener.close()


def _trickle(conn: socket.socket) -> None:
    # Each byte well inside the per-read timeout, the answer never complete.
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(200):
        conn.sendall(b"x")
        time.sleep(0.1)


def _prompt(conn: socket.socket) -> None:
    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"keys":[]}')


@pytest.fixture(params=[False, True], ids=["http", "https"])
def peer_of(request: pytest.FixtureRequest) -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def make(answer: Callable[[socket.socket], None]) -> Peer:
        peers.append(Peer(answer, request.param))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


def test_a_trickled_answer_is_cut_at_the_timeout_for_the_whole_get(
    peer_of: Callable[..., Peer],
) -> None:
    peer = peer_of(_trickle)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no whole answer within 1 s"):
        peer.get(timeout=1.0)
    assert time.monotonic() - started < 5  # the trickle lasts 20 s


def test_a_prompt_answer_is_read_whole(peer_of: Callable[..., Peer]) -> None:
    reply = peer_of(_prompt).get(timeout=5.0)
    assert (reply.status, reply.body) == (200, b'{"keys":[]}')

"""Attack repro (FAILS ON PURPOSE until fixed): server/https_get's whole-GET deadline is lost
when the endpoint's host name resolves to more than one address and the first does not answer.

``socket.create_connection`` tries each address with the full per-operation ``timeout``, while
``conn.sock`` is still None: the deadline timer fires then, ``_cut`` finds no socket to shut
down, and never fires again. The next address connects and its server may trickle the answer
(each byte inside the per-read timeout) for as long as it likes: the foreign trust domain (it
owns its endpoint's DNS: one unreachable address first) holds the fetch, and with it
FederationService.refresh_due, which refreshes every relationship one after the other.

Only the name resolution is stood in for (no second address for one name on this machine):
the blackholed address is a real listener whose accept queue is full, the trickle a real server.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from server import https_get


def test_a_blackholed_first_address_does_not_lift_the_deadline_for_the_whole_get(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A listener that never accepts, its queue full: a connect to it hangs (SYNs dropped).
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname(), timeout=1.0)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        raw, _ = server.accept()
        with raw:
            try:
                raw.recv(65536)  # the request
                raw.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                for _ in range(200):  # 20 s, each byte well inside the per-read timeout
                    if stop.is_set():
                        return
                    raw.sendall(b"x")
                    time.sleep(0.1)
            except OSError:  # the client went away: what a working deadline does
                pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    real = socket.getaddrinfo
    addresses = [blackhole.getsockname(), server.getsockname()]

    def two_addresses(host: str, *args: object, **kwargs: object) -> list[tuple]:  # type: ignore[type-arg]
        if host != "partner.test":
            return real(host, *args, **kwargs)  # type: ignore[arg-type]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    url = f"http://partner.test:{server.getsockname()[1]}/"
    started = time.monotonic()
    try:
        with pytest.raises((TimeoutError, OSError)):
            https_get.get(url, context=None, limit=1 << 20, timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(30)
        for sock in (filler, blackhole, server):
            sock.close()
    assert elapsed < 5, f"GET with timeout=1 s held {elapsed:.1f} s (the deadline fired unseen)"

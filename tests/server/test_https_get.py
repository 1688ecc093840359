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
from tests.waits import wait_for


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


def test_the_whole_get_keeps_its_deadline_past_a_blackholed_first_address_and_a_trickling_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The name resolves to two addresses (only the resolution is stood in for: no name has two
    # here). The first is a listener that never accepts, its queue full: a connect to it hangs
    # (SYNs dropped). http.client's connect gave it the whole timeout while the deadline had no
    # socket to cut, so the deadline was lost and the second address trickled for 20 s.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname(), timeout=1.0)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        server.settimeout(3)  # the GET may never come here: its deadline passed first
        try:
            raw, _ = server.accept()
        except OSError:
            return
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
        with pytest.raises(TimeoutError, match="no whole answer within 1 s"):
            https_get.get(url, context=None, limit=1 << 20, timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(30)
        for sock in (filler, blackhole, server):
            sock.close()
    assert elapsed < 5, f"GET with timeout=1 s held {elapsed:.1f} s (the deadline fired unseen)"


def test_a_name_the_resolver_is_slow_to_resolve_is_given_only_the_gets_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The resolver is stood in for (no name is slow here): one that takes 3 s, as a resolver
    # whose servers do not answer takes its resolv.conf timeouts, held the GET those 3 s past
    # its deadline of 0.5 s, the lookup coming before the deadline's clock.
    real = socket.getaddrinfo
    release = threading.Event()

    def slow(host: str, *args: object, **kwargs: object) -> list[tuple]:  # type: ignore[type-arg]
        if host == "partner.test":
            release.wait(3)
            host = "127.0.0.1"
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"no whole answer within 0\.5 s"):
            https_get.get("https://partner.test:1/", context=None, limit=1 << 20, timeout=0.5)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert elapsed < 1.5, f"GET with timeout=0.5 s held {elapsed:.1f} s resolving its host"


def test_lookups_of_a_resolver_that_never_answers_do_not_pile_up_a_thread_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A resolver that never answers (a hung NSS module, a dead nameserver with long
    # resolv.conf timeouts): each GET gives up at its deadline, but its lookup thread cannot be
    # cut. Fetches are retried (every issuer, every relationship, again and again): the threads
    # they leave must stay bounded, by about the fetch pools' sizes, not grow one per GET.
    real = socket.getaddrinfo
    release = threading.Event()

    def hung(host: str, *args: object, **kwargs: object) -> list[tuple]:  # type: ignore[type-arg]
        if host == "partner.test":
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "temporary failure in name resolution")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    def lookups() -> int:
        return sum(t.name == "https-get-resolve" and t.is_alive() for t in threading.enumerate())

    monkeypatch.setattr(socket, "getaddrinfo", hung)
    gets = 40
    try:
        for _ in range(gets):
            with pytest.raises(TimeoutError):
                https_get.get("https://partner.test:1/", context=None, limit=1 << 20, timeout=0.01)
        held = lookups()
    finally:
        release.set()
    bound = 3 * https_get.FETCHES_AT_ONCE  # every fetch pool's threads, each in a lookup
    assert held <= bound, f"{gets} GETs of a hung resolver left {held} lookup threads running"


def test_past_its_bound_of_unanswered_names_a_get_fails_at_once_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Names are shared by their GETs; many names under one hung resolver are bounded too.
    release = threading.Event()

    def hung(host: str, *args: object, **kwargs: object) -> list[tuple]:  # type: ignore[type-arg]
        release.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "temporary failure in name resolution")

    _no_lookup_pending()  # an earlier test's, released, may still be ending
    monkeypatch.setattr(socket, "getaddrinfo", hung)
    try:
        for i in range(https_get.LOOKUPS_AT_ONCE):
            with pytest.raises(TimeoutError):
                https_get.get(f"https://p{i}.test:1/", context=None, limit=1 << 20, timeout=0.01)
        started = time.monotonic()
        with pytest.raises(OSError, match="name lookups are under way") as refused:
            https_get.get("https://one-more.test:1/", context=None, limit=1 << 20, timeout=5)
        assert not isinstance(refused.value, TimeoutError)
        assert time.monotonic() - started < 1
    finally:
        release.set()
    _no_lookup_pending()  # once the resolver answers, the names are free again


def _no_lookup_pending() -> None:
    wait_for(lambda: not https_get._LOOKUPS._pending, 5, "no lookup pending", interval=0.01)


def test_a_lookup_thread_that_cannot_start_fails_its_get_and_leaves_the_name_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The process out of threads (its pids limit reached, say, by lookups a hung resolver
    # holds): the GET must fail as a GET does (OSError), and the name must not stay "under
    # way" with a lookup nobody runs, or every later GET of it waits out its whole timeout on
    # a future never settled, and its party's room is gone for the life of the process.
    lookups = https_get._Lookups(limit=4, per_party=2)
    real = threading.Thread

    class NoThread(real):  # type: ignore[valid-type,misc]
        def start(self) -> None:
            if self.name == "https-get-resolve":
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(threading, "Thread", NoThread)
    for _ in range(3):  # past the party's room, were the failed ones still counted
        with pytest.raises(OSError, match="can't start new thread"):
            lookups.of("localhost", 443, "partner")
    monkeypatch.setattr(threading, "Thread", real)
    addresses = lookups.of("localhost", 443, "partner").result(timeout=5)
    assert addresses
    wait_for(lambda: not lookups._pending, 5, "no lookup pending", interval=0.01)
    assert not lookups._held


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "fe80::1%1",
        "0.0.0.0",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "224.0.0.1",
        "240.0.0.1",
        "100.100.100.200",
        "fd00:ec2::254",
        "fd00:ec2::23",  # EKS Pod Identity's agent, which hands out AWS credentials
        "::ffff:100.100.100.200",
    ],
)
def test_addresses_of_this_host_or_its_link_are_inward(address: str) -> None:
    assert https_get.inward(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "10.1.2.3", "2606:4700::1111"])
def test_other_hosts_addresses_are_not_inward(address: str) -> None:
    # A private range is another host of the deployment (an issuer on 10/8), not this one.
    assert not https_get.inward(address)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_outward_get_connects_to_no_inward_address_whatever_the_name(scheme: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"{scheme}://localhost:{listener.getsockname()[1]}/doc"
        with pytest.raises(OSError, match="of this host or its link"):
            https_get.get(url, context=None, limit=100, timeout=2, outward=True)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()


def _own_address() -> str | None:
    """One of this host's IPv4 addresses that is not loopback: the source the kernel picks
    towards another network (a UDP connect sends nothing), or None on a host without one."""
    for far in ("192.0.2.1", "198.51.100.1", "10.255.255.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((far, 9))
            except OSError:
                continue
            here = str(probe.getsockname()[0])
        if not https_get.inward(here):
            return here
    return None


def test_an_outward_get_reaches_no_service_of_this_host_by_its_own_address() -> None:
    # The host's LAN (or public) address is no loopback nor link-local, so `inward` lets it
    # through; yet it reaches every service here listening on all addresses (svidd's own,
    # a database, a sidecar's admin port).
    here = _own_address()
    if here is None:
        pytest.skip("this host has no address but loopback")
    with socket.create_server(("0.0.0.0", 0)) as listener:
        url = f"http://{here}:{listener.getsockname()[1]}/doc"
        with pytest.raises(OSError, match="this host's own"):
            https_get.get(url, context=None, limit=100, timeout=2, outward=True)

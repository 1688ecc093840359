"""One bounded GET of another party's JSON document (a federated trust domain's bundle, a
trusted issuer's discovery document and keys): no redirect followed, at most ``limit`` bytes
read, within ``timeout`` in all, the connection closed. Blocking (http.client): callers run it
in a worker thread, and map its errors (OSError, TimeoutError among them,
http.client.HTTPException, ssl.SSLError) to their own."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# One address of a name, as socket.getaddrinfo gives it.
_Address = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]

# How many of another party's documents one kind of fetch (foreign bundles, trusted issuers'
# keys) waits on at once, each in a thread of its own pool (fetch_pool): one party that hangs
# holds a thread up to its deadline, not the others' fetches.
FETCHES_AT_ONCE = 4


def fetch_pool(name: str, size: int = FETCHES_AT_ONCE) -> ThreadPoolExecutor:
    """Threads for one kind of fetch, apart from the loop's default pool (which entry writes,
    agent admission and the admin API share): fetches wait on other parties, up to their
    deadline each when those hang. Threads start as needed; the owner shuts the pool down."""
    return ThreadPoolExecutor(size, thread_name_prefix=name)


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
    party: str = "",
    outward: bool = False,
) -> Reply:
    """GET ``url`` (https with ``context``; plain http only where the caller allowed it).
    ``check_peer`` is given the server's certificate (DER) before the request is read: it
    raises to refuse the server. ``timeout`` bounds the whole GET, not each read: a server
    that trickles its answer a byte at a time would otherwise hold the caller for ever. It
    bounds the name's resolution and the connect too: the lookup, then each address the name
    resolves to, is given only the time left. ``party`` (a federated trust domain, an
    issuer; the URL's host when "") is whose names the lookup counts against: see
    PARTY_LOOKUPS_AT_ONCE. ``outward``: a URL another party chose (not the operator), so
    no address of this host or its link (see `inward`) is connected to, whatever name
    leads there."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    conn: http.client.HTTPConnection
    if tls:
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    ends = time.monotonic() + timeout
    cutter = _Cutter()
    deadline = threading.Timer(timeout, cutter.cut)
    deadline.daemon = True
    deadline.start()
    try:
        try:
            # Connected here, not by http.client: its connect (socket.create_connection)
            # gives every address the whole timeout, with no socket the deadline could cut.
            sock = _connect(
                host, conn.port, ends, cutter, timeout, party=party or host, outward=outward
            )
            if tls:
                sock = _handshake(sock, host, context, cutter)
            conn.sock = sock  # http.client sends on it and does not connect again
            conn.request("GET", path, headers={"Accept": "application/json"})
            if check_peer is not None:
                check_peer(
                    sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
                )
            response = conn.getresponse()
            reply = Reply(response.status, response.read(limit + 1), response.headers)
        except (OSError, http.client.HTTPException):
            if cutter.fired:  # what the cut made of the read (EOF, a TLS error) is not news
                raise _late(timeout) from None
            raise
        if cutter.fired:  # cut short: what was read may end anywhere
            raise _late(timeout)
        return reply
    finally:
        deadline.cancel()
        deadline.join()  # a cut under way finishes before the socket is closed and let go
        cutter.hold(None)
        conn.close()


class _Cutter:
    """The deadline's hold on the GET's socket of the moment (each connect attempt's, then the
    connected one's): the GET's thread hands each over before it blocks on it, so the deadline
    always finds the socket to cut, and a socket handed over after the deadline is cut at once.
    Shutting the socket down (not closing it: its descriptor stays the GET's) is what another
    thread may safely do; the plain socket's shutdown, as a TLS socket's own would drop its TLS
    state under the reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False

    def hold(self, sock: socket.socket | None) -> None:
        """`sock` is the one to cut from now on (None: the one held is about to be closed)."""
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shut()

    def cut(self) -> None:
        with self._lock:
            self.fired = True
            self._shut()

    def _shut(self) -> None:
        if self._sock is not None:
            # OSError: not connected (yet), or closed already; nothing is read from it then.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)


def inward(address: str) -> bool:
    """Whether `address` reaches this host or its link rather than another party's server:
    loopback, link-local (a cloud's metadata service, 169.254.169.254), unspecified (0.0.0.0
    connects to this host), multicast or reserved; IPv4-mapped IPv6 as the IPv4 address it
    maps; and the metadata services clouds put elsewhere (_METADATA). A URL another party
    chose must not lead there (SSRF)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
        or any(ip in network for network in _METADATA)
    )


# Cloud metadata services outside the link-local range: Alibaba Cloud's (in the shared
# address space), and the network AWS serves its instances' IPv6 link services on (a unique
# local one): the instance metadata service at ::254, but also EKS Pod Identity's agent
# (credentials) at ::23, the DNS resolver at ::253. Private ranges as such are not inward:
# an issuer's keys may be served by another host of the deployment.
_METADATA = (
    ipaddress.ip_network("100.100.100.200/32"),
    ipaddress.ip_network("fd00:ec2::/64"),
)


def _connect(
    host: str,
    port: int,
    ends: float,
    cutter: _Cutter,
    timeout: float,
    *,
    party: str,
    outward: bool = False,
) -> socket.socket:
    """A TCP connection to the first of `host`'s addresses that answers, each attempt given
    only what is left of the GET's time; the socket's timeout then is what remains. With
    `outward`, addresses that are `inward` are skipped, and a connection found to lead to
    this host itself (`_to_itself`) is dropped before anything is sent on it: checked on the
    very address connected to, so a name that resolves elsewhere the next time (DNS
    rebinding) gains nothing."""
    error: OSError | None = None
    for family, kind, proto, _, address in _resolve(host, port, ends, timeout, party):
        if outward and inward(str(address[0])):
            error = OSError(f"{host}: address {address[0]} is of this host or its link: refused")
            continue
        left = ends - time.monotonic()
        if left <= 0 or cutter.fired:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            cutter.hold(sock)
            sock.connect(address)
        except OSError as exc:
            cutter.hold(None)  # let go before closing: the cut never sees a closed descriptor
            sock.close()
            error = exc
            continue
        if outward and _to_itself(sock):
            cutter.hold(None)
            sock.close()  # nothing was sent on it
            error = OSError(f"{host}: address {address[0]} is this host's own: refused")
            continue
        # A cut that came as connect returned has shut this socket down: the request's first
        # send fails, and get() reports the deadline.
        sock.settimeout(max(ends - time.monotonic(), 0.001))
        return sock
    if cutter.fired or time.monotonic() >= ends:
        raise _late(timeout)
    raise error if error is not None else OSError(f"{host}: no address to connect to")


def _to_itself(sock: socket.socket) -> bool:
    """Whether `sock` is connected to this very host by one of its own addresses that is not
    loopback (its LAN or public address): `inward` cannot know those, yet they reach every
    service here listening on all addresses (0.0.0.0, ::). The kernel routes such a connection
    through the loopback device from the address itself, so its two ends share one address."""
    try:
        here, there = sock.getsockname()[0], sock.getpeername()[0]
    except OSError:  # no longer connected: the request's send fails and says so
        return False
    return bool(here == there)


def _resolve(host: str, port: int, ends: float, timeout: float, party: str) -> Sequence[_Address]:
    """`host`'s addresses, looked up within what is left of the GET's time. The system
    resolver gives up only after its own timeouts (resolv.conf), which may be far longer: the
    lookup runs in a daemon thread of its own, left to end by itself once the deadline passes
    (the resolver cannot be cut). An address literal needs no lookup, nor a thread."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    try:
        return _LOOKUPS.of(host, port, party).result(timeout=max(ends - time.monotonic(), 0))
    except FutureTimeout:
        raise _late(timeout) from None


# Lookups the resolver has not answered yet, at most this many for one party (a federated
# trust domain, an issuer) at once: past it that party's GETs of other names fail at once.
# A party whose names never resolve (its nameservers down, or names it made up to hang us)
# then holds this many threads, and no more of the room the other parties' lookups need.
PARTY_LOOKUPS_AT_ONCE = 4
# And at most this many in all, whatever the parties: past it a GET fails at once rather than
# leave one more thread the resolver may hold for minutes. Room for 16 parties whose names
# all hang before a GET of another is refused (a single cap of 16 names was filled by one).
LOOKUPS_AT_ONCE = 64


class _Lookups:
    """The name lookups under way, one per (host, port): GETs of a name already being looked
    up wait on that lookup rather than start another, so a resolver that hangs holds one
    thread per name (every fetch of an issuer or relationship is retried), not one per GET.
    Each lookup counts against the party whose GET started it, up to `per_party`, and all
    of them against `limit`. One for the process, as the resolver it shields is."""

    def __init__(self, limit: int, per_party: int) -> None:
        self._limit = limit
        self._per_party = per_party
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], Future[Sequence[_Address]]] = {}
        self._held: dict[str, int] = {}  # pending lookups by the party that started them

    def of(self, host: str, port: int, party: str) -> Future[Sequence[_Address]]:
        key = (host, port)
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None:
                return pending
            if self._held.get(party, 0) >= self._per_party:
                raise OSError(
                    f"{host}: {self._per_party} name lookups for {party} are under way and "
                    "unanswered; are its names' servers down?"
                )
            if len(self._pending) >= self._limit:
                raise OSError(
                    f"{host}: {self._limit} name lookups are under way and unanswered; "
                    "is the resolver down?"
                )
            future: Future[Sequence[_Address]] = Future()
            self._pending[key] = future
            self._held[party] = self._held.get(party, 0) + 1

        def lookup() -> None:
            try:
                future.set_result(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
            except Exception as exc:  # handed to the GETs, which raise it as the lookup would
                future.set_exception(exc)
            finally:
                self._release(key, party)

        try:
            threading.Thread(target=lookup, name="https-get-resolve", daemon=True).start()
        except RuntimeError as exc:  # the process is out of threads
            # No lookup runs: the name is not under way, else every GET of it waits out its
            # timeout on a future nobody settles, and its party's room is never given back.
            self._release(key, party)
            failed = OSError(f"{host}: cannot look the name up: {exc}")
            future.set_exception(failed)  # a GET that joined it meanwhile fails now too
            raise failed from None
        return future

    def _release(self, key: tuple[str, int], party: str) -> None:
        with self._lock:
            self._pending.pop(key, None)
            left = self._held.pop(party) - 1
            if left:
                self._held[party] = left


_LOOKUPS = _Lookups(LOOKUPS_AT_ONCE, PARTY_LOOKUPS_AT_ONCE)


def _handshake(
    sock: socket.socket, host: str, context: ssl.SSLContext | None, cutter: _Cutter
) -> ssl.SSLSocket:
    """TLS over the connected socket, the handshake under the deadline too: wrapping takes
    the socket's descriptor over, so the TLS socket is handed to the cutter before the
    handshake blocks on it."""
    ctx = context if context is not None else ssl.create_default_context()
    held: socket.socket = sock
    try:
        tls = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        held = tls
        cutter.hold(tls)
        tls.do_handshake()
    except BaseException:
        cutter.hold(None)
        held.close()
        raise
    return tls


def _late(timeout: float) -> TimeoutError:
    return TimeoutError(f"no whole answer within {timeout:g} s")


def holds_userinfo(url: str) -> bool:
    """Whether `url`'s authority (what follows the scheme, up to the first /, ? or #) holds
    user info (user@ or user:pw@): a URL of another party to fetch never should, and the
    password it may carry must not be logged or quoted with the URL."""
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    return "@" in authority

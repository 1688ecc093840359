"""svid.tls over real TLS: rotation without restart, authorisation before any application data,
refused peers whose buffered requests never reach the application, and revocation that reaches
open connections. Each workload has its own X509Source on a real Workload API (fake agent)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from svid import (
    AsyncX509Source,
    SpiffeId,
    TrustDomain,
    VerificationError,
    certs_to_pem,
    der_concat,
    tls,
)
from svid._proto import revocation_pb2
from svid._source_state import RevocationEvent
from svid._tls_contexts import private_pem
from svid._tls_gate import VerifyingSSLObject, ended_task
from svid._verify_x509 import VerifiedX509
from svid.workloadapi import WorkloadApiUnavailableError
from tests.svid.certs import junk_cert, make_ca
from tests.svid.tls_pki import Pki, make_pki, plain_context
from tests.svid.tls_world import (
    CLIENT,
    FAST,
    INTRUDER,
    REQUEST,
    SERVER,
    Workload,
    https_server,
    raw_request,
    sock_root,
    workload,
)
from tests.svid.workload_fake import eventually, signed_crl


@dataclass
class World:
    pki: Pki
    server: Workload
    client: Workload


@pytest.fixture
def world() -> Iterator[World]:
    pki = make_pki()
    with sock_root() as root, workload(pki, SERVER, root) as s, workload(pki, CLIENT, root) as c:
        yield World(pki, s, c)


def _get(ctx: ssl.SSLContext, port: int, client: httpx.Client | None = None) -> httpx.Response:
    if client is not None:
        return client.get(f"https://127.0.0.1:{port}/x")
    with httpx.Client(verify=ctx) as one_off:
        return one_off.get(f"https://127.0.0.1:{port}/x")


# --- the handshake admits exactly the authorised peers ------------------------------------------


@pytest.mark.parametrize("handshake_on_connect", [False, True])
def test_mtls_both_ways_with_httpx_and_http_server(
    world: World, handshake_on_connect: bool
) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    cctx = tls.client_context(world.client.source, SERVER)
    with https_server(sctx, handshake_on_connect=handshake_on_connect) as (port, seen, _httpd):
        response = _get(cctx, port)
        assert response.status_code == 200
        assert response.text == "hello"
    assert seen.requests == ["/x"]
    assert seen.peers == [CLIENT]  # tls.peer_of(self.connection) in the handler


@pytest.mark.parametrize("handshake_on_connect", [False, True])
@pytest.mark.parametrize("who", ["unauthorised ID", "other trust domain", "revoked"])
def test_refused_client_request_never_reaches_the_app(
    world: World, who: str, handshake_on_connect: bool
) -> None:
    sctx = tls.server_context(world.server.source, tls.authorize_one_of(CLIENT))
    if who == "unauthorised ID":
        peer = plain_context(world.pki.svid(INTRUDER), world.pki, server=False)
    elif who == "other trust domain":
        other = make_pki("other.org")  # the server does not trust it: OpenSSL refuses first
        peer = plain_context(other.svid("spiffe://other.org/client"), world.pki, server=False)
    else:
        svid = world.pki.svid(CLIENT)
        world.server.revoke(svid.leaf.serial_number)
        eventually(
            lambda: world.server.source.revocations.is_serial_revoked(
                format(svid.leaf.serial_number, "x")
            ),
            "revocation at the server",
        )
        peer = plain_context(svid, world.pki, server=False)
    with https_server(sctx, handshake_on_connect=handshake_on_connect) as (port, seen, _httpd):
        answer = raw_request(peer, port)
        ok = plain_context(world.pki.svid(CLIENT), world.pki, server=False)
        assert raw_request(ok, port).startswith(b"HTTP/1.1 200")  # the server still serves
    assert answer == b""
    assert seen.requests == ["/secret"]  # only the authorised client's request
    assert seen.peers == [CLIENT]


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def _step(obj: Any, call: str, *args: Any) -> Any:
    try:
        return getattr(obj, call)(*args)
    except ssl.SSLWantReadError:
        return None


def test_buffered_early_data_of_a_refused_peer_is_never_returned(world: World) -> None:
    # Deterministic, in memory: the refused client's request is already in the server's buffer
    # (with its Finished) when the server application first reads; OpenSSL alone would finish
    # the handshake inside that read and hand the request over.
    sctx = tls.server_context(world.server.source, CLIENT)
    peer = plain_context(world.pki.svid(INTRUDER), world.pki, server=False)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    client = peer.wrap_bio(c_in, c_out, server_hostname="x")
    assert isinstance(server, VerifyingSSLObject)
    _step(client, "do_handshake")
    _pump(c_out, s_in)
    _step(server, "do_handshake")  # ServerHello .. Finished out; waits for the client's
    _pump(s_out, c_in)
    client.do_handshake()  # the client is done: TLS 1.3 lets it send at once
    client.write(REQUEST)
    _pump(c_out, s_in)  # Certificate, Finished and the request, all buffered at the server
    with pytest.raises(tls.PeerRefusedError, match=f"{INTRUDER} is not authorised") as info:
        server.read(4096)
    assert isinstance(info.value, ssl.SSLError)
    assert isinstance(info.value, VerificationError)
    # Printed as the sentence it is (ssl.SSLError alone would show "('TLS peer ...',)").
    assert str(info.value).startswith(f"TLS peer {INTRUDER} is not authorised")
    for _ in range(3):  # an application that ignores the error gets nothing either
        with pytest.raises(tls.PeerRefusedError):
            server.read(4096)
        with pytest.raises(tls.PeerRefusedError):
            server.write(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(VerificationError):
        tls.peer_of(server)


def test_explicit_handshake_refuses_and_stays_refused(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    peer = plain_context(world.pki.svid(INTRUDER), world.pki, server=False)
    a, b = socket.socketpair()
    got: dict[str, Any] = {}

    def serve() -> None:
        with sctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False) as conn:
            with contextlib.suppress(tls.PeerRefusedError):
                conn.do_handshake()
            got["handshake"] = "refused"
            try:
                got["read"] = conn.recv(4096)
            except tls.PeerRefusedError as exc:
                got["read"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    with b, peer.wrap_socket(b, server_hostname="x") as conn, contextlib.suppress(OSError):
        conn.sendall(REQUEST)
    thread.join(10)
    assert got["handshake"] == "refused"
    assert isinstance(got["read"], tls.PeerRefusedError)


async def _admits_when_awaited(peer: VerifiedX509) -> bool:
    return True


def _breaks(peer: VerifiedX509) -> bool:
    raise PermissionError("the authorizer's own lookup failed")


@pytest.mark.parametrize(
    ("authorize", "says"),
    [
        (_admits_when_awaited, "returned a coroutine, not True"),
        (lambda peer: "no", "returned a str, not True"),
        (_breaks, "authorizer raised PermissionError"),
    ],
    ids=["async def", "truthy str", "raises"],
)
def test_an_authorizer_admits_only_by_returning_true(
    world: World, authorize: Any, says: str
) -> None:
    # An async authorizer's coroutine, never awaited, is truthy: the peer was admitted. One
    # that raised let its own exception out of the handshake, not the PeerRefusedError (an
    # ssl.SSLError) servers handle, and was called again on every read.
    sctx = tls.server_context(world.server.source, authorize)
    peer = plain_context(world.pki.svid(CLIENT), world.pki, server=False)
    a, b = socket.socketpair()
    got: dict[str, Any] = {}

    def serve() -> None:
        with sctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False) as conn:
            for step, call in (("handshake", conn.do_handshake), ("read", conn.recv)):
                try:
                    got[step] = call()
                except Exception as exc:  # what each raises is the point
                    got[step] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    with b, peer.wrap_socket(b, server_hostname="x") as conn, contextlib.suppress(OSError):
        conn.sendall(REQUEST)
    thread.join(10)
    assert isinstance(got["handshake"], tls.PeerRefusedError), got
    assert says in str(got["handshake"])
    assert got["read"] is got["handshake"]  # refused for good, the authorizer not asked again


def test_client_refuses_a_server_with_another_id_before_sending(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    cctx = tls.client_context(world.client.source, "spiffe://example.org/billing")
    with (
        https_server(sctx) as (port, seen, _httpd),
        pytest.raises(httpx.ConnectError, match="not authorised"),
    ):
        _get(cctx, port)
    assert seen.requests == []


def test_asyncio_server_and_client(world: World) -> None:
    other = make_pki("other.org")
    # The server trusts other.org too. An example.org CA signing an other.org ID passes
    # OpenSSL's check (it chains to a trusted root) but not svid's: other.org's bundle rules.
    world.server.state.change(
        x509={**world.server.state.x509, str(other.trust_domain.id): der_concat([other.root.cert])}
    )
    eventually(lambda: world.server.source.x509_bundle_for(other.trust_domain), "other.org")
    forged = plain_context(world.pki.svid("spiffe://other.org/x"), world.pki, server=False)

    async def main() -> tuple[list[str], bytes, bytes]:
        seen: list[str] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(str(tls.peer_of(writer).spiffe_id))
            seen.append((await reader.readline()).decode().strip())
            writer.write(b"hello\n")
            await writer.drain()
            writer.close()

        sctx = tls.server_context(world.server.source, tls.authorize_any())
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        cctx = tls.client_context(world.client.source, SERVER)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
        assert str(tls.peer_of(writer).spiffe_id) == SERVER
        writer.write(b"GET /\n")
        good = await reader.read()
        writer.close()
        bad = b""
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=forged)
            writer.write(b"GET /secret\n")
            bad = await reader.read()
            writer.close()
        server.close()
        await server.wait_closed()
        return seen, good, bad

    seen, good, bad = asyncio.run(main())
    assert good == b"hello\n"
    assert bad == b""
    assert seen == [CLIENT, "GET /"]


# --- rotation without restart -------------------------------------------------------------------


def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="x") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
        conn.sendall(REQUEST)
        conn.recv(1)
    from cryptography import x509

    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_server_rotates_without_restart(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    client = plain_context(world.pki.svid(CLIENT), world.pki, server=False)
    with https_server(sctx) as (port, seen, _httpd):  # the listening socket wrapped once
        first = world.server.serial
        assert _served_serial(port, client) == first
        second = world.server.rotate()
        assert _served_serial(port, client) == second
        # A keep-alive connection made before the rotation still works (TLS keeps its cert).
        assert len(seen.requests) == 2


def test_client_rotates_without_restart_and_keeps_its_connection_pool(world: World) -> None:
    serials: list[int] = []

    def record(peer: VerifiedX509) -> bool:
        serials.append(int(peer.serial, 16))
        return str(peer.spiffe_id) == CLIENT

    sctx = tls.server_context(world.server.source, record)
    cctx = tls.client_context(world.client.source, SERVER)
    with https_server(sctx) as (port, _seen, _httpd), httpx.Client(verify=cctx) as client:
        assert _get(cctx, port, client).status_code == 200
        first = world.client.serial
        second = world.client.rotate()
        assert _get(cctx, port, client).status_code == 200  # pooled: the old connection
        assert _get(cctx, port).status_code == 200  # a new connection: the new SVID
    assert serials == [first, second]


def test_trust_follows_the_bundle(world: World) -> None:
    # A new CA joins the server's bundle: clients under it are accepted without a restart; it
    # leaves: they are refused again (OpenSSL's store cannot drop a CA, a fresh context can).
    sctx = tls.server_context(world.server.source, CLIENT)
    newer = make_pki()
    client = plain_context(newer.svid(CLIENT), newer, world.pki, server=False)
    server_bundle = world.server.state.x509
    with https_server(sctx) as (port, seen, _httpd):
        assert raw_request(client, port) == b""
        world.server.state.change(
            x509={
                str(world.pki.trust_domain.id): der_concat([world.pki.root.cert, newer.root.cert])
            }
        )
        eventually(
            lambda: len(world.server.source.x509_bundles[world.pki.trust_domain].authorities) == 2,
            "the new CA",
        )
        assert raw_request(client, port).startswith(b"HTTP/1.1 200")
        world.server.state.change(x509=server_bundle)
        eventually(
            lambda: len(world.server.source.x509_bundles[world.pki.trust_domain].authorities) == 1,
            "the CA gone",
        )
        assert raw_request(client, port) == b""
    assert seen.requests == ["/secret"]


# --- revocation reaches open connections ------------------------------------------------------


def test_revoked_peer_loses_its_keep_alive_connection(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    cctx = tls.client_context(world.client.source, SERVER)
    with https_server(sctx) as (port, seen, _httpd), httpx.Client(verify=cctx) as client:
        assert _get(cctx, port, client).status_code == 200
        assert not seen.closed.is_set()  # the handler waits for the next request
        started = time.monotonic()
        world.server.revoke(world.client.serial)
        assert seen.closed.wait(5), "the revoked peer's connection stayed open"
        elapsed = time.monotonic() - started
        with pytest.raises(httpx.TransportError):
            _get(cctx, port, client)  # and it cannot come back with the same SVID
    assert seen.requests == ["/x"]
    assert elapsed < 1.0, f"revocation took {elapsed:.3f}s to close the connection"


async def _ticks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An SSE-like stream: an event every 20 ms, until the connection fails."""
    with contextlib.suppress(OSError):
        while True:
            writer.write(b"data: tick\n\n")
            await writer.drain()
            await asyncio.sleep(0.02)


def test_revoked_peer_stream_ends_on_an_asyncio_server(world: World) -> None:
    async def main() -> float:
        sctx = tls.server_context(world.server.source, CLIENT)
        server = await asyncio.start_server(_ticks, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        cctx = tls.client_context(world.client.source, SERVER)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
        assert await reader.readline() == b"data: tick\n"
        started = time.monotonic()
        world.server.revoke(world.client.serial)
        with contextlib.suppress(OSError):
            while await reader.readline():
                pass
        elapsed = time.monotonic() - started
        writer.close()
        server.close()
        await server.wait_closed()
        return elapsed

    elapsed = asyncio.run(asyncio.wait_for(main(), 10))
    assert elapsed < 1.0, f"revocation took {elapsed:.3f}s to end the stream"


def test_new_peers_are_refused_while_revocation_data_is_stale(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT, max_revocation_staleness=0.3)
    client = plain_context(world.pki.svid(CLIENT), world.pki, server=False)
    with https_server(sctx) as (port, _seen, httpd):
        assert raw_request(client, port).startswith(b"HTTP/1.1 200")
        world.server.agent.stop()
        eventually(lambda: world.server.source.revocation_staleness() > 0.3, "stale data")
        assert raw_request(client, port) == b""
        eventually(
            lambda: any("max_revocation_staleness" in str(e) for e in httpd.errors),
            "the refusal to name the staleness",
        )
        world.server.agent.start()
        eventually(lambda: world.server.source.revocation_staleness() == 0, "fresh data")
        assert raw_request(client, port).startswith(b"HTTP/1.1 200")


def test_an_open_stream_ends_once_revocation_data_is_stale(world: World) -> None:
    """A peer admitted while the data was fresh is refused at its next write once the data is
    older than the server allows, as a new peer is: a stream does not outlive the feed."""
    stale = 0.3

    async def main() -> tuple[int, float]:
        sctx = tls.server_context(world.server.source, CLIENT, max_revocation_staleness=stale)
        server = await asyncio.start_server(_ticks, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        cctx = tls.client_context(world.client.source, SERVER)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
        ticks = 0
        while ticks < 50:  # a second of ticks: fresh data keeps the stream going
            assert await reader.readuntil(b"\n\n") == b"data: tick\n\n"
            ticks += 1
        world.server.agent.stop()
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while await reader.readline():
                ticks += 1
        elapsed = time.monotonic() - started
        writer.close()
        server.close()
        await server.wait_closed()
        return ticks, elapsed

    try:
        ticks, elapsed = asyncio.run(asyncio.wait_for(main(), 15))
    finally:
        world.server.agent.start()
    assert ticks >= 50
    # Not before the data is too old (the source notices the agent gone at once).
    assert elapsed >= stale - 0.05, f"the stream ended {elapsed:.3f}s after the agent stopped"


# --- the asyncio source, and failing closed without an SVID ----------------------------------


def test_async_x509_source_drives_a_server(world: World) -> None:
    async def main() -> bytes:
        async with AsyncX509Source(world.server.agent.address, backoff=FAST) as source:
            sctx = tls.server_context(source, CLIENT)

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(str(tls.peer_of(writer).spiffe_id).encode())
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sctx)
            port = server.sockets[0].getsockname()[1]
            cctx = tls.client_context(world.client.source, SERVER)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
            answer = await reader.read()
            writer.close()
            server.close()
            await server.wait_closed()
            return answer

    assert asyncio.run(main()) == CLIENT.encode()


def test_no_svid_fails_closed(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    cctx = tls.client_context(world.client.source, SERVER)
    world.server.state.change(deny=True)
    eventually(lambda: world.server.source.svids == (), "no SVID at the server")
    with https_server(sctx) as (port, seen, _httpd), pytest.raises(httpx.ConnectError):
        _get(cctx, port)
    world.client.state.change(deny=True)
    eventually(lambda: world.client.source.svids == (), "no SVID at the client")
    with pytest.raises(WorkloadApiUnavailableError, match="has not given this workload"):
        cctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    assert seen.requests == []


# --- authorisers and key handling -----------------------------------------------------------


def _peer(sid: str) -> VerifiedX509:
    return VerifiedX509(SpiffeId.parse(sid), (), "1", 0.0)


def test_authorizers() -> None:
    assert tls.authorize_id(CLIENT)(_peer(CLIENT))
    assert not tls.authorize_id(CLIENT)(_peer(SERVER))
    assert tls.authorize_one_of(CLIENT, SERVER)(_peer(SERVER))
    assert tls.authorize_member_of("example.org")(_peer(SERVER))
    assert not tls.authorize_member_of(TrustDomain("other.org"))(_peer(SERVER))
    assert tls.authorize_any()(_peer("spiffe://other.org/x"))
    with pytest.raises(ValueError, match="authorize_member_of"):
        tls.authorize_id("spiffe://example.org")
    with pytest.raises(ValueError, match="at least one"):
        tls.authorize_one_of()


def test_shorthands_and_bad_authorize(world: World) -> None:
    with pytest.raises(TypeError, match="authorize must be"):
        tls.server_context(world.server.source, 42)  # type: ignore[arg-type]
    for shorthand in (CLIENT, SpiffeId.parse(CLIENT), TrustDomain("example.org")):
        sctx = tls.server_context(world.server.source, shorthand)
        with https_server(sctx) as (port, _seen, _httpd):
            ok = plain_context(world.pki.svid(CLIENT), world.pki, server=False)
            assert raw_request(ok, port).startswith(b"HTTP/1.1 200")


def test_private_key_never_lands_in_a_shared_file(monkeypatch: pytest.MonkeyPatch) -> None:
    with private_pem(b"secret") as path:
        assert path.startswith("/proc/self/fd/")  # an anonymous memory file
        assert Path(path).read_bytes() == b"secret"
    monkeypatch.delattr(os, "memfd_create")
    with private_pem(b"secret") as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        kept = path
    assert not os.path.exists(kept)
    assert not os.path.exists(os.path.dirname(kept))


def test_contexts_do_not_stay_subscribed_once_gone(world: World) -> None:
    state = world.server.source._state
    before = len(state._subscribers)
    ctx = tls.server_context(world.server.source, CLIENT)
    assert len(state._subscribers) == before + 1
    del ctx
    gc.collect()
    world.server.revoke(12345)  # the next announcement finds the context gone
    eventually(lambda: len(state._subscribers) == before, "the subscription dropped")


def test_a_resumed_session_is_judged_like_a_new_one(world: World) -> None:
    sctx = tls.server_context(world.server.source, CLIENT)
    svid = world.pki.svid(CLIENT)
    client = plain_context(svid, world.pki, server=False)

    def connect(port: int, session: ssl.SSLSession | None) -> tuple[bytes, Any, bool]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            answer = b""
            try:
                with client.wrap_socket(raw, server_hostname="x", session=session) as conn:
                    conn.sendall(REQUEST)
                    while chunk := conn.recv(4096):
                        answer += chunk
                    return answer, conn.session, conn.session_reused
            except OSError:
                return answer, None, False

    with https_server(sctx) as (port, seen, httpd):
        answer, session, _ = connect(port, None)
        assert answer.startswith(b"HTTP/1.1 200")
        answer, _, reused = connect(port, session)
        assert reused  # resumption works: the peer certificate came from the session
        assert answer.startswith(b"HTTP/1.1 200"), httpd.errors
        world.server.revoke(svid.leaf.serial_number)
        serial = format(svid.leaf.serial_number, "x")
        eventually(lambda: world.server.source.revocations.is_serial_revoked(serial), "revoked")
        answer, _, _ = connect(port, session)
        assert answer == b""
    assert seen.requests == ["/secret", "/secret"]


def test_a_peer_chain_is_kept_for_resumption_without_what_it_sent_beyond_its_path(
    world: World, tmp_path: Path
) -> None:
    """A client sending 50 KB of its own certificates after its path, new ones each handshake:
    the chain kept per leaf for session resumption held all of it (4096 peers' worth)."""
    sctx = tls.server_context(world.server.source, CLIENT)
    svid = world.pki.svid(CLIENT)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cadata=certs_to_pem([world.pki.root.cert]).decode())
    junk = certs_to_pem([junk_cert(7, 50_000, now=time.time())])
    with private_pem(svid.chain_pem() + junk + svid.key_pem()) as path:
        client.load_cert_chain(path)
    with https_server(sctx) as (port, seen, httpd):
        assert raw_request(client, port).startswith(b"HTTP/1.1 200"), httpd.errors
    policy = sctx._svid_factory._socket_class._svid_policy  # type: ignore[attr-defined]
    assert list(policy._chains._data.values()) == [svid.chain_der()]
    assert seen.peers == [CLIENT]


class _NoCallbacks:
    """A source without on_revoked: open connections learn of revocations on their own I/O."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.revocations = source.revocations

    def svid_for(self, spiffe_id: Any) -> Any:
        return self._source.svid_for(spiffe_id)

    @property
    def x509_bundles(self) -> Any:
        return self._source.x509_bundles

    def x509_verifier(self, **options: Any) -> Any:
        return self._source.x509_verifier(**options)


def test_an_open_connection_checks_revocation_on_every_read_and_write(world: World) -> None:
    assert len(world.server.source.revocations) == 0  # an empty set is still the source's
    sctx = tls.server_context(_NoCallbacks(world.server.source), CLIENT)
    svid = world.pki.svid(CLIENT)
    peer = plain_context(svid, world.pki, server=False)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    client = peer.wrap_bio(c_in, c_out, server_hostname="x")
    for _ in range(3):
        _step(client, "do_handshake")
        _pump(c_out, s_in)
        _step(server, "do_handshake")
        _pump(s_out, c_in)
    client.write(b"ping")
    _pump(c_out, s_in)
    assert server.read(4) == b"ping"
    world.server.revoke(svid.leaf.serial_number)
    serial = format(svid.leaf.serial_number, "x")
    eventually(lambda: world.server.source.revocations.is_serial_revoked(serial), "revoked")
    with pytest.raises(tls.PeerRefusedError, match="revoked"):
        server.write(b"pong")


def test_an_open_connection_is_ended_by_its_issuers_crl_only(world: World) -> None:
    # A federated CA may take our CA's name and list our peer's serial in its CRL: that revokes
    # the foreign CA's certificate of that serial, not our peer's (serials are per issuer).
    svid = world.pki.svid(CLIENT, under_root=True)  # CRLs come from the bundle's authorities
    serial = svid.leaf.serial_number
    sctx = tls.server_context(world.server.source, CLIENT)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    client = plain_context(svid, world.pki, server=False).wrap_bio(c_in, c_out, server_hostname="x")
    for _ in range(3):
        _step(client, "do_handshake")
        _pump(c_out, s_in)
        _step(server, "do_handshake")
        _pump(s_out, c_in)
    announced: list[Any] = []
    world.server.source.on_revoked(announced.append)  # called after the TLS policy's callback
    twin = make_ca("example.org", spiffe_id="spiffe://foreign.org")
    assert twin.cert.subject == world.pki.root.cert.subject
    world.server.state.change(
        x509={
            "spiffe://example.org": der_concat([world.pki.root.cert]),
            "spiffe://foreign.org": der_concat([twin.cert]),
        },
        crls=[signed_crl(twin, [serial])],
    )
    eventually(lambda: announced, "the foreign CRL announced")
    server.write(b"pong")  # still open
    world.server.state.change(crls=[signed_crl(world.pki.root, [serial])])
    eventually(lambda: len(announced) == 2, "our CRL announced")
    with pytest.raises(tls.PeerRefusedError, match="revoked"):
        server.write(b"pong")


def test_a_tasks_end_closes_its_peers_connection_though_its_certificate_is_not_revoked(
    world: World,
) -> None:
    """A task's X.509-SVID issued before a CA rotation is cut to that CA's notAfter and is not
    revoked at the task's end once expired: the end itself (kind task, the task's id) must close
    the open connection that certificate admitted, as it closes the task's MCP sessions."""
    task = "spiffe://example.org/agents/bot/task/t1"
    sctx = tls.server_context(world.server.source, task)
    cctx = plain_context(world.pki.svid(task), world.pki, server=False)
    with https_server(sctx) as (port, seen, _httpd), httpx.Client(verify=cctx) as client:
        assert _get(cctx, port, client).status_code == 200
        assert not seen.closed.is_set()  # the handler waits for the next request
        announced: list[Any] = []
        world.server.source.on_revoked(announced.append)  # called after the TLS policy's
        other = revocation_pb2.Revoked(kind="task", value="t2")
        world.server.state.change(revoked=[*world.server.state.revoked, other])
        eventually(lambda: announced, "another task's end announced")
        assert not seen.closed.is_set(), "another task's end closed the connection"
        ended = revocation_pb2.Revoked(kind="task", value="t1", spiffe_id=task)
        world.server.state.change(revoked=[*world.server.state.revoked, ended])
        assert seen.closed.wait(5), "the ended task's connection stayed open"


@pytest.mark.parametrize(
    "other",
    [
        "spiffe://foreign.org/agents/bot/task/t1",  # the same task ID in another trust domain
        "spiffe://example.org/agents/other-bot/task/t1",  # ... under another runtime
    ],
)
def test_a_tasks_end_closes_only_the_connections_of_that_task_identity(
    world: World, other: str
) -> None:
    """A task's end closed every connection whose peer's task ID matched its id alone: the end
    of a task of another trust domain or runtime that carried the same task ID closed it."""
    task = "spiffe://example.org/agents/bot/task/t1"
    sctx = tls.server_context(world.server.source, task)
    cctx = plain_context(world.pki.svid(task), world.pki, server=False)
    with https_server(sctx) as (port, seen, _httpd), httpx.Client(verify=cctx) as client:
        assert _get(cctx, port, client).status_code == 200
        announced: list[Any] = []
        world.server.source.on_revoked(announced.append)  # called after the TLS policy's
        twin = revocation_pb2.Revoked(kind="task", value="t1", spiffe_id=other)
        world.server.state.change(revoked=[*world.server.state.revoked, twin])
        eventually(lambda: announced, "the other task's end announced")
        assert _get(cctx, port, client).status_code == 200
        assert not seen.closed.is_set(), "another identity's task end closed the connection"
        # The task's own end, listed after the other's of the same task ID, is announced too.
        ended = revocation_pb2.Revoked(kind="task", value="t1", spiffe_id=task)
        world.server.state.change(revoked=[*world.server.state.revoked, ended])
        assert seen.closed.wait(5), "the ended task's connection stayed open"


def test_a_task_end_naming_no_identity_is_matched_on_its_task_id() -> None:
    """What an agent from before ends carried the task's SPIFFE ID sends: the ID alone."""
    peer = SpiffeId.parse("spiffe://example.org/agents/bot/task/t1")
    bare = RevocationEvent("task", "t1", 0.0)
    assert ended_task(bare, peer)
    assert not ended_task(RevocationEvent("task", "t2", 0.0), peer)
    assert not ended_task(bare, SpiffeId.parse("spiffe://example.org/agents/bot"))
    # An identity that is no task of that ID says nothing either: the ID decides.
    odd = RevocationEvent("task", "t1", 0.0, SpiffeId.parse("spiffe://example.org/agents/bot"))
    assert ended_task(odd, peer)

"""X509Verifier.verify_ssl_peer on every ssl object the stdlib, asyncio and httpx hand out, over
real TLS connections on loopback sockets."""

from __future__ import annotations

import asyncio
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from svid import VerificationError, X509Verifier
from tests.svid.tls_pki import Pki, make_pki, plain_context

SERVER = "spiffe://example.org/server"
CLIENT = "spiffe://example.org/client"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture
def verifier(pki: Pki) -> X509Verifier:
    return X509Verifier(pki.source().x509_bundle_for)


class _Handler(http.server.BaseHTTPRequestHandler):
    verifier: X509Verifier
    seen: list[str]

    def do_GET(self) -> None:
        conn: Any = self.connection
        # The public SSLSocket and the C object under it (what httpcore hands out) agree.
        self.seen.append(str(self.verifier.verify_ssl_peer(conn).spiffe_id))
        self.seen.append(str(self.verifier.verify_ssl_peer(conn._sslobj).spiffe_id))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=["under root", "under intermediate"])
def under_root(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "under root")


@pytest.fixture
def https_server(
    pki: Pki, verifier: X509Verifier, under_root: bool
) -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = type("H", (_Handler,), {"verifier": verifier, "seen": seen})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = plain_context(pki.svid(SERVER, under_root=under_root), pki, server=True)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}/", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_httpx_sync_transport_ssl_object(
    pki: Pki, verifier: X509Verifier, https_server: tuple[str, list[str]], under_root: bool
) -> None:
    # httpcore's sync stream exposes the C-level _ssl._SSLSocket, whose getpeercert takes no
    # keyword: this raised TypeError instead of verifying.
    url, seen = https_server
    ctx = plain_context(pki.svid(CLIENT, under_root=under_root), pki, server=False)
    with httpx.Client(verify=ctx) as client, client.stream("GET", url) as response:
        ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        assert type(ssl_object) is not ssl.SSLSocket
        peer = verifier.verify_ssl_peer(ssl_object)
        response.read()
    assert str(peer.spiffe_id) == SERVER
    # Under the intermediate, only the chain the peer sent leads to the root.
    assert len(peer.chain) == (1 if under_root else 2)
    assert seen == [CLIENT, CLIENT]


def test_asyncio_ssl_object(pki: Pki, verifier: X509Verifier) -> None:
    async def main() -> tuple[str, str]:
        seen: list[str] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(
                str(verifier.verify_ssl_peer(writer.get_extra_info("ssl_object")).spiffe_id)
            )
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        sctx = plain_context(pki.svid(SERVER), pki, server=True)
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        cctx = plain_context(pki.svid(CLIENT), pki, server=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
        peer = verifier.verify_ssl_peer(writer.get_extra_info("ssl_object"))
        assert await reader.read() == b"ok"
        writer.close()
        server.close()
        await server.wait_closed()
        return str(peer.spiffe_id), seen[0]

    assert asyncio.run(main()) == (SERVER, CLIENT)


def test_before_the_handshake_is_a_verification_error(verifier: X509Verifier, pki: Pki) -> None:
    ctx = plain_context(pki.svid(CLIENT), pki, server=False)
    a, b = socket.socketpair()
    with a, b, ctx.wrap_socket(a, do_handshake_on_connect=False) as tls:
        with pytest.raises(VerificationError, match="no peer yet"):
            verifier.verify_ssl_peer(tls)
        with pytest.raises(VerificationError, match="no peer yet"):
            verifier.verify_ssl_peer(tls._sslobj)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with pytest.raises(VerificationError, match="no peer yet"):
        verifier.verify_ssl_peer(ctx.wrap_bio(incoming, outgoing))

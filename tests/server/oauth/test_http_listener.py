"""The HTTPS listener's own limits, on a real HttpListener over real loopback sockets."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from server.oauth import http
from server.oauth.http import HttpListener, Request, Response, json_response
from tests.server.fixtures import short_tmpdir, write_tls_files

WAIT = 15.0  # generous: the machine may be loaded; a lockout still fails after it


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    directory = short_tmpdir("oht")
    try:
        ca_file, cert, key = write_tls_files(directory)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        yield Tls(server, ssl.create_default_context(cafile=str(ca_file)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _hello(request: Request) -> Response:
    return json_response(200, b'{"hello":"' + request.client_host.encode() + b'"}')


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server ends the connection (EOF or reset) within WAIT, the client silent."""
    try:
        async with asyncio.timeout(WAIT):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def _get(port: int, tls: Tls | None, source: str = "127.0.0.1") -> bytes:
    """One GET / from `source`; the first line of the answer."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=tls.client if tls else None,
            server_hostname="127.0.0.1" if tls else None,
            local_addr=(source, 0),
        )
        try:
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return await reader.readline()
        finally:
            writer.close()


def test_a_client_that_never_starts_its_tls_handshake_is_cut_at_the_handshake_timeout(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "HANDSHAKE_TIMEOUT", 0.5)

    async def main() -> None:
        listener = HttpListener(tls.server)
        listener.mount("/", _hello)
        port = await listener.start("127.0.0.1", 0)
        try:
            # A TCP connection and no ClientHello: asyncio's own default waits 60 s for it.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                assert await _closed_by_server(reader)
            finally:
                writer.close()
            assert (await _get(port, tls)).startswith(b"HTTP/1.1 200 ")
        finally:
            await listener.stop()

    asyncio.run(main())

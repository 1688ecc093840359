"""A real server with its OIDC/OAuth listener on HTTPS (a test CA's certificate for 127.0.0.1)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.server.fixtures import RunningServer, managed_server, short_tmpdir, write_tls_files

RESOURCE = "https://mcp.example/mcp"
OTHER_RESOURCE = "https://api.example/orders"


@dataclass
class OAuthServer:
    running: RunningServer
    issuer: str
    ca_file: Path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def oauth_server() -> Iterator[OAuthServer]:
    tls_dir = short_tmpdir("oat")
    ca_file, cert, key = write_tls_files(tls_dir)
    port = free_port()
    issuer = f"https://127.0.0.1:{port}"
    with managed_server(
        oidc_issuer=issuer,
        oauth_bind_address=f"127.0.0.1:{port}",
        oauth_tls_cert=str(cert),
        oauth_tls_key=str(key),
        oauth_resources=[RESOURCE, OTHER_RESOURCE],
    ) as running:
        yield OAuthServer(running, issuer, ca_file)

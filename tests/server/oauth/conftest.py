"""A real server with its OIDC/OAuth listener on HTTPS (a test CA's certificate for 127.0.0.1)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@contextmanager
def serving_oauth(tmp_prefix: str, resources: list[str], **overrides: Any) -> Iterator[OAuthServer]:
    """A server whose OAuth listener serves `resources` on HTTPS with a fresh test CA's
    certificate (files in a short temporary directory named after `tmp_prefix`)."""
    tls_dir = short_tmpdir(tmp_prefix)
    ca_file, cert, key = write_tls_files(tls_dir)
    port = free_port()
    issuer = f"https://127.0.0.1:{port}"
    with managed_server(
        oidc_issuer=issuer,
        oauth_bind_address=f"127.0.0.1:{port}",
        oauth_tls_cert=str(cert),
        oauth_tls_key=str(key),
        oauth_resources=resources,
        **overrides,
    ) as running:
        yield OAuthServer(running, issuer, ca_file)


@pytest.fixture
def oauth_server() -> Iterator[OAuthServer]:
    with serving_oauth("oat", [RESOURCE, OTHER_RESOURCE]) as server:
        yield server

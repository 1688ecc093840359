"""The agent's check of its server (server_identity.server_anchors) builds its TLS context once
per trust bundle and agent SVID, not at every connect: each build parses the roots and loads the
key again (~4 ms of CPU), and the agent reconnects at every renewal and every lost connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor import server_identity
from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache
from agent_attestor.servers import Target
from agent_attestor.sync import Syncer, SyncSettings
from svid._clock import FakeClock
from svid._der import certs_to_pem
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_join_token import server_pems

AGENT = "spiffe://example.org/svid/agent/join_token/t"


def _tls_server(tmp_path: Path, ca: LocalCa) -> tuple[int, Callable[[], None]]:
    """A server presenting svid-server's certificate: each connection shakes hands, then ends."""
    key_pem, chain_pem = server_pems(ca)
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "chain.pem").write_bytes(chain_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    context.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], listener.close


def test_the_server_check_builds_its_tls_context_once_per_bundle_and_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    port, stop = _tls_server(tmp_path, ca)
    built: list[bytes] = []
    real = server_identity._context

    def counted(root_pem: bytes, client: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
        built.append(root_pem)
        return real(root_pem, client)

    monkeypatch.setattr(server_identity, "_context", counted)
    key = ec.generate_private_key(ec.SECP256R1())
    svid = AgentSvid(AGENT, (ca.sign_leaf(key.public_key(), AGENT),), key)
    renewed_key = ec.generate_private_key(ec.SECP256R1())
    renewed = AgentSvid(AGENT, (ca.sign_leaf(renewed_key.public_key(), AGENT),), renewed_key)
    address = f"127.0.0.1:{port}"
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle")
    syncer = Syncer(SyncSettings((Target(address, address),)), store, Cache(), clock)
    syncer.set_bootstrap_roots(certs_to_pem([ca.cert]))

    async def scenario() -> None:
        await syncer._servers.first()
        for identity in (svid, svid, svid, renewed, renewed):
            # A reconnect: the agent's channel rebuilt on the identity it holds, checked again.
            syncer._install(identity, None)
            client = syncer._client
            assert client is not None
            async with client._pinning:
                await client._check()
            assert client.pinned
        await syncer.close()

    try:
        asyncio.run(scenario())
    finally:
        stop()
    assert len(built) == 2  # one for each agent SVID, under the one bundle

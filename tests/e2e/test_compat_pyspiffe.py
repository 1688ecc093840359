"""py-spiffe (the third-party `spiffe` package, unchanged) against the agent's Workload API.

The agent here is the real endpoint (relay, attestation, servicer) fed by a test cache over a real
CA; tests/e2e/test_agent_e2e.py repeats the essentials against real server and agent processes.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSource, JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient, X509Source

from tests.agent_attestor.harness import Harness

TD = TrustDomain("example.org")


@pytest.fixture
def agent() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def _uri(h: Harness) -> str:
    return f"unix://{h.socket_path}"


def test_x509_context_and_bundles(agent: Harness) -> None:
    agent.add_entry("/a", created_at=1)
    agent.add_entry("/b", created_at=2)
    client = WorkloadApiClient(socket_path=_uri(agent))
    try:
        ctx = client.fetch_x509_context(timeout=10)
        assert str(ctx.default_svid.spiffe_id) == "spiffe://example.org/a"
        assert [str(s.spiffe_id) for s in ctx.x509_svids] == [
            "spiffe://example.org/a",
            "spiffe://example.org/b",
        ]
        bundle = client.fetch_x509_bundles(timeout=10).get_bundle_for_trust_domain(TD)
        assert bundle is not None
        assert bundle.x509_authorities == {agent.ca.cert}
    finally:
        client.close()


def test_jwt_svid_validated_by_py_spiffe_and_by_the_agent(agent: Harness) -> None:
    agent.add_entry("/a")
    client = WorkloadApiClient(socket_path=_uri(agent))
    source = JwtSource(workload_api_client=client, timeout_in_seconds=10)
    try:
        svid = source.fetch_svid(audience={"svc", "other"})
        assert str(svid.spiffe_id) == "spiffe://example.org/a"
        bundle = source.get_bundle_for_trust_domain(TD)
        assert bundle is not None
        checked = JwtSvid.parse_and_validate(svid.token, bundle, {"svc", "other"})
        assert str(checked.spiffe_id) == "spiffe://example.org/a"
        validated = client.validate_jwt_svid(svid.token, "svc", timeout=10)
        assert str(validated.spiffe_id) == "spiffe://example.org/a"
        named = client.fetch_jwt_svid({"svc"}, SpiffeId("spiffe://example.org/a"), timeout=10)
        assert named.token
    finally:
        source.close()
        client.close()


def test_validate_refuses_a_token_for_another_audience(agent: Harness) -> None:
    agent.add_entry("/a")
    client = WorkloadApiClient(socket_path=_uri(agent))
    try:
        token = client.fetch_jwt_svid({"svc"}, timeout=10).token
        with pytest.raises(Exception, match=r"INVALID_ARGUMENT|audience"):
            client.validate_jwt_svid(token, "someone-else", timeout=10)
    finally:
        client.close()


def test_rotation_is_seen_through_the_watch_api(agent: Harness) -> None:
    agent.add_entry("/a")
    source = X509Source(socket_path=_uri(agent), timeout_in_seconds=10)
    try:
        first = source.get_x509_context().default_svid.leaf.serial_number
        seen = threading.Event()
        source.subscribe_for_updates(seen.set)
        agent.clock.advance(agent.ca.ttl * 0.61)
        agent.lt.run(agent.rotator.tick())
        assert seen.wait(10)
        current = source.get_x509_context().default_svid
        assert current.leaf.serial_number != first
        assert str(current.spiffe_id) == "spiffe://example.org/a"
    finally:
        source.close()


def _pick(path: str):  # type: ignore[no-untyped-def]
    return lambda svids: next(s for s in svids if str(s.spiffe_id).endswith(path))


def _context(source: X509Source, server: bool, tmp: Path, name: str) -> ssl.SSLContext:
    with warnings.catch_warnings():  # .svid is the accessor that applies the svid_picker
        warnings.simplefilter("ignore", DeprecationWarning)
        svid = source.svid
    cert_file, key_file = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_file.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    )
    key_file.write_bytes(
        svid.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE authenticates the URI SAN, not a hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(
        cadata=b"".join(c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities)
    )
    return ctx


def _peer_id(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    (uri,) = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return str(uri)


def test_two_workloads_do_mutual_tls13_with_only_workload_api_material(agent: Harness) -> None:
    agent.add_entry("/frontend", created_at=1)
    agent.add_entry("/backend", created_at=2)
    front = X509Source(
        socket_path=_uri(agent), timeout_in_seconds=10, svid_picker=_pick("/frontend")
    )
    back = X509Source(socket_path=_uri(agent), timeout_in_seconds=10, svid_picker=_pick("/backend"))
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        server_ctx = _context(back, True, tmp, "back")
        client_ctx = _context(front, False, tmp, "front")
        a, b = socket.socketpair()
        seen: dict[str, str] = {}

        def serve() -> None:
            with server_ctx.wrap_socket(b, server_side=True) as tls:
                seen["server saw"] = _peer_id(tls)
                seen["server version"] = str(tls.version())
                tls.sendall(b"hello " + tls.recv(100))

        t = threading.Thread(target=serve)
        t.start()
        with client_ctx.wrap_socket(a) as tls:
            seen["client saw"] = _peer_id(tls)
            tls.sendall(b"front")
            reply = tls.recv(100)
        t.join(10)
    front.close()
    back.close()
    assert reply == b"hello front"
    assert seen == {
        "server saw": "spiffe://example.org/frontend",
        "client saw": "spiffe://example.org/backend",
        "server version": "TLSv1.3",
    }


def test_a_workload_without_identity_gets_an_error_not_an_empty_context(agent: Harness) -> None:
    agent.sync()
    client = WorkloadApiClient(socket_path=_uri(agent))
    try:
        with pytest.raises(Exception, match=r"PERMISSION_DENIED|no identity"):
            client.fetch_x509_context(timeout=5)
    finally:
        client.close()


def test_a_process_holding_twenty_py_spiffe_sources_has_each_answered(agent: Harness) -> None:
    """grpcio shares one connection among a process's channels to the socket, and py-spiffe
    opens no connection of its own per source: the per-connection stream bound must leave room
    for the sources one process holds, plus a call beside them."""
    agent.add_entry("/a")
    x509 = [X509Source(socket_path=_uri(agent), timeout_in_seconds=10) for _ in range(14)]
    jwt = [JwtSource(socket_path=_uri(agent), timeout_in_seconds=10) for _ in range(6)]
    client = WorkloadApiClient(socket_path=_uri(agent))
    try:
        for source in x509:
            assert str(source.get_x509_context().default_svid.spiffe_id) == "spiffe://example.org/a"
        for jwt_source in jwt:
            assert jwt_source.get_bundle_for_trust_domain(TD) is not None
        token = client.fetch_jwt_svid(audience={"svc"})
        assert str(token.spiffe_id) == "spiffe://example.org/a"
    finally:
        client.close()
        for source in x509:
            source.close()
        for jwt_source in jwt:
            jwt_source.close()

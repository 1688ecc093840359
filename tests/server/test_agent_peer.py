"""Who may call the node API as an agent: a certificate this server issued to it, not any
certificate with its ID and serial under the bundle's roots."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.ca.rotation import activate_at, prepare_at
from server.datastore.records import X509_KIND
from server.datastore.sqlite import SqliteDataStore
from server.errors import UnauthenticatedError
from server.ids import ServerIds
from server.peer import PeerCache
from svid._clock import FakeClock, to_datetime
from svid._proto import node_pb2, node_pb2_grpc
from svid._spiffe_id import SpiffeId
from tests.server.conftest import TRUST_DOMAIN
from tests.server.fixtures import PEM, TLS_NAME, bundle_pem, key_pem
from tests.server.shared_root import corporate_ca, two_trust_domains, upstream_intermediate


def test_a_certificate_from_another_ca_under_the_shared_root_is_no_agent() -> None:
    """Under a corporate root that is the upstream CA of several trust domains, whoever holds
    another intermediate of it (the other trust domain's server) mints a certificate with
    one of our agents' ID and serial. The serial is no secret (`agent list`, the audit log,
    and the certificate itself, shown to any server the agent connects to): our server
    must still refuse it, as a certificate it never issued."""
    with two_trust_domains() as shared:
        agent = shared.ours.attest()
        their_ca, their_key = shared.their_intermediate
        key = ec.generate_private_key(ec.SECP256R1())
        now = time.time()
        forged = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(their_ca.subject)
            .public_key(key.public_key())
            .serial_number(agent.chain[0].serial_number)
            .not_valid_before(to_datetime(now - 60))
            .not_valid_after(to_datetime(now + 3600))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(agent.spiffe_id)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(their_key, hashes.SHA256())
        )
        credentials = grpc.ssl_channel_credentials(
            bundle_pem(shared.ours.bundle()),
            key_pem(key),
            forged.public_bytes(PEM) + their_ca.public_bytes(PEM),
        )
        channel = grpc.secure_channel(
            shared.ours.runtime.node_address, credentials, options=TLS_NAME
        )
        with channel:
            stream = node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest(), timeout=10)
            # Refused, or the first Sync message: our agent's entries, to whoever forged it.
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(stream))
        assert refused.value.code() in (  # type: ignore[attr-defined]
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.UNAVAILABLE,  # refused in the TLS handshake
        )


class _Caller:
    """What PeerCache reads of a call on the mTLS port: the client's certificate."""

    def __init__(self, cert: x509.Certificate) -> None:
        self._pem = cert.public_bytes(PEM)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._pem]}


def _called_by(peers: PeerCache, cert: x509.Certificate) -> str:
    return peers.agent_peer(cast(grpc.aio.ServicerContext, _Caller(cert))).serial


def _agent_cert(manager: CaManager, agent_id: SpiffeId) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return manager.x509_signer().sign_svid(key.public_key(), agent_id, 300)[0]


def test_an_agents_certificates_from_before_and_after_a_ca_rotation_both_call_as_it(
    tmp_path: Path,
) -> None:
    """Under an upstream root the bundle stays that root through a rotation: the CAs an
    agent's certificate may come from follow the server's key slots instead, so an agent
    holding the retired CA's certificate and one holding the new CA's both get in, and a
    certificate of another intermediate of the same root still does not."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (corporate_ca("Corporate Root", root_key, None), root_key)
    ours, _ = upstream_intermediate(tmp_path, "ours", root)
    _, (their_ca, their_key) = upstream_intermediate(tmp_path, "theirs", root)
    clock = FakeClock(time.time())
    store = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
    manager = CaManager(
        CaConfig(
            TRUST_DOMAIN,
            ca_ttl=600,
            jwt_key_ttl=900,
            upstream_cert=Path(ours["upstream_ca_cert"]),
            upstream_key=Path(ours["upstream_ca_key"]),
        ),
        store,
        KeyStore(tmp_path / "keys"),
        clock,
    )
    try:
        manager.initialize()
        ids = ServerIds(TRUST_DOMAIN)
        agent_id = ids.agent("join_token", "node-1")
        before = _agent_cert(manager, agent_id)
        first = manager.key_slots(X509_KIND)[0]
        clock.set(math.ceil(prepare_at(first.not_before, first.not_after)))
        manager.rotate()
        clock.set(math.ceil(activate_at(first.not_before, first.not_after)))
        manager.rotate()
        after = _agent_cert(manager, agent_id)
        assert before.issuer != after.issuer, "the CA did not rotate"
        assert manager.bundle().x509_authorities == (root[0],)

        peers = PeerCache(ids, manager.issuing_cas)
        assert _called_by(peers, before) == format(before.serial_number, "x")
        assert _called_by(peers, after) == format(after.serial_number, "x")
        forged = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(their_ca.subject)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(after.serial_number)
            .not_valid_before(after.not_valid_before_utc)
            .not_valid_after(after.not_valid_after_utc)
            .add_extension(
                after.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
                critical=True,
            )
            .sign(their_key, hashes.SHA256())
        )
        with pytest.raises(UnauthenticatedError) as refused:
            _called_by(peers, forged)
        assert f"not issued by this server's CA but by {their_ca.subject.rfc4514_string()}" in str(
            refused.value
        )
    finally:
        manager.close()
        store.close()

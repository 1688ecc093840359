"""Who may call the node API as an agent: a certificate this server issued to it, not any
certificate with its ID and serial under the bundle's roots."""

from __future__ import annotations

import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from svid._clock import to_datetime
from svid._proto import node_pb2, node_pb2_grpc
from tests.server.fixtures import PEM, TLS_NAME, bundle_pem, key_pem
from tests.server.shared_root import two_trust_domains


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

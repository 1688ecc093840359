"""The server's own TLS identity: an X.509-SVID for spiffe://<td>/svid/server."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.signer import X509Signer
from server.ids import SERVER_DNS_NAME, SERVER_PATH
from svid._der import certs_to_pem
from svid._spiffe_id import SpiffeId, TrustDomain

__all__ = ["SERVER_DNS_NAME", "ServerSvid", "server_spiffe_id", "server_svid"]


@dataclass(frozen=True, slots=True)
class ServerSvid:
    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"ServerSvid(serial={self.chain[0].serial_number})"

    def chain_pem(self) -> bytes:
        return certs_to_pem(self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def server_spiffe_id(trust_domain: TrustDomain) -> SpiffeId:
    return SpiffeId.from_segments(trust_domain, *SERVER_PATH)


def server_svid(signer: X509Signer, ttl: int) -> ServerSvid:
    """A fresh key and SVID for the server, with DNS SAN `svid-server` (agents dial that name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    chain = signer.sign_svid(
        key.public_key(), server_spiffe_id(signer.trust_domain), ttl, (SERVER_DNS_NAME,)
    )
    return ServerSvid(chain=tuple(chain), key=key)

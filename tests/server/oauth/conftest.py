"""A real server with its OIDC/OAuth listener on HTTPS (a test CA's certificate for 127.0.0.1)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.ports import free_port
from tests.server.fixtures import RunningServer, managed_server, short_tmpdir

RESOURCE = "https://mcp.example/mcp"
OTHER_RESOURCE = "https://api.example/orders"


def write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(CA PEM, server cert PEM, server key PEM): a throwaway CA and a leaf for 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oauth test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = (
        directory / "ca.pem",
        directory / "tls.pem",
        directory / "tls.key",
    )
    ca_file.write_bytes(ca.public_bytes(pem))
    cert_file.write_bytes(leaf.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


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

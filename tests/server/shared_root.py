"""Two trust domains under one corporate root: each server with its own upstream intermediate
of that root, so the bundle of each is the root alone."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from svid._clock import to_datetime
from tests.server.fixtures import PEM, RunningServer, short_tmpdir, start_server

Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def corporate_ca(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: Issuer | None
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = time.time()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(now - 7200))
        .not_valid_after(to_datetime(now + 365 * 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(signing_key, hashes.SHA256())
    )


def upstream_intermediate(
    directory: Path, name: str, root: Issuer
) -> tuple[dict[str, str], Issuer]:
    """An intermediate of the root for one server: its upstream_ca_* settings, and itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = corporate_ca(name, key, root)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(PEM) + root[0].public_bytes(PEM))
    key_path.write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return {"upstream_ca_cert": str(cert_path), "upstream_ca_key": str(key_path)}, (cert, key)


@dataclass
class SharedRoot:
    ours: RunningServer  # example.org
    theirs: RunningServer  # other.example
    their_intermediate: Issuer


@contextlib.contextmanager
def two_trust_domains() -> Iterator[SharedRoot]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (corporate_ca("Corporate Root", root_key, None), root_key)
    files, our_root, their_root = short_tmpdir(), short_tmpdir(), short_tmpdir()
    servers: list[RunningServer] = []
    try:
        our_settings, _ = upstream_intermediate(files, "ours", root)
        servers.append(start_server(our_root, **our_settings))
        their_settings, their_intermediate = upstream_intermediate(files, "theirs", root)
        servers.append(start_server(their_root, trust_domain="other.example", **their_settings))
        yield SharedRoot(servers[0], servers[1], their_intermediate)
    finally:
        for server in servers:
            server.stop()
        for directory in (files, our_root, their_root):
            shutil.rmtree(directory, ignore_errors=True)

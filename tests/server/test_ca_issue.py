"""X509Signer.issue and csr_public_key: the node API's batch path, checked against sign_svid."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from server.ca.errors import CaUnavailableError, CsrError, SigningRequestError
from server.ca.manager import CaManager
from server.ca.signer import BACKDATE_SECONDS, X509Signer, csr_public_key, verify_csr
from svid._clock import FakeClock
from svid._spiffe_id import SpiffeId
from svid._x509 import check_leaf_profile
from tests.server.conftest import openssl_verify
from tests.server.fixtures import der_chain

WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
DER = serialization.Encoding.DER


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, hashes.SHA256()).public_bytes(DER)


def _ca(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    now: datetime,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]),
            critical=False,
        )
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), False
        )
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture
def intermediate(clock: FakeClock) -> tuple[X509Signer, x509.Certificate, x509.Certificate]:
    """A signer for an intermediate CA under an upstream intermediate under a root."""
    now = datetime.fromtimestamp(clock.now(), tz=UTC)
    root_key, upper_key, ca_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca("root", root_key, None, now)
    upper = _ca("upper", upper_key, (root, root_key), now)
    ca = _ca("ours", ca_key, (upper, upper_key), now)
    return X509Signer(ca, ca_key, (upper,), clock), root, upper


def test_issue_sends_the_leaf_then_our_ca_then_upstream(
    intermediate: tuple[X509Signer, x509.Certificate, x509.Certificate],
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    signer, root, upper = intermediate
    key = ec.generate_private_key(ec.SECP256R1())
    issued = signer.issue(key.public_key(), WORKLOAD, 300, ("web.example.org",))
    leaf, ca, above = der_chain(issued.chain_der)
    assert leaf == issued.certificate
    assert (ca, above) == (signer.ca_certificate, upper) == signer.chain
    assert issued.serial == leaf.serial_number
    assert issued.serial_hex == format(leaf.serial_number, "x")
    assert issued.expires_at == int(leaf.not_valid_after_utc.timestamp()) == int(clock.now()) + 300
    assert leaf.not_valid_before_utc.timestamp() == int(clock.now()) - BACKDATE_SECONDS
    assert check_leaf_profile(leaf) == WORKLOAD
    result = openssl_verify(tmp_path, leaf, [root], [ca, above], at=clock.now())
    assert result.returncode == 0, result.stderr + result.stdout


def test_issue_from_a_root_sends_the_leaf_alone(ca_manager: CaManager) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca_manager.x509_signer().issue(key.public_key(), WORKLOAD, 60)
    assert issued.chain_der == issued.certificate.public_bytes(DER)


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(65537, 2048),
    ],
    ids=["p256", "p384", "rsa2048"],
)
def test_issue_and_sign_svid_make_the_same_leaf(
    ca_manager: CaManager, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> None:
    signer = ca_manager.x509_signer()
    dns = ("a.example", "*.b.example")
    fast = signer.issue(key.public_key(), WORKLOAD, 300, dns).certificate
    slow = signer.sign_svid(key.public_key(), WORKLOAD, 300, dns)[0]
    assert [(e.oid, e.critical, e.value) for e in fast.extensions] == [
        (e.oid, e.critical, e.value) for e in slow.extensions
    ]
    # Pre-encoded extensions read back as their real types, not as opaque blobs.
    assert not any(isinstance(e.value, x509.UnrecognizedExtension) for e in fast.extensions)
    ski = fast.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert (fast.subject, fast.issuer) == (slow.subject, slow.issuer)
    assert fast.not_valid_after_utc == slow.not_valid_after_utc
    assert fast.serial_number != slow.serial_number


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "dns", "message"),
    [
        ("spiffe://other.org/web", 60, (), "not in trust domain example.org"),
        ("spiffe://example.org", 60, (), "has no path"),
        ("spiffe://example.org/web", 0, (), "ttl must be positive"),
        ("spiffe://example.org/web", 60, ("bad name",), "'bad name' is not a valid host name"),
    ],
)
def test_issue_refuses_what_sign_svid_refuses(
    ca_manager: CaManager, spiffe_id: str, ttl: int, dns: tuple[str, ...], message: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SigningRequestError, match=message):
        ca_manager.x509_signer().issue(key, SpiffeId.parse(spiffe_id), ttl, dns)


def test_issue_refuses_weak_keys_and_an_expired_ca(ca_manager: CaManager, clock: FakeClock) -> None:
    signer = ca_manager.x509_signer()
    weak = rsa.generate_private_key(65537, 1024).public_key()
    with pytest.raises(CsrError, match="RSA key of 1024 bits refused"):
        signer.issue(weak, WORKLOAD, 60)
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(CsrError, match="secp256k1 refused"):
        signer.issue(k1, WORKLOAD, 60)
    clock.set(signer.not_after)
    with pytest.raises(CaUnavailableError, match="expired"):
        signer.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), WORKLOAD, 60)


def test_csr_public_key_is_the_requesters_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = _csr(key)
    assert csr_public_key(der) == key.public_key() == verify_csr(der).public_key()


def test_csr_public_key_checks_what_verify_csr_checks() -> None:
    good = bytearray(_csr(ec.generate_private_key(ec.SECP256R1())))
    good[-1] ^= 0x01  # the last byte is inside the signature
    with pytest.raises(CsrError, match="does not verify"):
        csr_public_key(bytes(good))
    with pytest.raises(CsrError, match="empty"):
        csr_public_key(b"")
    with pytest.raises(CsrError, match="not a DER-encoded PKCS#10"):
        csr_public_key(b"\x30\x03\x02\x01\x00")
    with pytest.raises(CsrError, match="RSA key of 1024 bits"):
        csr_public_key(_csr(rsa.generate_private_key(65537, 1024)))

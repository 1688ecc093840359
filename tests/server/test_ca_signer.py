"""X.509- and JWT-SVID signing: SPIFFE profile, independent verifiers (openssl, PyJWT)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.ca.errors import CaUnavailableError, CsrError, SigningRequestError
from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.ca.server_svid import SERVER_DNS_NAME, server_svid
from server.ca.signer import BACKDATE_SECONDS, JwtSigner, verify_csr
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock
from svid._spiffe_id import SpiffeId
from svid._x509 import check_leaf_profile
from tests.server.conftest import TRUST_DOMAIN, openssl_verify

WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
DER = serialization.Encoding.DER


def csr_der(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(DER)


# -- X.509-SVIDs ---------------------------------------------------------------------------------


def test_leaf_passes_the_profile_and_openssl(
    ca_manager: CaManager, clock: FakeClock, tmp_path: Path
) -> None:
    csr = verify_csr(csr_der())
    chain = ca_manager.x509_signer().sign_svid(csr, WORKLOAD, 300, ("web.example.org",))
    assert len(chain) == 1  # a self-signed root is not sent along
    leaf = chain[0]
    assert check_leaf_profile(leaf) == WORKLOAD
    result = openssl_verify(tmp_path, leaf, ca_manager.bundle().x509_authorities, at=clock.now())
    assert result.returncode == 0, result.stderr + result.stdout


def test_leaf_profile_details(ca_manager: CaManager, clock: FakeClock) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = ca_manager.x509_signer()
    leaf = signer.sign_svid(key.public_key(), WORKLOAD, 300, ("a.example", "*.b.example"))[0]
    ext = leaf.extensions
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert not basic.value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WORKLOAD)]
    assert san.get_values_for_type(x509.DNSName) == ["a.example", "*.b.example"]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    ca_ski = signer.ca_certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    akid = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert akid.key_identifier == ca_ski.digest
    now = int(clock.now())
    assert leaf.not_valid_before_utc.timestamp() == now - BACKDATE_SECONDS
    assert leaf.not_valid_after_utc.timestamp() == now + 300
    assert leaf.serial_number > 0
    assert leaf.serial_number.bit_length() > 100


def test_serials_are_random_and_distinct(ca_manager: CaManager) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    serials = {
        ca_manager.x509_signer().sign_svid(key, WORKLOAD, 60)[0].serial_number for _ in range(50)
    }
    assert len(serials) == 50


def test_not_after_is_capped_at_the_ca(ca_manager: CaManager, clock: FakeClock) -> None:
    signer = ca_manager.x509_signer()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    leaf = signer.sign_svid(key, WORKLOAD, 10 * 86400)[0]
    assert leaf.not_valid_after_utc == signer.ca_certificate.not_valid_after_utc
    clock.set(signer.not_after - 5)
    leaf = signer.sign_svid(key, WORKLOAD, 3600)[0]
    assert int(leaf.not_valid_after_utc.timestamp()) == signer.not_after
    clock.set(signer.not_after)
    with pytest.raises(CaUnavailableError, match="expired"):
        signer.sign_svid(key, WORKLOAD, 60)


def test_not_before_is_never_before_the_ca(ca_manager: CaManager) -> None:
    signer = ca_manager.x509_signer()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    leaf = signer.sign_svid(key, WORKLOAD, 60)[0]
    assert leaf.not_valid_before_utc >= signer.ca_certificate.not_valid_before_utc


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "dns", "message"),
    [
        ("spiffe://other.org/web", 60, (), "not in trust domain example.org"),
        ("spiffe://example.org", 60, (), "has no path"),
        ("spiffe://example.org/web", 0, (), "ttl must be positive"),
        ("spiffe://example.org/web", -5, (), "ttl must be positive"),
        ("spiffe://example.org/web", 60, ("bad name",), "'bad name' is not a valid host name"),
        ("spiffe://example.org/web", 60, ("-x.example",), "not a valid host name"),
        ("spiffe://example.org/web", 60, ("",), "not a valid host name"),
        ("spiffe://example.org/web", 60, ("web.example.org\n",), "not a valid host name"),
    ],
)
def test_bad_signing_requests_are_refused(
    ca_manager: CaManager, spiffe_id: str, ttl: int, dns: tuple[str, ...], message: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SigningRequestError, match=message):
        ca_manager.x509_signer().sign_svid(key, SpiffeId.parse(spiffe_id), ttl, dns)


def test_spiffe_id_must_be_parsed(ca_manager: CaManager) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SigningRequestError, match="SpiffeId"):
        ca_manager.x509_signer().sign_svid(key, "spiffe://example.org/web", 60)  # type: ignore[arg-type]


def test_weak_or_unsupported_keys_are_refused(ca_manager: CaManager) -> None:
    signer = ca_manager.x509_signer()
    with pytest.raises(CsrError, match="1024 bits refused"):
        signer.sign_svid(rsa.generate_private_key(65537, 1024).public_key(), WORKLOAD, 60)
    with pytest.raises(CsrError, match="Ed25519"):
        signer.sign_svid(ed25519.Ed25519PrivateKey.generate().public_key(), WORKLOAD, 60)  # type: ignore[arg-type]
    with pytest.raises(CsrError, match="secp256k1"):
        signer.sign_svid(ec.generate_private_key(ec.SECP256K1()).public_key(), WORKLOAD, 60)


# -- CSRs ----------------------------------------------------------------------------------------


def test_good_csr_parses() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = verify_csr(csr_der(key))
    assert csr.public_key() == key.public_key()


def test_csr_with_a_bad_signature_is_rejected() -> None:
    good = bytearray(csr_der())
    good[-1] ^= 0x01  # the signature is the last field of a PKCS#10 request
    with pytest.raises(CsrError, match="signature does not verify"):
        verify_csr(bytes(good))


def test_csr_signed_by_another_key_is_rejected() -> None:
    # Same structure, but the signature was made by a key other than the one inside.
    real = x509.load_der_x509_csr(csr_der())
    other = x509.load_der_x509_csr(csr_der())
    tbs_len = len(real.tbs_certrequest_bytes)
    forged = real.public_bytes(DER)
    # Swap in the other request's signature (both ECDSA P-256 + SHA-256).
    forged_csr = forged[: forged.index(real.tbs_certrequest_bytes) + tbs_len]
    tail = other.public_bytes(DER)
    tail = tail[tail.index(other.tbs_certrequest_bytes) + len(other.tbs_certrequest_bytes) :]
    body = forged_csr[forged.index(real.tbs_certrequest_bytes) :] + tail
    der = b"\x30" + _der_len(len(body)) + body
    with pytest.raises(CsrError, match="signature does not verify"):
        verify_csr(der)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "csr is empty"),
        (b"garbage bytes", "not a DER-encoded PKCS#10"),
        (b"\x30" * 20_000, "at most 16384"),
    ],
)
def test_malformed_csrs_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(CsrError, match=message):
        verify_csr(data)


def test_csr_with_an_invalid_version_is_rejected() -> None:
    # Found by tests/fuzz: cryptography's InvalidVersion is no ValueError; the node API said
    # INTERNAL instead of INVALID_ARGUMENT.
    # The first INTEGER is CertificationRequestInfo.version (v1 = 0).
    der = csr_der().replace(b"\x02\x01\x00", b"\x02\x01\x08", 1)
    with pytest.raises(CsrError, match="not a DER-encoded PKCS#10"):
        verify_csr(der)


def test_csr_with_a_weak_key_is_rejected() -> None:
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(CsrError, match="1024 bits"):
        verify_csr(csr_der(weak))


# -- key types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "alg"), [("ec-p256", "ES256"), ("ec-p384", "ES384"), ("rsa-2048", "RS256")]
)
def test_every_key_type_issues_verifiable_svids(
    tmp_path: Path, clock: FakeClock, key_type: str, alg: str
) -> None:
    store = SqliteDataStore(tmp_path / "db", clock)
    manager = CaManager(
        CaConfig(TRUST_DOMAIN, key_type=key_type), store, KeyStore(tmp_path / "keys"), clock
    )
    manager.initialize()
    leaf = manager.x509_signer().sign_svid(
        ec.generate_private_key(ec.SECP256R1()).public_key(), WORKLOAD, 60
    )[0]
    result = openssl_verify(tmp_path, leaf, manager.bundle().x509_authorities, at=clock.now())
    assert result.returncode == 0, result.stderr
    issued = manager.jwt_signer().sign(WORKLOAD, ["svc"], 60)
    assert jwt.get_unverified_header(issued.token)["alg"] == alg
    key = manager.bundle().jwt_authorities[manager.jwt_signer().kid]
    claims = jwt.decode(
        issued.token, key, algorithms=[alg], audience="svc", options={"verify_exp": False}
    )
    assert claims["sub"] == str(WORKLOAD)
    store.close()


# -- JWT-SVIDs -----------------------------------------------------------------------------------


def _decode(manager: CaManager, token: str, audience: str) -> dict[str, object]:
    header = jwt.get_unverified_header(token)
    key = manager.bundle().jwt_authorities[header["kid"]]
    # PyJWT checks exp against the wall clock; the fake clock lives in 2023, so exp is
    # checked by hand against the fake clock instead.
    return jwt.decode(  # type: ignore[no-any-return]
        token, key, algorithms=["ES256"], audience=audience, options={"verify_exp": False}
    )


def test_jwt_svid_verifies_with_pyjwt(ca_manager: CaManager, clock: FakeClock) -> None:
    issued = ca_manager.jwt_signer().sign(WORKLOAD, ["spiffe://example.org/db"], 300)
    header = jwt.get_unverified_header(issued.token)
    assert header == {"alg": "ES256", "kid": ca_manager.jwt_signer().kid, "typ": "JWT"}
    claims = _decode(ca_manager, issued.token, "spiffe://example.org/db")
    now = int(clock.now())
    assert claims == {
        "sub": str(WORKLOAD),
        "aud": "spiffe://example.org/db",  # one audience: a plain string, as SPIRE emits
        "exp": now + 300,
        "iat": now,
        "jti": issued.jti,
    }
    assert (issued.issued_at, issued.expires_at) == (now, now + 300)
    assert len(jwt.utils.base64url_decode(issued.jti)) == 16


def test_jwt_with_several_audiences_lists_them(ca_manager: CaManager) -> None:
    issued = ca_manager.jwt_signer().sign(WORKLOAD, ["a", "b"], 60, {"task": "t-1"})
    claims = _decode(ca_manager, issued.token, "b")
    assert claims["aud"] == ["a", "b"]
    assert claims["task"] == "t-1"


def test_jti_is_unique(ca_manager: CaManager) -> None:
    signer = ca_manager.jwt_signer()
    assert len({signer.sign(WORKLOAD, ["a"], 60).jti for _ in range(100)}) == 100


def test_jwt_exp_is_capped_at_the_key(clock: FakeClock) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(clock.now())
    signer = JwtSigner(key, "kid-1", clock, not_after=now + 30)
    issued = signer.sign(WORKLOAD, ["a"], 300)
    assert issued.expires_at == now + 30
    clock.advance(30)
    with pytest.raises(CaUnavailableError, match="expired"):
        signer.sign(WORKLOAD, ["a"], 300)


@pytest.mark.parametrize(
    ("audience", "ttl", "extra", "message"),
    [
        ([], 60, None, "at least one non-empty"),
        ([""], 60, None, "at least one non-empty"),
        ("aud", 60, None, "not one string"),
        (["a"], 0, None, "ttl must be positive"),
        (["a"], 60, {"exp": 1}, "may not set exp"),
        (["a"], 60, {"sub": "x", "aud": "y"}, "may not set aud, sub"),
    ],
)
def test_bad_jwt_requests_are_refused(
    ca_manager: CaManager,
    audience: list[str],
    ttl: int,
    extra: dict[str, object] | None,
    message: str,
) -> None:
    with pytest.raises(SigningRequestError, match=message):
        ca_manager.jwt_signer().sign(WORKLOAD, audience, ttl, extra)


def test_jwt_for_the_trust_domain_itself_is_refused(ca_manager: CaManager) -> None:
    with pytest.raises(SigningRequestError, match="has no path"):
        ca_manager.jwt_signer().sign(SpiffeId.parse("spiffe://example.org"), ["a"], 60)


def test_issued_jwt_repr_hides_the_token(ca_manager: CaManager) -> None:
    issued = ca_manager.jwt_signer().sign(WORKLOAD, ["a"], 60)
    assert issued.token not in repr(issued)
    assert issued.token.split(".")[2] not in repr(issued)


# -- the server's own SVID -----------------------------------------------------------------------


def test_server_svid(ca_manager: CaManager, clock: FakeClock, tmp_path: Path) -> None:
    svid = server_svid(ca_manager.x509_signer(), 3600)
    leaf = svid.chain[0]
    assert check_leaf_profile(leaf) == SpiffeId.parse("spiffe://example.org/svid/server")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SERVER_DNS_NAME]
    assert leaf.public_key() == svid.key.public_key()
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(seconds=3610)
    assert b"PRIVATE KEY" in svid.key_pem()
    assert svid.chain_pem().count(b"BEGIN CERTIFICATE") == 1
    assert b"PRIVATE" not in repr(svid).encode()
    result = openssl_verify(tmp_path, leaf, ca_manager.bundle().x509_authorities, at=clock.now())
    assert result.returncode == 0, result.stderr

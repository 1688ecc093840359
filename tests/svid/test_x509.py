from __future__ import annotations

import base64
import contextlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from svid import (
    SpiffeId,
    SvidParseError,
    X509Svid,
    X509SvidError,
    certs_to_pem,
    check_leaf_profile,
    check_signing_profile,
    der_concat,
    load_pem_certs,
    parse_der_certs,
    spiffe_id_from_cert,
)
from tests.svid.certs import T0, LeafOptions, make_ca, make_leaf, rsa_key


@pytest.fixture(scope="module")
def ca():  # type: ignore[no-untyped-def]
    return make_ca()


def _key_der(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_valid_leaf_passes_profile(ca) -> None:  # type: ignore[no-untyped-def]
    leaf = make_leaf(ca)
    assert check_leaf_profile(leaf.cert) == SpiffeId.parse("spiffe://example.org/workload")


def test_leaf_without_eku_is_fine(ca) -> None:  # type: ignore[no-untyped-def]
    assert check_leaf_profile(make_leaf(ca, eku=None).cert)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ca": True}, "cA=true"),
        ({"key_cert_sign": True}, "keyCertSign"),
        ({"crl_sign": True}, "cRLSign"),
        ({"uris": ["spiffe://example.org/a", "spiffe://example.org/b"]}, "exactly one URI SAN"),
        ({"uris": [], "dns": ["a.example.org"]}, "exactly one URI SAN, has 0"),
        ({"uris": []}, "exactly one URI SAN, has 0"),
        ({"digital_signature": False}, "lacks digitalSignature"),
        ({"key_usage_critical": False}, "not critical"),
        ({"key_usage": False}, "no key usage"),
        ({"basic_constraints": False}, "no basic constraints"),
        ({"uris": ["spiffe://example.org"]}, "no path"),
        ({"uris": ["https://example.org/a"]}, "not a SPIFFE ID"),
        ({"uris": ["spiffe://Example.org/a"]}, "not a SPIFFE ID"),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "serverAuth and/or clientAuth"),
        ({"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, "serverAuth and/or clientAuth"),
        ({"san_critical": False}, "non-critical SAN"),
    ],
)
def test_leaf_profile_rejections(ca, overrides: dict[str, object], message: str) -> None:  # type: ignore[no-untyped-def]
    leaf = make_leaf(ca, **overrides)  # type: ignore[arg-type]
    with pytest.raises(X509SvidError, match=message):
        check_leaf_profile(leaf.cert)


def test_nonempty_subject_allows_noncritical_san(ca) -> None:  # type: ignore[no-untyped-def]
    leaf = make_leaf(ca, subject="workload", san_critical=False)
    assert check_leaf_profile(leaf.cert)


def test_spiffe_id_from_cert(ca) -> None:  # type: ignore[no-untyped-def]
    assert str(spiffe_id_from_cert(make_leaf(ca, uris=["spiffe://example.org/x/y"]).cert)) == (
        "spiffe://example.org/x/y"
    )
    assert str(spiffe_id_from_cert(ca.cert)) == "spiffe://example.org"


def test_signing_profile(ca) -> None:  # type: ignore[no-untyped-def]
    check_signing_profile(ca.cert)
    check_signing_profile(make_ca(spiffe_id=None).cert)
    with pytest.raises(X509SvidError, match="cA=true"):
        check_signing_profile(make_ca(ca=False).cert)
    with pytest.raises(X509SvidError, match="keyCertSign"):
        check_signing_profile(make_ca(key_cert_sign=False).cert)
    with pytest.raises(X509SvidError, match="has a path"):
        check_signing_profile(make_ca(spiffe_id="spiffe://example.org/ca").cert)
    with pytest.raises(X509SvidError, match="cA=true"):
        check_signing_profile(make_leaf(ca).cert)


def test_parse_der_certs_round_trip(ca) -> None:  # type: ignore[no-untyped-def]
    inter = make_ca(parent=ca, spiffe_id=None)
    leaf = make_leaf(inter)
    data = der_concat([leaf.cert, inter.cert, ca.cert])
    assert parse_der_certs(data) == [leaf.cert, inter.cert, ca.cert]
    pem = certs_to_pem([leaf.cert, ca.cert])
    assert load_pem_certs(pem) == [leaf.cert, ca.cert]


def test_rsa_ca_long_length_form() -> None:
    big = make_ca(key=rsa_key())
    assert len(der_concat([big.cert])) > 256
    assert parse_der_certs(der_concat([big.cert, big.cert])) == [big.cert, big.cert]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"", "empty"),
        (lambda d: b"garbage!", "offset 0 does not start with a DER SEQUENCE"),
        (lambda d: d + b"\x00\x01", "offset {n} does not start"),
        (lambda d: d[:-1], "offset 0 is truncated"),
        (lambda d: d + d[:20], "offset {n} is truncated"),
        (lambda d: d + b"\x30", "offset {n} is truncated in its length"),
        (lambda d: d + b"\x30\x80", "invalid DER length form"),
        (lambda d: d + b"\x30\x02\x01\x00", "offset {n} is not a valid X.509 certificate"),
    ],
)
def test_parse_der_certs_rejects_garbage(ca, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    der = der_concat([ca.cert])
    with pytest.raises(SvidParseError, match=message.format(n=len(der))):
        parse_der_certs(mutate(der))


def test_load_pem_rejects_non_pem() -> None:
    with pytest.raises(SvidParseError):
        load_pem_certs(b"not pem")
    with pytest.raises(SvidParseError):
        load_pem_certs(b"")


def test_duplicate_extensions_are_profile_errors(ca) -> None:  # type: ignore[no-untyped-def]
    # Found by tests/fuzz: DuplicateExtension is no ValueError; it escaped the profile checks.
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    dup = der.replace(b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x0f", 1)  # SKID -> KU
    cert = x509.load_der_x509_certificate(dup)
    for check in (check_signing_profile, check_leaf_profile):
        with pytest.raises(X509SvidError, match="malformed extensions"):
            check(cert)


def test_load_pem_rejects_an_invalid_version(ca) -> None:  # type: ignore[no-untyped-def]
    # Found by tests/fuzz: cryptography's InvalidVersion is no ValueError.
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    bad = der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x05", 1)  # v3 -> "v6"
    pem = (
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    )
    with pytest.raises(SvidParseError, match="not a valid X509 version"):
        load_pem_certs(pem)


def test_x509_svid_parse_and_serialise(ca) -> None:  # type: ignore[no-untyped-def]
    leaf = make_leaf(ca, not_before=T0 - 10, not_after=T0 + 300)
    svid = X509Svid.parse(der_concat([leaf.cert]), _key_der(leaf.key), hint="internal")
    assert str(svid.spiffe_id) == "spiffe://example.org/workload"
    assert svid.leaf == leaf.cert
    assert svid.hint == "internal"
    assert svid.expires_at == T0 + 300
    assert svid.issued_at == T0 - 10
    assert X509Svid.parse(svid.chain_der(), svid.key_der()).leaf == leaf.cert
    again = X509Svid.load_pem(svid.chain_pem(), svid.key_pem())
    assert again.key_der() == svid.key_der()
    assert "PRIVATE" not in repr(svid)
    assert "example.org/workload" in repr(svid)


def test_x509_svid_rejects_mismatched_key(ca) -> None:  # type: ignore[no-untyped-def]
    leaf, other = make_leaf(ca), make_leaf(ca)
    with pytest.raises(X509SvidError, match="does not match"):
        X509Svid.parse(der_concat([leaf.cert]), _key_der(other.key))


def test_x509_svid_rejects_bad_key_and_bad_leaf(ca) -> None:  # type: ignore[no-untyped-def]
    leaf = make_leaf(ca)
    with pytest.raises(SvidParseError, match="PKCS#8"):
        X509Svid.parse(der_concat([leaf.cert]), b"\x30\x03\x02\x01\x00")
    bad = make_leaf(ca, ca=True)
    with pytest.raises(X509SvidError, match="cA=true"):
        X509Svid.parse(der_concat([bad.cert]), _key_der(bad.key))
    with pytest.raises(X509SvidError, match="signing certificate"):
        X509Svid.parse(der_concat([leaf.cert, make_leaf(ca).cert]), _key_der(leaf.key))


def test_x509_svid_rejects_a_leaf_key_cryptography_cannot_read(ca) -> None:  # type: ignore[no-untyped-def]
    # Found by tests/fuzz: an unknown key algorithm OID raised UnsupportedAlgorithm.
    leaf = make_leaf(ca)
    chain = der_concat([leaf.cert]).replace(
        bytes.fromhex("2a8648ce3d0201"),
        bytes.fromhex("2a8648ce3d0209"),  # id-ecPublicKey -> ?
    )
    with pytest.raises(X509SvidError, match="unreadable public key"):
        X509Svid.parse(chain, _key_der(leaf.key))


def test_x509_svid_rejects_a_private_key_of_an_unknown_algorithm(ca) -> None:  # type: ignore[no-untyped-def]
    # Found by tests/fuzz: load_der_private_key raised UnsupportedAlgorithm.
    leaf = make_leaf(ca)
    key = _key_der(leaf.key).replace(
        bytes.fromhex("2a8648ce3d0201"),
        bytes.fromhex("2b8648ce3d0201"),  # id-ecPublicKey -> ?
    )
    with pytest.raises(SvidParseError, match="PKCS#8"):
        X509Svid.parse(der_concat([leaf.cert]), key)
    pem = (
        b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(key) + b"-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(SvidParseError, match="PEM key"):
        X509Svid.load_pem(leaf.cert.public_bytes(serialization.Encoding.PEM), pem)


def test_x509_svid_with_intermediate(ca) -> None:  # type: ignore[no-untyped-def]
    inter = make_ca(parent=ca)
    leaf = make_leaf(inter, opts=LeafOptions(uris=["spiffe://example.org/deep/one"]))
    svid = X509Svid.parse(der_concat([leaf.cert, inter.cert]), _key_der(leaf.key))
    assert svid.cert_chain == (leaf.cert, inter.cert)


def test_tbs_names_match_cryptography(ca) -> None:  # type: ignore[no-untyped-def]
    from svid._der import tbs_names

    inter = make_ca(parent=ca)
    for issued in (ca, inter, make_leaf(inter), make_ca(key=rsa_key())):
        issuer, subject = tbs_names(issued.cert.tbs_certificate_bytes)
        assert issuer == issued.cert.issuer.public_bytes()
        assert subject == issued.cert.subject.public_bytes()
    with pytest.raises(SvidParseError):
        tbs_names(b"\x30\x05\x02\x01")


@given(st.binary(max_size=64))
def test_parse_der_certs_raises_only_parse_error(data: bytes) -> None:
    for blob in (data, b"\x30\x82" + data, b"\x30" + bytes([len(data)]) + data):
        with contextlib.suppress(SvidParseError):
            parse_der_certs(blob)

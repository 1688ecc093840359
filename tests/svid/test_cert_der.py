"""The strict DER certificate reader behind the uncached X.509 fast path."""

from __future__ import annotations

import calendar
import contextlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from svid import MemoryBundleSource, SpiffeBundle, TrustDomain, X509Verifier
from svid import _cert_der as der
from svid._clock import FakeClock
from svid._errors import SvidParseError, VerificationError, X509SvidError
from svid._verify_x509 import _dotted
from svid._x509 import check_leaf_facts, check_leaf_profile
from tests.svid.certs import T0, Issued, make_ca, make_leaf, reissue

TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca(not_before=T0 - 3600, not_after=T0 + 86400)


@pytest.fixture(scope="module")
def leaf_der(ca: Issued) -> bytes:
    return make_leaf(ca).cert.public_bytes(serialization.Encoding.DER)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_facts_agree_with_cryptography(ca: Issued) -> None:
    leaf = make_leaf(ca, not_before=T0 - 60, not_after=T0 + 3600).cert
    facts = der.parse_cert(_der(leaf))
    assert facts.tbs == leaf.tbs_certificate_bytes
    assert facts.serial == leaf.serial_number
    assert facts.issuer == leaf.issuer.public_bytes()
    assert facts.subject == leaf.subject.public_bytes()
    assert facts.not_before == leaf.not_valid_before_utc.timestamp()
    assert facts.not_after == leaf.not_valid_after_utc.timestamp()
    assert facts.signature == leaf.signature
    theirs = {e.oid.dotted_string: (e.critical, e.value.public_bytes()) for e in leaf.extensions}
    ours = {_dotted(oid): (e.critical, e.value) for oid, e in facts.extensions.items()}
    assert ours == theirs
    assert check_leaf_facts(facts) == check_leaf_profile(leaf)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"uris": []}, "exactly one URI SAN"),
        ({"uris": ["spiffe://example.org/a", "spiffe://example.org/b"]}, "exactly one"),
        ({"uris": ["spiffe://example.org"]}, "no path"),
        ({"ca": True}, "cA=true"),
        ({"basic_constraints": False}, "no basic constraints"),
        ({"key_usage": False}, "no key usage"),
        ({"key_usage_critical": False}, "not critical"),
        ({"digital_signature": False}, "lacks digitalSignature"),
        ({"key_cert_sign": True}, "keyCertSign"),
        ({"crl_sign": True}, "cRLSign"),
        ({"eku": [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]}, "serverAuth and/or clientAuth"),
    ],
)
def test_leaf_facts_apply_the_same_rules(
    ca: Issued, overrides: dict[str, Any], message: str
) -> None:
    leaf = make_leaf(ca, **overrides).cert
    with pytest.raises(X509SvidError, match=message):
        check_leaf_profile(leaf)
    with pytest.raises(X509SvidError, match=message):
        check_leaf_facts(der.parse_cert(_der(leaf)))


def test_every_truncation_is_a_parse_error(ca: Issued) -> None:
    data = _der(make_leaf(ca).cert)
    for cut in range(len(data)):
        with pytest.raises(SvidParseError):
            der.parse_cert(data[:cut])
    with pytest.raises(SvidParseError, match="trailing"):
        der.parse_cert(data + b"\x00")


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_is_only_ever_a_parse_error(data: bytes) -> None:
    with contextlib.suppress(SvidParseError):
        der.parse_cert(data)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=300)
@given(st.data())
def test_flipped_bytes_never_crash(leaf_der: bytes, data: st.DataObject) -> None:
    cert = bytearray(leaf_der)
    pos = data.draw(st.integers(0, len(cert) - 1))
    cert[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(SvidParseError):
        der.parse_cert(bytes(cert))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x30\x84\xff\xff\xff\xff", "needs"),  # a 4 GiB length in a 6-byte buffer
        (b"\x30\x85\x01\x00\x00\x00\x00\x00", "invalid length form"),  # > 4 length bytes
        (b"\x30\x80\x00\x00", "invalid length form"),  # BER indefinite length
        (b"\x30\x81\x05\x00\x00\x00\x00\x00", "non-minimal"),
        (b"\x30\x82\x00\x05\x00\x00\x00\x00\x00", "non-minimal"),
        (b"\x31\x00", "tag 0x31"),
        (b"\x30", "truncated"),
        (b"", "truncated"),
    ],
)
def test_bad_lengths_and_tags(data: bytes, message: str) -> None:
    with pytest.raises(SvidParseError, match=message):
        der.parse_cert(data)


def _ext(oid: bytes, value: bytes, critical: bytes = b"") -> bytes:
    body = b"\x06" + bytes([len(oid)]) + oid + critical + b"\x04" + bytes([len(value)]) + value
    return b"\x30" + bytes([len(body)]) + body


def _exts(*items: bytes) -> bytes:
    body = b"".join(items)
    return b"\x30" + bytes([len(body)]) + body


def test_duplicate_extensions_are_refused() -> None:
    one = _ext(der.OID_KEY_USAGE, b"\x03\x02\x07\x80", b"\x01\x01\xff")
    with pytest.raises(SvidParseError, match="appears twice"):
        der._extensions(_exts(one, one), 0, len(_exts(one, one)))
    ok = _exts(one)
    assert der._extensions(ok, 0, len(ok)) == {
        der.OID_KEY_USAGE: der.Extension(True, b"\x03\x02\x07\x80")
    }


@pytest.mark.parametrize("flag", [b"\x01\x01\x00", b"\x01\x01\x01", b"\x01\x02\xff\xff"])
def test_non_der_critical_flags_are_refused(flag: bytes) -> None:
    data = _exts(_ext(der.OID_KEY_USAGE, b"\x03\x02\x07\x80", flag))
    with pytest.raises(SvidParseError):
        der._extensions(data, 0, len(data))


def test_duplicate_extension_in_a_signed_leaf_is_a_verification_error(ca: Issued) -> None:
    # Two unknown extensions whose OIDs differ in the last byte; rewrite one into the other.
    a, b = x509.ObjectIdentifier("1.2.3.4.100"), x509.ObjectIdentifier("1.2.3.4.101")
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(7)
        .not_valid_before(ca.cert.not_valid_before_utc)
        .not_valid_after(ca.cert.not_valid_after_utc)
        .add_extension(x509.UnrecognizedExtension(a, b"\x05\x00"), critical=False)
        .add_extension(x509.UnrecognizedExtension(b, b"\x05\x00"), critical=False)
    )
    data = _der(builder.sign(ca.key, hashes.SHA256()))  # type: ignore[arg-type]
    enc_a, enc_b = b"\x06\x04\x2a\x03\x04\x64", b"\x06\x04\x2a\x03\x04\x65"
    assert data.count(enc_b) == 1
    forged = data.replace(enc_b, enc_a)
    with pytest.raises(SvidParseError, match="appears twice"):
        der.parse_cert(forged)
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0))
    with pytest.raises(VerificationError, match="appears twice"):
        verifier.verify_der(forged)


def test_unknown_critical_extension_names_its_oid(ca: Issued) -> None:
    leaf = make_leaf(ca, not_before=T0 - 60, not_after=T0 + 3600)
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    cert = reissue(leaf, ca, 9, critical=[unknown])
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0))
    with pytest.raises(VerificationError, match=r"critical extension 1\.3\.6\.1\.4\.1\.99999\.1"):
        verifier.verify_der(_der(cert))


@settings(max_examples=300)
@given(st.integers(1, 9999), st.integers(1, 12), st.integers(1, 31))
def test_days_from_civil_matches_timegm(year: int, month: int, day: int) -> None:
    if day > calendar.monthrange(year, month)[1]:
        assert day > der._month_days(year, month)
        return
    assert day <= der._month_days(year, month)
    expected = calendar.timegm((year, month, day, 0, 0, 0))
    assert der._days_from_civil(year, month, day) * 86400 == expected


@pytest.mark.parametrize(
    "text",
    [
        b"\x17\x0d2302301200000Z",
        b"\x17\x0d230101246000Z",
        b"\x17\x0d2301011200+0Z",
        b"\x17\x0c23010112000Z",
    ],
)
def test_bad_times_are_refused(text: bytes) -> None:
    with pytest.raises(SvidParseError):
        der._time(text, 0, len(text))


def test_utc_and_generalized_times() -> None:
    assert der._time(b"\x17\x0d491231235959Z", 0, 15)[0] == calendar.timegm(
        (2049, 12, 31, 23, 59, 59)
    )
    assert der._time(b"\x17\x0d500101000000Z", 0, 15)[0] == calendar.timegm((1950, 1, 1, 0, 0, 0))
    assert der._time(b"\x18\x0f20500101000000Z", 0, 17)[0] == calendar.timegm((2050, 1, 1, 0, 0, 0))


def test_extension_value_readers() -> None:
    assert der.basic_constraints(b"\x30\x00") == (False, None)
    assert der.basic_constraints(b"\x30\x06\x01\x01\xff\x02\x01\x00") == (True, 0)
    with pytest.raises(SvidParseError):
        der.basic_constraints(b"\x30\x03\x01\x01\x00")  # explicit DEFAULT FALSE is not DER
    with pytest.raises(SvidParseError):
        der.basic_constraints(b"\x30\x03\x02\x01\xff")  # negative pathLen
    bits = der.key_usage_bits(b"\x03\x02\x01\x86")  # digitalSignature, keyCertSign, cRLSign
    assert bits & der.DIGITAL_SIGNATURE
    assert bits & der.KEY_CERT_SIGN
    assert bits & der.CRL_SIGN
    with pytest.raises(SvidParseError, match="padding"):
        der.key_usage_bits(b"\x03\x02\x01\x01")
    assert der.san_uris(b"\x30\x07\x86\x05spiff") == ["spiff"]
    with pytest.raises(der.NonUriSanError):  # other names: cryptography reads those
        der.san_uris(b"\x30\x0a\x82\x01a\x86\x05spiff")
    assert der.valid_oid(der.OID_SERVER_AUTH)
    assert not der.valid_oid(b"\x2b\x80\x01")  # non-minimal arc
    assert not der.valid_oid(b"\x2b\x81")  # unterminated arc
    assert not der.valid_oid(b"")
    with pytest.raises(SvidParseError, match="ASCII"):
        der.san_uris(b"\x30\x03\x86\x01\xff")
    with pytest.raises(SvidParseError):
        der.ext_key_usages(b"\x30\x00")


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=400)
@given(st.data())
def test_mutated_leaf_never_passes_our_rules_but_fails_cryptographys(
    leaf_der: bytes, data: st.DataObject
) -> None:
    """Differential: wherever the DER reader accepts a leaf, the cryptography-based rules agree."""
    cert = bytearray(leaf_der)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(cert) - 1))
        cert[pos] = data.draw(st.integers(0, 255))
    try:
        parsed = x509.load_der_x509_certificate(bytes(cert))
    except (ValueError, x509.InvalidVersion):
        return  # the verifier loads it too, and refuses what cryptography cannot read
    try:
        ours = check_leaf_facts(der.parse_cert(bytes(cert)), parsed)
    except (SvidParseError, X509SvidError):
        return
    assert check_leaf_profile(parsed) == ours


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=200)
@given(st.data())
def test_mutated_chain_is_only_ever_a_verification_error(
    ca: Issued, leaf_der: bytes, data: st.DataObject
) -> None:
    cert = bytearray(leaf_der)
    pos = data.draw(st.integers(0, len(cert) - 1))
    cert[pos] = data.draw(st.integers(0, 255))
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), cache_size=0)
    with contextlib.suppress(VerificationError):
        verifier.verify_der(bytes(cert))


def test_authority_key_id_serial_without_issuer_is_malformed() -> None:
    """RFC 5280: authorityCertIssuer and authorityCertSerialNumber come together or not at all;
    cryptography refuses a lone serial, so the DER reader must not accept it either."""
    key_id = b"\x80\x02\xab\xcd"
    lone_serial = b"\x82\x01\x05"
    aki = der.OID_AUTHORITY_KEY_ID
    ok = der.Extension(False, b"\x30" + bytes([len(key_id)]) + key_id)
    bad = der.Extension(False, b"\x30" + bytes([len(key_id + lone_serial)]) + key_id + lone_serial)
    assert der.key_identifiers_ok({aki: ok})
    assert not der.key_identifiers_ok({aki: bad})

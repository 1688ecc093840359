"""The hand-written fast paths of the uncached verifiers equal their general paths.

Each fast path answers "the same as the general path" or "don't know" (None), never anything else:
these tests feed both valid, unusual and broken inputs and compare.
"""

from __future__ import annotations

import json
import warnings
from types import MappingProxyType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from svid import (
    BundleSet,
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    RevocationSet,
    SpiffeBundle,
    SpiffeId,
    TrustDomain,
    VerificationError,
    X509Bundle,
    X509Verifier,
    sign_jws,
)
from svid import _cert_der as der
from svid._errors import JwtSvidError, SvidError, SvidParseError
from svid._jose import b64url_encode, ecdsa_der
from svid._jwt import check_claims, split_and_check_fast, split_and_check_header
from svid._verify_jwt import VerifiedJwt
from svid._verify_x509 import VerifiedX509, _ChainDer, _verified_x509
from tests.svid.certs import T0, Issued, make_ca, make_leaf, rsa_key

TD = TrustDomain("example.org")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca(not_before=T0 - 3600, not_after=T0 + 86400)


# --- r||s to DER ---


def _edge_halves(size: int) -> list[bytes]:
    return [
        bytes(size),
        b"\x00" * (size - 1) + b"\x01",
        b"\x00" * (size - 1) + b"\x80",
        b"\x00" + b"\x80" + b"\x00" * (size - 2),
        b"\x00" + b"\x7f" + b"\xff" * (size - 2),
        b"\x7f" + b"\xff" * (size - 1),
        b"\x80" + b"\x00" * (size - 1),
        b"\xff" * size,
        b"\x01" + b"\x00" * (size - 1),
    ]


@pytest.mark.parametrize("size", [32, 48, 66])
def test_ecdsa_der_edges_match_cryptography(size: int) -> None:
    for r in _edge_halves(size):
        for s in _edge_halves(size):
            expected = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
            assert ecdsa_der(r + s, size) == expected


@settings(max_examples=300)
@given(st.sampled_from([32, 48, 66]), st.data())
def test_ecdsa_der_matches_cryptography(size: int, data: st.DataObject) -> None:
    zeros = data.draw(st.integers(0, size))  # leading zero bytes of r, then of s
    r = bytes(zeros) + data.draw(st.binary(min_size=size - zeros, max_size=size - zeros))
    zeros = data.draw(st.integers(0, size))
    s = bytes(zeros) + data.draw(st.binary(min_size=size - zeros, max_size=size - zeros))
    expected = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    assert ecdsa_der(r + s, size) == expected


# --- certificates: the fast reader and leaf templates ---


def _leaves(ca: Issued) -> list[bytes]:
    """Valid leaves of several shapes: SKID or not, long SAN, DNS SAN, RSA-signed, 2050+."""
    rsa_ca = make_ca(key=rsa_key(), not_before=T0 - 3600, not_after=T0 + 86400)
    long_uri = "spiffe://example.org/" + "p" * 200
    return [
        _der(make_leaf(ca).cert),
        _der(make_leaf(ca, subject_key_id=True).cert),
        _der(make_leaf(ca, uris=[long_uri], subject_key_id=True).cert),
        _der(make_leaf(ca, dns=["a.example"]).cert),
        _der(make_leaf(ca, subject="w", san_critical=True).cert),
        _der(make_leaf(rsa_ca).cert),
        _der(make_leaf(ca, not_after=2_600_000_000).cert),  # GeneralizedTime
        _der(make_leaf(ca, serial=1).cert),
        _der(make_leaf(ca, serial=0x80).cert),
        _der(ca.cert),
    ]


def _parse(data: bytes) -> der.CertFacts | None:
    try:
        return der.parse_cert(data)
    except SvidParseError:
        return None


def test_fast_reader_reads_what_parse_cert_reads(ca: Issued) -> None:
    read = 0
    for data in _leaves(ca):
        fast = der.parse_cert_fast(data)
        assert fast is None or fast == der.parse_cert(data)
        read += fast is not None
    assert read >= 7  # the plain shapes do take the fast path


def test_fast_reader_on_every_truncation(ca: Issued) -> None:
    data = _der(make_leaf(ca, subject_key_id=True).cert)
    assert der.parse_cert_fast(data) == der.parse_cert(data)
    for end in range(len(data)):
        assert der.parse_cert_fast(data[:end]) is None
    assert der.parse_cert_fast(data + b"\x00") is None


@settings(max_examples=500)
@given(st.data())
def test_fast_reader_on_mutated_certificates(ca: Issued, data: st.DataObject) -> None:
    source = data.draw(st.sampled_from(_LEAVES))
    cert = bytearray(source)
    for _ in range(data.draw(st.integers(1, 3))):
        cert[data.draw(st.integers(0, len(cert) - 1))] = data.draw(st.integers(0, 255))
    fast = der.parse_cert_fast(bytes(cert))
    assert fast is None or fast == der.parse_cert(bytes(cert))


_CA = make_ca(not_before=T0 - 3600, not_after=T0 + 86400)
_LEAVES = _leaves(_CA)


def _template(data: bytes) -> der.LeafTemplate:
    template = der.leaf_template(data, der.parse_cert(data))
    assert template is not None
    return template


def _load_quietly(data: bytes) -> x509.Certificate | None:
    """cryptography's verdict: the certificate, or None if it refuses it or warns about it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return x509.load_der_x509_certificate(data)
        except (ValueError, x509.InvalidVersion, Warning):
            return None


def _check_match(data: bytes, template: der.LeafTemplate) -> bool:
    """match_leaf's answer is parse_cert's, and cryptography loads what it accepts."""
    if der.template_key(data) != template.key:
        return False
    matched = der.match_leaf(data, template)
    if matched is None:
        return False
    facts, end = matched
    assert end == len(data)
    assert facts == der.parse_cert(data)
    cert = _load_quietly(data)
    assert cert is not None
    assert cert.serial_number == facts.serial
    assert cert.not_valid_before_utc.timestamp() == facts.not_before
    assert cert.not_valid_after_utc.timestamp() == facts.not_after
    assert cert.signature == facts.signature
    assert cert.tbs_certificate_bytes == facts.tbs
    return True


@pytest.mark.parametrize("skid", [False, True])
def test_leaves_of_one_workload_match_its_template(ca: Issued, skid: bool) -> None:
    template = _template(_der(make_leaf(ca, subject_key_id=skid).cert))
    matched = 0
    for n in range(12):
        other = make_leaf(ca, subject_key_id=skid, not_before=T0 - n * 977, not_after=T0 + n * 13)
        matched += _check_match(_der(other.cert), template)
    assert matched >= 10  # all but the odd one whose serial has another length


def test_other_leaves_do_not_match(ca: Issued) -> None:
    template = _template(_der(make_leaf(ca, uris=["spiffe://example.org/a"]).cert))
    for other in (
        make_leaf(ca, uris=["spiffe://example.org/b"]),  # same lengths, other workload
        make_leaf(ca, uris=["spiffe://example.org/a"], key_usage_critical=False),
        make_leaf(make_ca(name="other.org"), uris=["spiffe://example.org/a"]),
    ):
        data = _der(other.cert)
        assert der.template_key(data) != template.key or der.match_leaf(data, template) is None


@pytest.mark.parametrize("serial", [b"\x80", b"\xff\x10", b"\x00\x10", b"\x00"])
def test_serials_cryptography_would_refuse_or_warn_about_do_not_match(
    ca: Issued, serial: bytes
) -> None:
    base = _der(make_leaf(ca, serial=0x4242).cert)  # a two-byte serial: 02 02 42 42
    template = _template(base)
    assert base[13:17] == b"\x02\x02\x42\x42"
    assert _check_match(_der(make_leaf(ca, serial=0x4343).cert), template)
    data = bytearray(base)
    data[15 : 15 + len(serial)] = serial
    if len(serial) == 1:
        data[16] = 0x01
    assert der.match_leaf(bytes(data), template) is None


def test_an_unmutated_leaf_matches() -> None:
    assert _check_match(_SKID_LEAVES[1], _SKID_TEMPLATE)


@settings(max_examples=600)
@given(st.data())
def test_mutated_leaves_match_only_as_parse_cert_and_cryptography_read_them(
    data: st.DataObject,
) -> None:
    cert = bytearray(_SKID_LEAVES[1])
    # Mutations where they matter most: the parts a template leaves open, and anywhere.
    template = _SKID_TEMPLATE
    open_ranges = [
        (15, template.serial_end),
        (template.validity + 4, template.validity + 32),
        (template.spki_end - 64, template.spki_end),
        (template.skid_value, template.skid_end),
        (template.tbs_end, len(cert)),
        (0, len(cert)),
    ]
    for _ in range(data.draw(st.integers(1, 3))):
        start, end = data.draw(st.sampled_from(open_ranges))
        cert[data.draw(st.integers(start, end - 1))] = data.draw(st.integers(0, 255))
    _check_match(bytes(cert), template)


_SKID_LEAVES = [_der(make_leaf(_CA, subject_key_id=True).cert) for _ in range(2)]
_SKID_TEMPLATE = _template(_SKID_LEAVES[0])


@pytest.mark.parametrize(
    "when",
    [
        b"230229120000Z",  # not a leap year
        b"240230120000Z",
        b"231131120000Z",
        b"230431120000Z",
        b"231314120000Z",
        b"230014120000Z",
        b"231100120000Z",
        b"231114240000Z",
        b"231114126000Z",
        b"231114120060Z",
        b"2311141200 0Z",
        b"23111412000+Z",
        b"231114120000z",
    ],
)
@pytest.mark.parametrize("which", [0, 1])
def test_impossible_times_do_not_match(when: bytes, which: int) -> None:
    cert = bytearray(_SKID_LEAVES[1])
    start = _SKID_TEMPLATE.validity + 4 + 15 * which
    cert[start : start + 13] = when
    assert _parse(bytes(cert)) is None
    assert der.match_leaf(bytes(cert), _SKID_TEMPLATE) is None
    assert der.parse_cert_fast(bytes(cert)) is None
    good = bytearray(cert)
    good[start : start + 13] = b"240229235959Z"  # a leap day
    assert _check_match(bytes(good), _SKID_TEMPLATE)
    assert der.parse_cert_fast(bytes(good)) == der.parse_cert(bytes(good))


def test_non_der_critical_flags_are_not_read_fast() -> None:
    data = _SKID_LEAVES[1]
    flags = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\x01\x01\xff"]
    assert flags  # basic constraints and key usage are critical
    for at in flags:
        for value in (0x00, 0x01, 0x7F, 0xFE):
            cert = bytearray(data)
            cert[at + 2] = value
            assert der.parse_cert_fast(bytes(cert)) is None
            assert der.match_leaf(bytes(cert), _SKID_TEMPLATE) is None
            assert _parse(bytes(cert)) is None


@settings(max_examples=300)
@given(
    st.sampled_from(["0", "1", "2", "3", "5", "6", "9", "Z", "\x17", "\x00"]), st.integers(0, 29)
)
def test_matching_times_are_checked_like_parse_cert(char: str, offset: int) -> None:
    cert = bytearray(_SKID_LEAVES[1])
    cert[_SKID_TEMPLATE.validity + 2 + offset] = ord(char)
    matched = der.match_leaf(bytes(cert), _SKID_TEMPLATE)
    expected = _parse(bytes(cert))
    assert matched is None or (expected is not None and matched[0] == expected)
    if expected is not None and _load_quietly(bytes(cert)) is not None:
        assert matched is not None  # a valid time keeps the fast path


# --- X509Verifier: the template path agrees with the general path ---


def _outcome(verifier: X509Verifier, data: bytes) -> tuple[str, Any]:
    try:
        result = verifier.verify_der(data)
    except SvidError as exc:
        return type(exc).__name__, str(exc)
    return "ok", (result.spiffe_id, result.serial, result.expires_at, result.chain)


def test_template_path_agrees_with_the_general_path(ca: Issued) -> None:
    other_ca = make_ca()  # the same name and layout as ca, another key
    revoked = make_leaf(ca, subject_key_id=True)
    revocations = RevocationSet()
    revocations.revoke_serial(revoked.cert.serial_number, T0 + 86400)
    cases = [
        make_leaf(ca, subject_key_id=True),
        make_leaf(ca, subject_key_id=True, not_before=T0 + 60),  # not yet valid
        make_leaf(ca, subject_key_id=True, not_before=T0 - 7200, not_after=T0 - 60),  # expired
        make_leaf(other_ca, subject_key_id=True),  # the same bytes but for the signature
        make_leaf(ca, subject_key_id=True, uris=["spiffe://example.org/other"]),
        revoked,
    ]
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))

    def verifier() -> X509Verifier:
        return X509Verifier(
            source.x509_bundle_for, clock=FakeClock(T0), revocations=revocations, cache_size=0
        )

    warm = verifier()
    warm.verify_der(_der(make_leaf(ca, subject_key_id=True).cert))
    assert warm._templates
    for case in cases:
        data = _der(case.cert)
        general = _outcome(verifier(), data)  # no template yet: the general path
        assert _outcome(warm, data) == general


def test_template_path_agrees_when_bundles_change(ca: Issued) -> None:
    short_ca = make_ca(name="short.org", not_before=T0 - 3600, not_after=T0 + 100)
    short_td = TrustDomain("short.org")
    uri = "spiffe://short.org/w"
    source = MemoryBundleSource.of(
        SpiffeBundle(TD, (ca.cert,)), SpiffeBundle(short_td, (short_ca.cert,))
    )
    clock = FakeClock(T0)
    warm = X509Verifier(source.x509_bundle_for, clock=clock, cache_size=0)
    warm.verify_der(_der(make_leaf(short_ca, uris=[uri], subject_key_id=True).cert))
    warm.verify_der(_der(make_leaf(ca, subject_key_id=True).cert))
    leaf = _der(make_leaf(short_ca, uris=[uri], subject_key_id=True).cert)

    def both() -> tuple[Any, Any]:
        general = X509Verifier(source.x509_bundle_for, clock=clock, cache_size=0)
        return _outcome(warm, leaf), _outcome(general, leaf)

    ours, theirs = both()
    assert ours == theirs
    assert ours[0] == "ok"
    clock.advance(200)  # the authority has expired, the leaf has not
    ours, theirs = both()
    assert ours == theirs
    assert ours[0] == "ExpiredError"
    source.set_x509_bundles(BundleSet.of(X509Bundle(TD, (ca.cert,))))  # short.org is gone
    ours, theirs = both()
    assert ours == theirs
    assert "no X.509 bundle" in ours[1]
    source.set_x509_bundles(BundleSet.of(X509Bundle(short_td, (make_ca(name="short.org").cert,))))
    ours, theirs = both()  # rotated: same name, new key
    assert ours == theirs
    assert "does not lead to an authority" in ours[1]


@settings(max_examples=200)
@given(st.data())
def test_mutated_leaves_get_the_same_verdict_from_both_paths(data: st.DataObject) -> None:
    cert = bytearray(_SKID_LEAVES[1])
    for _ in range(data.draw(st.integers(1, 2))):
        cert[data.draw(st.integers(0, len(cert) - 1))] = data.draw(st.integers(0, 255))
    source = MemoryBundleSource.of(SpiffeBundle(TD, (_CA.cert,)))
    general = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), cache_size=0)
    warm = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), cache_size=0)
    warm.verify_der(_SKID_LEAVES[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _outcome(warm, bytes(cert)) == _outcome(general, bytes(cert))


def test_facts_carry_the_certificates_own_public_key_info(ca: Issued) -> None:
    # The leaf's key is judged from these bytes alone (svid._verify_x509._leaf_key_problem).
    for data in _leaves(ca):
        spki = (
            x509.load_der_x509_certificate(data)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        assert der.parse_cert(data).spki == spki
        fast = der.parse_cert_fast(data)
        assert fast is None or fast.spki == spki
    rsa_leaves = [_der(make_leaf(ca, key=rsa_key()).cert) for _ in range(2)]
    matched = der.match_leaf(rsa_leaves[1], _template(rsa_leaves[0]))
    assert matched is not None
    assert matched[0].spki == der.parse_cert(rsa_leaves[1]).spki


def test_a_1024_bit_rsa_leaf_is_refused_on_the_template_path(ca: Issued) -> None:
    # No template comes from such a leaf (it is refused), so one is planted: a leaf matching
    # it must still be refused for its key, which the template path reads from its
    # SubjectPublicKeyInfo without loading the certificate.
    weak = rsa.generate_private_key(65537, 1024)
    planted, leaf = (_der(make_leaf(ca, key=weak).cert) for _ in range(2))
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), cache_size=0)
    verifier._remember_template(
        planted, der.parse_cert(planted), SpiffeId.parse("spiffe://example.org/workload")
    )
    assert der.match_leaf(leaf, verifier._templates[der.template_key(leaf)][0][0]) is not None
    with pytest.raises(VerificationError, match=r"leaf serial .* 1024 bits"):
        verifier.verify_der(leaf)


def test_verified_x509_without_init_equals_with_init(ca: Issued) -> None:
    leaf = make_leaf(ca, subject_key_id=True)
    made = VerifiedX509(TD.id, (leaf.cert,), "ab", 1.5)
    assert _verified_x509(TD.id, (leaf.cert,), "ab", 1.5) == made
    lazy = _verified_x509(TD.id, _ChainDer((_der(leaf.cert),)), "ab", 1.5)
    assert lazy == made
    assert hash(lazy) == hash(made)
    assert repr(lazy) == repr(made)
    assert lazy.chain == (leaf.cert,) == made.chain
    with pytest.raises(AttributeError):
        lazy.chain = ()  # type: ignore[misc]


def test_template_results_load_their_chain_on_first_read(ca: Issued) -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), cache_size=0)
    verifier.verify_der(_der(make_leaf(ca).cert))
    leaf = make_leaf(ca)
    result = verifier.verify_der(_der(leaf.cert))
    slot = VerifiedX509.__dict__["chain"]._slot
    assert type(slot.__get__(result, VerifiedX509)) is _ChainDer
    assert result.chain == (leaf.cert,)
    assert type(slot.__get__(result, VerifiedX509)) is tuple


# --- JWT-SVIDs: the one-pass parser ---

_KEY = ec.generate_private_key(ec.SECP256R1())


def _reference(token: str) -> tuple[Any, ...] | None:
    try:
        parsed = split_and_check_header(token)
        sid, audience, exp = check_claims(parsed.claims)
    except JwtSvidError:
        return None
    return (
        parsed.alg,
        parsed.kid,
        parsed.claims,
        sid,
        audience,
        exp,
        parsed.signing_input,
        parsed.signature,
    )


def _agrees(token: str) -> bool:
    fast = split_and_check_fast(token)
    if fast is None:
        return False
    assert fast == _reference(token)
    return True


def _token(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    return sign_jws(header or {"kid": "k1", "typ": "JWT"}, claims, _KEY)


def _segment(text: bytes) -> str:
    return b64url_encode(text)


_CLAIMS: dict[str, Any] = {"sub": "spiffe://example.org/w", "aud": ["svc"], "exp": int(T0) + 60}


def test_plain_tokens_take_the_fast_path() -> None:
    for extra in (
        {},
        {"aud": "svc"},
        {"aud": ["a", "svc"], "iat": int(T0), "nbf": int(T0) - 5, "jti": "j1"},
        {"exp": -(2**53) + 1},
        {"other": {"nested": [1, 2.5, None, True]}},
    ):
        assert _agrees(_token({**_CLAIMS, **extra}))


@pytest.mark.parametrize(
    "claims",
    [
        {**_CLAIMS, "exp": float(T0)},  # valid, but not the fast path's
        {**_CLAIMS, "exp": True},
        {**_CLAIMS, "exp": 2**53},
        {**_CLAIMS, "exp": "1"},
        {**_CLAIMS, "exp": None},
        {**_CLAIMS, "iat": 1.5},
        {**_CLAIMS, "nbf": "x"},
        {**_CLAIMS, "iat": None},  # refused, as PyJWT does: null is no NumericDate
        {**_CLAIMS, "jti": 3},  # refused, as PyJWT does: jti is a string
        {**_CLAIMS, "aud": []},
        {**_CLAIMS, "aud": [""]},
        {**_CLAIMS, "aud": ["svc", 1]},
        {**_CLAIMS, "aud": ""},
        {**_CLAIMS, "aud": None},
        {**_CLAIMS, "sub": "spiffe://example.org"},
        {**_CLAIMS, "sub": "spiffe://example.org/\ud800"},
        {**_CLAIMS, "sub": "https://example.org/w"},
        {**_CLAIMS, "sub": 1},
        {"aud": "svc", "exp": 1},
    ],
)
def test_unusual_or_bad_claims_fall_back(claims: dict[str, Any]) -> None:
    token = _token(claims)
    fast = split_and_check_fast(token)
    assert fast is None or fast == _reference(token)
    if _reference(token) is None:
        assert fast is None


def test_unusual_or_bad_encodings_fall_back() -> None:
    good = _token(_CLAIMS)
    header, claims, signature = good.split(".")
    body = json.dumps(_CLAIMS).encode()
    deep = b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    segments = [
        _segment(b" " + body),
        _segment(body + b" "),
        _segment(body + b"x"),
        _segment(body + b"{}"),
        _segment(body + b"\x00"),
        _segment(b"\xef\xbb\xbf" + body),
        _segment(body.replace(b"}", b',"x":NaN}')),
        _segment(b"[1]"),
        _segment(b"{}"),
        _segment(deep),
        _segment(b"\xff"),
    ]
    headers = [
        _segment(b'{"alg":"none","kid":"k1"}'),
        _segment(b'{"alg":"HS256","kid":"k1"}'),
        _segment(b'{"alg":"ES256"}'),
        _segment(b'{"alg":"ES256","kid":"k1","crit":["x"]}'),
        _segment(b"[" * 5000 + b"]" * 5000),
    ]
    tokens = [
        f"{header}.{claims}=.{signature}",
        f"{header}.{claims}.{signature}==",
        f"{header}.{claims}.{signature}.",
        f"{header}.{claims}",
        f"{header}.{claims}+.{signature}",
        f"{header}.{claims}.{signature[:-1]}/",
        f"{header}.{claims}.{signature[:-2]}",
        f"{header}.{claims}\u00e9.{signature}",
        "x" * 70_000,
        *(f"{header}.{segment}.{signature}" for segment in segments),
        *(f"{h}.{claims}.{signature}" for h in headers),
    ]
    for token in tokens:
        fast = split_and_check_fast(token)
        assert fast is None or fast == _reference(token)
        if _reference(token) is None:
            assert fast is None


@settings(max_examples=500)
@given(st.data())
def test_mutated_tokens_agree(data: st.DataObject) -> None:
    token = list(_token({**_CLAIMS, "iat": int(T0), "jti": "abc"}))
    alphabet = "AZaz09-_+/=.é \x00"
    for _ in range(data.draw(st.integers(1, 3))):
        token[data.draw(st.integers(0, len(token) - 1))] = data.draw(st.sampled_from(alphabet))
    text = "".join(token)
    fast = split_and_check_fast(text)
    reference = _reference(text)
    assert fast is None or fast == reference
    if reference is None:
        assert fast is None


def test_deep_nesting_and_surrogates_are_verification_errors() -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": _KEY.public_key()}))
    verifier = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), cache_size=0)
    header = _segment(b'{"alg":"ES256","kid":"k1"}')
    deep = _segment(b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}")
    deep_header = _segment(b"[" * 5000 + b"]" * 5000)
    for token in (
        f"{header}.{deep}.AAAA",
        f"{deep_header}.{deep}.AAAA",
        _token({**_CLAIMS, "sub": "spiffe://example.org/\ud800"}),
    ):
        with pytest.raises(VerificationError, match="malformed"):
            verifier.verify(token, "svc")


def test_verified_jwt_without_init_equals_with_init() -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": _KEY.public_key()}))
    verifier = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), cache_size=0)
    claims = {**_CLAIMS, "jti": "j"}
    got = verifier.verify(_token(claims), "svc")
    made = VerifiedJwt(
        SpiffeId.parse(claims["sub"]), MappingProxyType(claims), ("svc",), claims["exp"], "k1"
    )
    assert got == made
    assert repr(got) == repr(made)
    with pytest.raises(AttributeError):
        got.kid = "x"  # type: ignore[misc]


def test_fast_signature_check_is_the_signature_check() -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": _KEY.public_key()}))
    verifier = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), cache_size=0)
    token = _token(_CLAIMS)
    assert verifier.verify(token, "svc").spiffe_id.path == "/w"
    header, claims, signature = token.split(".")
    other = sign_jws({"kid": "k1"}, _CLAIMS, ec.generate_private_key(ec.SECP256R1()))
    for bad in (
        f"{header}.{claims}.{other.split('.')[2]}",
        f"{header}.{claims}.{signature[:-4]}AAAA",
        f"{header}.{claims}.{b64url_encode(bytes(64))}",
    ):
        with pytest.raises(VerificationError, match="signature is invalid"):
            verifier.verify(bad, "svc")

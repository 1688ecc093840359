"""The signer's hand-written fast paths against the library calls they stand in for.

Each fast path must give what the reference gives, byte for byte (or verdict for verdict), on
good and bad input alike: the hand-encoded leaf TBS against CertificateBuilder, the CSR
signature check against `is_signature_valid`, JWT signing against `sign_jws`, raw ECDSA
signatures against `decode_dss_signature`, and the random pool against os.urandom's contract.
"""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from server.ca import leaf_der, randomness
from server.ca.errors import CsrError
from server.ca.keys import generate_key
from server.ca.leaf_der import der_integer, der_time, oid_der, tlv
from server.ca.manager import CaManager
from server.ca.signer import (
    JwtSigner,
    LeafFields,
    X509Signer,
    _EsSigner,
    csr_public_key,
    csr_signature_valid,
)
from svid._cert_der import read_tlv
from svid._clock import FakeClock
from svid._jose import _ecdsa_der_to_raw_slow, ecdsa_der_to_raw, sign_jws
from svid._spiffe_id import SpiffeId
from svid._x509 import check_leaf_profile
from tests.server.conftest import openssl_verify

DER = serialization.Encoding.DER
_RNG = random.Random(20261128)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ts(*args: int) -> int:
    return int((datetime(*args, tzinfo=UTC) - _EPOCH).total_seconds())  # type: ignore[misc]


def _ca(key_type: str, name: str = "ca", tz: str = "example.org") -> tuple[x509.Certificate, Any]:
    key = generate_key(key_type)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(1950, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{tz}")]),
            critical=False,
        )
        .sign(key, hashes.SHA384() if key_type == "ec-p384" else hashes.SHA256())
    )
    return cert, key


def _leaf_keys() -> list[Any]:
    return [
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        ec.generate_private_key(ec.SECP521R1()).public_key(),
        rsa.generate_private_key(65537, 2048).public_key(),
        rsa.generate_private_key(3, 3072).public_key(),
    ]


_SERIALS = [1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, (1 << 159) - 1, 1 << 158, 1 << 64]
_TIMES = [
    (_ts(1950, 1, 1), _ts(1950, 1, 1, 0, 5)),
    (_ts(2024, 2, 29, 23, 59, 59), _ts(2024, 3, 1)),
    (_ts(2049, 12, 31, 23, 59, 50), _ts(2049, 12, 31, 23, 59, 59)),
    (_ts(2049, 12, 31, 23, 59, 59), _ts(2050, 1, 1)),
    (_ts(2050, 1, 1), _ts(2100, 6, 15, 12, 30, 1)),
    (_ts(9999, 12, 31, 23, 0), _ts(9999, 12, 31, 23, 59, 59)),
]
_PATHS = ["/a", "/ns/prod/sa/web", "/" + "x" * 120, "/" + "/".join(["seg-9_.x"] * 200)]
_DNS = [
    (),
    ("a.example",),
    ("*.b.example", "c.example", "x" * 63 + ".example"),
    tuple(f"host{i}.example.org" for i in range(40)),
]


@pytest.mark.parametrize("ca_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_template_tbs_equals_the_builders(ca_type: str) -> None:
    ca_cert, ca_key = _ca(ca_type)
    signer = X509Signer(ca_cert, ca_key, (), FakeClock(_ts(2030, 1, 1)))
    assert signer.template is not None
    keys = _leaf_keys()
    cases = 0
    for key in keys:
        for serial in [*_SERIALS, *(_RNG.getrandbits(159) or 1 for _ in range(3))]:
            not_before, not_after = _RNG.choice(_TIMES)
            path, dns = _RNG.choice(_PATHS), _RNG.choice(_DNS)
            leaf = LeafFields(
                key,
                SpiffeId.parse(f"spiffe://example.org{path}"),
                dns,
                serial,
                not_before,
                not_after,
            )
            reference = signer.builder_leaf(leaf)
            assert signer.template_tbs(leaf) == reference.tbs_certificate_bytes
            cases += 1
    for not_before, not_after in _TIMES:  # every boundary at least once, with every DNS shape
        for dns in _DNS:
            leaf = LeafFields(
                keys[0], SpiffeId.parse("spiffe://example.org/t"), dns, 42, not_before, not_after
            )
            assert signer.template_tbs(leaf) == signer.builder_leaf(leaf).tbs_certificate_bytes
            cases += 1
    assert cases > 60


@pytest.mark.parametrize("ca_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_template_leaf_is_a_whole_valid_certificate(ca_type: str, tmp_path: Path) -> None:
    ca_cert, ca_key = _ca(ca_type)
    clock = FakeClock(_ts(2030, 1, 1))
    signer = X509Signer(ca_cert, ca_key, (), clock)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    leaf = LeafFields(key, SpiffeId.parse("spiffe://example.org/w"), ("w.example",), 77, *_TIMES[1])
    der = signer.template_leaf(leaf)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    reference = signer.builder_leaf(leaf)
    # Same DER layout as the builder's: reserialised unchanged, same signature algorithm and
    # TBS, and a signature the CA key made over exactly that TBS.
    assert cert.public_bytes(DER) == der
    assert cert.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert cert.signature_algorithm_oid == reference.signature_algorithm_oid
    assert leaf_der.signature_algorithm_of(der) == leaf_der.signature_algorithm_of(
        reference.public_bytes(DER)
    )
    cert.verify_directly_issued_by(ca_cert)
    # And through issue(): the profile checks and an independent verifier.
    clock.set(_ts(2030, 1, 1))
    issued = signer.issue(key, SpiffeId.parse("spiffe://example.org/w"), 300, ("w.example",))
    assert check_leaf_profile(issued.certificate) == SpiffeId.parse("spiffe://example.org/w")
    result = openssl_verify(tmp_path, issued.certificate, [ca_cert], at=clock.now())
    assert result.returncode == 0, result.stderr + result.stdout


def test_issue_uses_the_template_on_a_real_ca(ca_manager: CaManager) -> None:
    signer = ca_manager.x509_signer()
    assert signer.template is not None
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    issued = signer.issue(key, SpiffeId.parse("spiffe://example.org/w"), 60)
    assert signer.template.sign is not None
    assert issued.leaf_der == issued.chain_der[: len(issued.leaf_der)]
    assert issued.certificate.serial_number == issued.serial


def test_what_the_template_cannot_encode_goes_to_the_builder() -> None:
    ca_cert, ca_key = _ca("ec-p256")
    signer = X509Signer(ca_cert, ca_key, (), FakeClock(_ts(2030, 1, 1)))
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    spiffe_id = SpiffeId.parse("spiffe://example.org/w")
    before_1950 = LeafFields(key, spiffe_id, (), 5, _ts(1949, 12, 31, 23, 59, 59), _ts(1950, 1, 2))
    # The builder alone decides what happens then (it refuses such a time; issuance never
    # asks, since no CA here starts before 1950).
    assert signer.template_tbs(before_1950) is None
    unicode_dns = LeafFields(key, spiffe_id, ("bücher.example",), 5, *_TIMES[1])
    assert signer.template_leaf(unicode_dns) is None


def test_a_template_that_differs_from_the_builder_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_tbs = leaf_der.LeafTemplate.tbs

    def off_by_one(self: leaf_der.LeafTemplate, **kwargs: Any) -> bytes:
        return real_tbs(self, **{**kwargs, "serial": kwargs["serial"] + 1})

    monkeypatch.setattr(leaf_der.LeafTemplate, "tbs", off_by_one)
    ca_cert, ca_key = _ca("ec-p256")
    signer = X509Signer(ca_cert, ca_key, (), FakeClock(_ts(2030, 1, 1)))
    assert signer.template is None
    issued = signer.issue(
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        SpiffeId.parse("spiffe://example.org/w"),
        60,
    )
    assert issued.certificate.serial_number == issued.serial  # the builder made it
    issued.certificate.verify_directly_issued_by(ca_cert)


def test_der_helpers_match_the_standard_encodings() -> None:
    assert tlv(0x04, b"") == b"\x04\x00"
    assert tlv(0x04, b"x" * 127)[:2] == b"\x04\x7f"
    assert tlv(0x04, b"x" * 128)[:3] == b"\x04\x81\x80"
    assert tlv(0x04, b"x" * 256)[:4] == b"\x04\x82\x01\x00"
    assert der_integer(0x80) == b"\x02\x02\x00\x80"
    assert der_integer(1) == b"\x02\x01\x01"
    with pytest.raises(ValueError, match="non-negative"):
        der_integer(-1)
    assert der_time(_ts(2049, 12, 31, 23, 59, 59)) == b"\x17\x0d491231235959Z"
    assert der_time(_ts(2050, 1, 1)) == b"\x18\x0f20500101000000Z"
    with pytest.raises(ValueError, match="outside"):
        der_time(_ts(1949, 12, 31))
    assert oid_der("2.5.29.17") == b"\x06\x03\x55\x1d\x11"
    assert oid_der("1.2.840.113549.1.1.11") == bytes.fromhex("06092a864886f70d01010b")
    for bad in ("1", "3.1", "1.40", "1.-2"):
        with pytest.raises(ValueError, match="OID"):
            oid_der(bad)
    with pytest.raises(ValueError, match="needs 7 bytes, 3 left"):
        read_tlv(b"\x30\x05\x01", 0, 3)
    with pytest.raises(ValueError, match="length"):
        read_tlv(b"\x30\x85\x01\x00\x00\x00\x00", 0, 7)


# -- CSR signature check -------------------------------------------------------------------------


def _csr_der(key: Any, algorithm: hashes.HashAlgorithm | None, **kwargs: Any) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")])
    )
    return builder.sign(key, algorithm, **kwargs).public_bytes(DER)


def _resign_outer(der: bytes, algorithm_der: bytes) -> bytes:
    """`der` with its outer signatureAlgorithm replaced (lengths fixed up)."""
    _, start, end = read_tlv(der, 0, len(der))
    _, _, info_end = read_tlv(der, start, len(der))
    _, _, alg_end = read_tlv(der, info_end, len(der))
    return tlv(0x30, der[start:info_end] + algorithm_der + der[alg_end:end])


def _flip(der: bytes, at: int) -> bytes:
    data = bytearray(der)
    data[at] ^= 0x01
    return bytes(data)


def _csr_cases() -> list[bytes]:
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    p521 = ec.generate_private_key(ec.SECP521R1())
    rsa_key = rsa.generate_private_key(65537, 2048)
    good = [
        _csr_der(p256, hashes.SHA256()),
        _csr_der(p256, hashes.SHA384()),
        _csr_der(p384, hashes.SHA384()),
        _csr_der(p521, hashes.SHA512()),
        _csr_der(rsa_key, hashes.SHA256()),
        _csr_der(rsa_key, hashes.SHA512()),
        _csr_der(
            rsa_key, hashes.SHA256(), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), 32)
        ),
        _csr_der(ed25519.Ed25519PrivateKey.generate(), None),
    ]
    cases = list(good)
    for der in good:
        cases.append(_flip(der, len(der) - 3))  # in the signature
        cases.append(_flip(der, 20))  # in the request info
    ecdsa_256 = tlv(0x30, oid_der("1.2.840.10045.4.3.2"))
    rsa_256 = tlv(0x30, oid_der("1.2.840.113549.1.1.11") + b"\x05\x00")
    cases += [
        _resign_outer(good[0], tlv(0x30, oid_der("1.2.840.10045.4.3.2") + b"\x05\x00")),
        _resign_outer(good[0], rsa_256),  # an EC key claiming RSA
        _resign_outer(good[4], ecdsa_256),  # an RSA key claiming ECDSA
        _resign_outer(good[4], tlv(0x30, oid_der("1.2.840.113549.1.1.11"))),  # no NULL
        _resign_outer(good[0], tlv(0x30, oid_der("1.2.840.10045.4.3.3"))),  # wrong hash
        _resign_outer(good[0], tlv(0x30, oid_der("1.2.3.4"))),  # unknown algorithm
    ]
    return cases


def _reference(der: bytes) -> object:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        return "unparseable"
    try:
        return csr.is_signature_valid
    except Exception:
        return "raises"


def _fast(der: bytes) -> object:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        return "unparseable"
    try:
        return csr_signature_valid(csr, der)
    except CsrError:
        return "raises"


def test_csr_signature_check_gives_is_signature_valids_verdict() -> None:
    cases = _csr_cases()
    verdicts = [(_fast(der), _reference(der)) for der in cases]
    assert all(fast == ref for fast, ref in verdicts), verdicts
    # The cases cover all three outcomes.
    assert {ref for _, ref in verdicts} >= {True, False}


def test_csr_public_key_refuses_what_it_refused_before() -> None:
    for der in _csr_cases():
        reference = _reference(der)
        if reference is True:
            key = x509.load_der_x509_csr(der).public_key()
            if isinstance(key, ed25519.Ed25519PublicKey):
                with pytest.raises(CsrError, match="refused"):
                    csr_public_key(der)
            else:
                assert csr_public_key(der) == key
        elif reference is False:
            with pytest.raises(CsrError, match="does not verify"):
                csr_public_key(der)
        else:
            with pytest.raises(CsrError):
                csr_public_key(der)


# -- JWT signing -----------------------------------------------------------------------------------

_AUDIENCES: list[str | list[str]] = [
    "a",
    ["a", "b"],
    "é",
    ['quo"te', "back\\slash", "new\nline", "tab\t", "\x00\x1f", "emoji 🙂", "\u2028"],
    "x" * 300,
]


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384"])
def test_es_signing_input_equals_sign_jws(key_type: str) -> None:
    key = generate_key(key_type)
    signer = JwtSigner(key, "kid-1", FakeClock(1_700_000_000), 2_000_000_000)
    header = signer._header
    es = _EsSigner.checked(key, header)
    assert es is not None
    for aud in _AUDIENCES:
        for sub in ("spiffe://example.org/w", "spiffe://example.org/" + "p/" * 100 + "x"):
            claims = {"sub": sub, "aud": aud, "exp": 1_700_000_300, "iat": 1_700_000_000}
            claims["jti"] = "j" * 22
            reference = sign_jws(header, claims, key)
            plain = es.sign_plain(sub, aud, 1_700_000_300, 1_700_000_000, "j" * 22)
            generic = es.sign(claims)
            for token in (plain, generic):
                assert token.rsplit(".", 1)[0] == reference.rsplit(".", 1)[0]
                decoded = pyjwt.decode(
                    token,
                    key.public_key(),  # type: ignore[arg-type]
                    algorithms=[header["alg"]],
                    options={"verify_aud": False, "verify_exp": False},
                )
                assert decoded == claims


def test_jwt_signer_tokens_verify_and_carry_the_claims() -> None:
    key = generate_key("ec-p256")
    signer = JwtSigner(key, "kid-1", FakeClock(1_700_000_000), 2_000_000_000)
    spiffe_id = SpiffeId.parse("spiffe://example.org/w")
    for audience in (["one"], ["one", "two"], ['é"\\']):
        issued = signer.sign(spiffe_id, audience, 300)
        claims = pyjwt.decode(
            issued.token,
            key.public_key(),  # type: ignore[arg-type]
            algorithms=["ES256"],
            audience=audience[0],
            options={"verify_exp": False},
        )
        assert claims["aud"] == (audience[0] if len(audience) == 1 else audience)
        assert claims["jti"] == issued.jti
        assert len(issued.jti) == 22
        header = pyjwt.get_unverified_header(issued.token)
        assert header == {"alg": "ES256", "kid": "kid-1", "typ": "JWT"}
    with_extra = signer.sign(spiffe_id, ["a"], 300, {"task": "t-1"})
    assert (
        pyjwt.decode(
            with_extra.token,
            key.public_key(),  # type: ignore[arg-type]
            algorithms=["ES256"],
            audience="a",
            options={"verify_exp": False},
        )["task"]
        == "t-1"
    )


def test_jwt_signer_without_a_fast_path_uses_sign_jws(monkeypatch: pytest.MonkeyPatch) -> None:
    rsa_signer = JwtSigner(generate_key("rsa-2048"), "k", FakeClock(1_700_000_000), 2**40)
    assert rsa_signer._es is None
    token = rsa_signer.sign(SpiffeId.parse("spiffe://example.org/w"), ["a"], 60).token
    assert pyjwt.get_unverified_header(token)["alg"] == "RS256"
    # A fast path that would differ from sign_jws is refused at construction.
    monkeypatch.setattr("server.ca.signer._claims_json", lambda *a, **k: '{"sub":"other"}')
    ec_signer = JwtSigner(generate_key("ec-p256"), "k", FakeClock(1_700_000_000), 2**40)
    assert ec_signer._es is None


def test_raw_signature_equals_decode_dss_signature() -> None:
    for curve, size, algorithm in (
        (ec.SECP256R1(), 32, hashes.SHA256()),
        (ec.SECP384R1(), 48, hashes.SHA384()),
        (ec.SECP521R1(), 66, hashes.SHA512()),
    ):
        key = ec.generate_private_key(curve)
        for _ in range(400):  # short r and s (leading zero bytes) come up every ~128 signatures
            der = key.sign(os.urandom(8), ec.ECDSA(algorithm))
            assert ecdsa_der_to_raw(der, size) == _ecdsa_der_to_raw_slow(der, size)
    crafted = [
        b"\x30\x06\x02\x01\x01\x02\x01\x02",  # tiny r and s
        b"\x30\x07\x02\x02\x00\x80\x02\x01\x02",  # a needed leading zero
        b"\x30\x07\x02\x02\x00\x01\x02\x01\x02",  # a needless leading zero (not DER)
        b"\x30\x06\x02\x01\x81\x02\x01\x02",  # negative r
        b"\x30\x05\x02\x00\x02\x01\x02",  # empty r
        b"\x30\x06\x02\x01\x01\x02\x01",  # truncated
        b"\x30\x07\x02\x01\x01\x02\x01\x02\x00",  # trailing byte
        b"\x30\x26\x02\x21\x01" + b"\x01" * 32 + b"\x02\x01\x02",  # r too big for 32 bytes
        b"\x31\x06\x02\x01\x01\x02\x01\x02",  # not a SEQUENCE
    ]
    for der in crafted:
        try:
            expected: object = _ecdsa_der_to_raw_slow(der, 32)
        except Exception as exc:  # what decode_dss_signature or to_bytes raise
            expected = type(exc)
        try:
            got: object = ecdsa_der_to_raw(der, 32)
        except Exception as exc:
            got = type(exc)
        assert got == expected, der.hex()


def test_random_pool_hands_out_fresh_bytes() -> None:
    pool = randomness.RandomPool()
    seen = {pool.take(16) for _ in range(2000)}
    assert len(seen) == 2000
    assert all(len(b) == 16 for b in seen)
    assert len(pool.take(5000)) == 5000  # more than a chunk at once
    serials = [randomness.random_serial_number() for _ in range(2000)]
    assert len(set(serials)) == 2000
    assert all(0 <= s < 1 << 159 for s in serials)
    assert max(serials).bit_length() > 150
    pool._forget()  # what a forked child does first
    assert pool.take(16) not in seen


def test_validity_is_reencoded_when_the_second_changes() -> None:
    ca_cert, ca_key = _ca("ec-p256")
    clock = FakeClock(_ts(2030, 1, 1))
    signer = X509Signer(ca_cert, ca_key, (), clock)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    spiffe_id = SpiffeId.parse("spiffe://example.org/w")
    first = signer.issue(key, spiffe_id, 60).certificate
    clock.advance(1)
    second = signer.issue(key, spiffe_id, 60).certificate
    assert second.not_valid_before_utc - first.not_valid_before_utc == timedelta(seconds=1)
    assert second.not_valid_after_utc - first.not_valid_after_utc == timedelta(seconds=1)

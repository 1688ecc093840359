"""The parse memos that run before a signature is checked keep only what was verified: a flood of
forged inputs, each unique, leaves what honest traffic uses memoized."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

import svid._cert_der as der
import svid._jwt as jwt_module
import svid._spiffe_id as spiffe_id_module
from svid import (
    AccessTokenVerifier,
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    SpiffeBundle,
    TrustDomain,
    VerificationError,
    X509Verifier,
    b64url_encode,
    der_concat,
)
from tests.svid import test_verify_access as access
from tests.svid import test_verify_jwt as svid_jwt
from tests.svid.certs import T0, ec_key, make_ca, make_leaf

TD = TrustDomain("example.org")
FLOOD = 600  # past every bound these memos have had


@pytest.fixture
def header_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many headers were decoded and checked (a memo miss each)."""
    calls = [0]
    for name in ("check_header", "check_typed_header"):
        real = getattr(jwt_module, name)

        def counted(header: Any, real: Any = real) -> Any:
            calls[0] += 1
            return real(header)

        monkeypatch.setattr(jwt_module, name, counted)
    return calls


def _forged(honest: str, i: int, typ: str) -> str:
    """The honest token under a header of its own (an unknown field), its signature kept."""
    _, claims, signature = honest.split(".")
    header = b64url_encode(f'{{"alg":"ES256","kid":"k1","typ":"{typ}","n":{i}}}'.encode())
    return f"{header}.{claims}.{signature}"


def test_forged_jwt_svid_headers_do_not_evict_the_honest_ones(header_checks: list[int]) -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": svid_jwt.KEY.public_key()}))
    verifier = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), cache_size=0)
    honest = svid_jwt.token()
    verifier.verify(honest, "svc")
    for i in range(FLOOD):
        with pytest.raises(VerificationError, match="signature is invalid"):
            verifier.verify(_forged(honest, i, "JWT"), "svc")
    header_checks[0] = 0
    verifier.verify(honest, "svc")
    assert header_checks[0] == 0


def test_forged_access_token_headers_do_not_evict_the_honest_ones(
    header_checks: list[int],
) -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": access.KEY.public_key()}))
    verifier = AccessTokenVerifier(
        source.jwt_bundle_for,
        issuer=access.ISSUER,
        audience=access.RESOURCE,
        trust_domain=TD,
        clock=FakeClock(T0),
        cache_size=0,
    )
    honest = access.token()
    verifier.verify(honest)
    for i in range(FLOOD):
        with pytest.raises(VerificationError, match="signature is invalid"):
            verifier.verify(_forged(honest, i, "at+jwt"))
    header_checks[0] = 0
    verifier.verify(honest)
    assert header_checks[0] == 0


def test_forged_leaves_do_not_evict_the_honest_leaf_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    ca = make_ca()
    leaf = make_leaf(ca)
    # One extension past what the DER reader checks alone: no template vouches for this leaf,
    # so each verification runs the leaf rules (memoized).
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(leaf.key.public_key())
        .serial_number(leaf.cert.serial_number)
        .not_valid_before(leaf.cert.not_valid_before_utc)
        .not_valid_after(leaf.cert.not_valid_after_utc)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.7"), b"\x05\x00"),
            critical=False,
        )
    )
    for ext in leaf.cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    honest = der_concat([builder.sign(ca.key, hashes.SHA256())])
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    verifier = X509Verifier(source.x509_bundle_for, clock=FakeClock(T0), cache_size=0)
    verifier.verify_der(honest)
    # The attacker's own CA (in no bundle), a leaf per SPIFFE ID of the trust domain.
    theirs, their_key = make_ca(), ec_key()
    for i in range(1100):
        forged = make_leaf(theirs, key=their_key, uris=[f"spiffe://example.org/f{i}"])
        with pytest.raises(VerificationError, match="does not lead to an authority"):
            verifier.verify_der(der_concat([forged.cert]))
    reads = [0]
    real = der.san_uris

    def counted(value: bytes) -> list[str]:
        reads[0] += 1
        return real(value)

    monkeypatch.setattr(der, "san_uris", counted)
    assert str(verifier.verify_der(honest).spiffe_id) == "spiffe://example.org/workload"
    assert reads[0] == 0


def test_forged_subjects_do_not_evict_the_honest_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": svid_jwt.KEY.public_key()}))
    verifier = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), cache_size=0)
    verifier.verify(svid_jwt.token(), "svc")
    header = b64url_encode(b'{"alg":"ES256","kid":"k1"}')
    signature = b64url_encode(bytes(64))
    for i in range(5000):  # past the subject memo's bound
        claims = b64url_encode(
            f'{{"sub":"spiffe://example.org/f{i}","aud":"svc","exp":{int(T0) + 60}}}'.encode()
        )
        with pytest.raises(VerificationError, match="signature is invalid"):
            verifier.verify(f"{header}.{claims}.{signature}", "svc")
    parses = [0]
    real = spiffe_id_module._check_trust_domain

    def counted(name: str, text: str) -> None:
        parses[0] += 1
        real(name, text)

    monkeypatch.setattr(spiffe_id_module, "_check_trust_domain", counted)
    verifier.verify(svid_jwt.token(jti="another token of the same subject"), "svc")
    assert parses[0] == 0

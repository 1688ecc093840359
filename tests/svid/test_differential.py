"""Differential tests: our verdicts against py-spiffe, PyJWT and ``openssl verify``.

On every case where the other tool applies, a credential it refuses we must refuse too ("at least
as strict"), and where the case is within its scope (path validation for OpenSSL, signatures and
claims for PyJWT) our accept/refuse verdict must match.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from svid import (
    ALLOWED_ALGS,
    FakeClock,
    JwtBundle,
    JwtVerifier,
    MemoryBundleSource,
    SpiffeBundle,
    SvidError,
    TrustDomain,
    X509Verifier,
    b64url_encode,
    der_concat,
    sign_jws,
)
from tests.svid.certs import T0, Issued, ec_key, make_ca, make_leaf

# Reference implementations are dev dependencies; without them the comparison is skipped, not faked.
pyjwt = pytest.importorskip("jwt")
spiffe = pytest.importorskip("spiffe")

TD = TrustDomain("example.org")


# --- X.509 corpus -------------------------------------------------------------------------------


@dataclass
class X509Case:
    name: str
    chain: list[Issued]  # leaf first
    in_openssl_scope: bool  # does openssl's path validation alone decide this case?
    valid: bool


def _x509_corpus() -> tuple[Issued, list[X509Case]]:
    ca = make_ca()
    other = make_ca("other.org")
    inter = make_ca(parent=ca, spiffe_id=None)
    tampered = make_leaf(ca)
    # Flip a bit in the signature: same TBS, invalid signature.
    der = bytearray(tampered.cert.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    from cryptography import x509

    tampered = Issued(x509.load_der_x509_certificate(bytes(der)), tampered.key)
    leaf_i = make_leaf(inter)
    cases = [
        X509Case("valid", [make_leaf(ca)], True, True),
        X509Case("valid via intermediate", [leaf_i, Issued(inter.cert, inter.key)], True, True),
        X509Case("missing intermediate", [leaf_i], True, False),
        X509Case("expired", [make_leaf(ca, not_before=T0 - 100, not_after=T0 - 1)], True, False),
        X509Case("not yet valid", [make_leaf(ca, not_before=T0 + 60)], True, False),
        X509Case(
            "wrong trust domain", [make_leaf(other, uris=["spiffe://example.org/w"])], True, False
        ),
        X509Case("tampered signature", [tampered], True, False),
        X509Case("CA leaf", [make_leaf(ca, ca=True)], False, False),
        X509Case("keyCertSign leaf", [make_leaf(ca, key_cert_sign=True)], False, False),
        X509Case("cRLSign leaf", [make_leaf(ca, crl_sign=True)], False, False),
        X509Case(
            "two URI SANs",
            [make_leaf(ca, uris=["spiffe://example.org/a", "spiffe://example.org/b"])],
            False,
            False,
        ),
        X509Case("no URI SAN", [make_leaf(ca, uris=[], dns=["a.example.org"])], False, False),
        X509Case("no digitalSignature", [make_leaf(ca, digital_signature=False)], False, False),
    ]
    return ca, cases


@pytest.fixture(scope="module")
def x509_corpus() -> tuple[Issued, list[X509Case]]:
    return _x509_corpus()


def _ours_x509(ca: Issued, case: X509Case) -> bool:
    src = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,)))
    verifier = X509Verifier(src.x509_bundle_for, clock=FakeClock(T0))
    try:
        verifier.verify_der(der_concat([i.cert for i in case.chain]))
    except SvidError:
        return False
    return True


def _pem(path: Path, issued: list[Issued]) -> str:
    path.write_bytes(b"".join(i.cert.public_bytes(serialization.Encoding.PEM) for i in issued))
    return str(path)


def _openssl_x509(tmp: Path, ca: Issued, case: X509Case) -> bool:
    args = ["openssl", "verify", "-attime", str(int(T0)), "-CAfile", _pem(tmp / "ca.pem", [ca])]
    if len(case.chain) > 1:
        args += ["-untrusted", _pem(tmp / "inter.pem", case.chain[1:])]
    args.append(_pem(tmp / "leaf.pem", case.chain[:1]))
    return subprocess.run(args, capture_output=True, check=False, timeout=30).returncode == 0


def _pyspiffe_x509(case: X509Case) -> bool:
    key_der = case.chain[0].key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        spiffe.X509Svid.parse_raw(der_concat([i.cert for i in case.chain]), key_der)
    except Exception:
        return False
    return True


def test_x509_corpus_ground_truth(x509_corpus: tuple[Issued, list[X509Case]]) -> None:
    ca, cases = x509_corpus
    for case in cases:
        assert _ours_x509(ca, case) is case.valid, case.name


def test_x509_agrees_with_openssl_verify(
    tmp_path: Path, x509_corpus: tuple[Issued, list[X509Case]]
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca, cases = x509_corpus
    for case in cases:
        ours, theirs = _ours_x509(ca, case), _openssl_x509(tmp_path, ca, case)
        if not theirs:
            assert not ours, f"{case.name}: openssl refuses, we accept"
        if case.in_openssl_scope:
            assert ours == theirs, f"{case.name}: ours={ours} openssl={theirs}"


def test_x509_at_least_as_strict_as_py_spiffe(x509_corpus: tuple[Issued, list[X509Case]]) -> None:
    ca, cases = x509_corpus
    for case in cases:
        if not _pyspiffe_x509(case):
            assert not _ours_x509(ca, case), f"{case.name}: py-spiffe refuses, we accept"
    # py-spiffe does no path validation: it accepts these, we must not.
    names = {c.name for c in cases if _pyspiffe_x509(c) and not _ours_x509(ca, c)}
    assert {"expired", "wrong trust domain", "tampered signature"} <= names


# --- JWT corpus ---------------------------------------------------------------------------------

KEY = ec_key()
KID = "k1"


def _claims(now: float, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "spiffe://example.org/w",
        "aud": ["svc"],
        "exp": int(now) + 300,
        "iat": int(now) - 10,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def _raw(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    h = b64url_encode(json.dumps(header).encode())
    c = b64url_encode(json.dumps(claims).encode())
    return f"{h}.{c}.{b64url_encode(sign(f'{h}.{c}'.encode()))}"


def _jwt_corpus(now: float) -> list[tuple[str, str, str, bool]]:
    """(name, token, audience, valid)."""
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    good = sign_jws({"kid": KID, "typ": "JWT"}, _claims(now), KEY)
    h, c, s = good.split(".")
    bad_sig = s[:-2] + ("AA" if not s.endswith("AA") else "BB")
    return [
        ("valid", good, "svc", True),
        ("valid, aud string", sign_jws({"kid": KID}, _claims(now, aud="svc"), KEY), "svc", True),
        ("expired", sign_jws({"kid": KID}, _claims(now, exp=int(now) - 120), KEY), "svc", False),
        ("wrong audience", good, "other", False),
        ("missing aud", sign_jws({"kid": KID}, _claims(now, aud=None), KEY), "svc", False),
        ("missing exp", sign_jws({"kid": KID}, _claims(now, exp=None), KEY), "svc", False),
        ("unknown kid", sign_jws({"kid": "nope"}, _claims(now), KEY), "svc", False),
        ("no kid", sign_jws({}, _claims(now), KEY), "svc", False),
        ("tampered signature", f"{h}.{c}.{bad_sig}", "svc", False),
        ("other key", sign_jws({"kid": KID}, _claims(now), ec_key()), "svc", False),
        ("alg none", _raw({"alg": "none", "kid": KID}, _claims(now), lambda _: b""), "svc", False),
        (
            "HS256 with the public key",
            _raw(
                {"alg": "HS256", "kid": KID},
                _claims(now),
                lambda si: hmac.new(pem, si, hashlib.sha256).digest(),
            ),
            "svc",
            False,
        ),
        ("bad typ", sign_jws({"kid": KID, "typ": "xyz"}, _claims(now), KEY), "svc", False),
        (
            "nbf in future",
            sign_jws({"kid": KID}, _claims(now, nbf=int(now) + 600), KEY),
            "svc",
            False,
        ),
    ]


def _ours_jwt(now: float, token: str, audience: str) -> bool:
    src = MemoryBundleSource.of(SpiffeBundle(TD, (), {KID: KEY.public_key()}))
    try:
        JwtVerifier(src.jwt_bundle_for, clock=FakeClock(now)).verify(token, audience)
    except SvidError:
        return False
    return True


def _pyjwt(token: str, audience: str) -> bool:
    try:
        kid = pyjwt.get_unverified_header(token).get("kid")
        if kid != KID:
            return False
        pyjwt.decode(
            token,
            KEY.public_key(),
            algorithms=sorted(ALLOWED_ALGS),
            audience=audience,
            options={"require": ["exp", "aud", "sub"]},
        )
    except Exception:
        return False
    return True


def _pyspiffe_jwt(token: str, audience: str) -> bool:
    bundle = spiffe.JwtBundle.parse(
        spiffe.TrustDomain("example.org"), JwtBundle(TD, {KID: KEY.public_key()}).to_jwks()
    )
    try:
        spiffe.JwtSvid.parse_and_validate(token, bundle, {audience})
    except Exception:
        return False
    return True


def test_jwt_corpus_ground_truth() -> None:
    now = time.time()
    for name, token, aud, valid in _jwt_corpus(now):
        assert _ours_jwt(now, token, aud) is valid, name


def test_jwt_agrees_with_pyjwt_and_py_spiffe() -> None:
    now = time.time()
    # Cases outside PyJWT's scope: SPIFFE header rules it doesn't know.
    spiffe_only = {"bad typ"}
    for name, token, aud, _ in _jwt_corpus(now):
        ours = _ours_jwt(now, token, aud)
        theirs_jwt, theirs_spiffe = _pyjwt(token, aud), _pyspiffe_jwt(token, aud)
        if not theirs_jwt or not theirs_spiffe:
            assert not ours, f"{name}: pyjwt={theirs_jwt} py-spiffe={theirs_spiffe}, we accept"
        if name not in spiffe_only:
            assert ours == theirs_jwt, f"{name}: ours={ours} pyjwt={theirs_jwt}"
        assert ours == theirs_spiffe, f"{name}: ours={ours} py-spiffe={theirs_spiffe}"

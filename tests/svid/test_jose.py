from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from svid import (
    ALLOWED_ALGS,
    JwtSvidError,
    alg_for_key,
    b64url_decode,
    b64url_encode,
    public_key_thumbprint_kid,
    sign_jws,
    verify_jws_signature,
)
from svid._jose import sign_raw
from tests.svid.certs import ec_key, rsa_key


def _parts(token: str) -> tuple[bytes, bytes]:
    h, c, s = token.split(".")
    return f"{h}.{c}".encode(), b64url_decode(s)


@pytest.mark.parametrize("data", [b"", b"f", b"fo", b"foo", b"\xff\xfe\xfd\x00", bytes(range(256))])
def test_b64url_round_trip_without_padding(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data
    assert b64url_decode(text + "=" * (-len(text) % 4)) == data


@pytest.mark.parametrize("bad", ["a", "ab+c", "ab/c", "a*bc", "é"])
def test_b64url_decode_rejects_bad_text(bad: str) -> None:
    with pytest.raises(JwtSvidError):
        b64url_decode(bad)


def test_alg_for_key() -> None:
    assert alg_for_key(ec_key(ec.SECP256R1())) == "ES256"
    assert alg_for_key(ec_key(ec.SECP384R1()).public_key()) == "ES384"
    assert alg_for_key(ec_key(ec.SECP521R1())) == "ES512"
    assert alg_for_key(rsa_key()) == "RS256"
    with pytest.raises(JwtSvidError, match="secp256k1"):
        alg_for_key(ec_key(ec.SECP256K1()))
    with pytest.raises(JwtSvidError, match="Ed25519"):
        alg_for_key(ed25519.Ed25519PrivateKey.generate())  # type: ignore[arg-type]


def _key_for(alg: str) -> ec.EllipticCurvePrivateKey | object:
    curves = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}
    return ec_key(curves[alg]) if alg.startswith("ES") else rsa_key()


@pytest.mark.parametrize("alg", sorted(ALLOWED_ALGS))
def test_sign_verify_round_trip_every_alg_and_pyjwt_agrees(alg: str) -> None:
    key = _key_for(alg)
    claims = {"sub": "spiffe://example.org/a", "aud": ["x"], "exp": 2_000_000_000}
    token = sign_jws({"alg": alg, "kid": "k1", "typ": "JWT"}, claims, key)  # type: ignore[arg-type]
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": alg, "kid": "k1", "typ": "JWT"}
    signing_input, sig = _parts(token)
    pub = key.public_key()  # type: ignore[attr-defined]
    assert verify_jws_signature(alg, signing_input, sig, pub)
    assert not verify_jws_signature(alg, signing_input + b"x", sig, pub)
    assert not verify_jws_signature(alg, signing_input, sig[:-1] + bytes([sig[-1] ^ 1]), pub)
    decoded = jwt.decode(token, pub, algorithms=[alg], audience="x")
    assert decoded == claims


def test_compact_json_encoding() -> None:
    token = sign_jws({"kid": "k"}, {"a": 1, "b": [1, 2]}, ec_key())
    assert b64url_decode(token.split(".")[1]) == b'{"a":1,"b":[1,2]}'


@pytest.mark.parametrize("alg", sorted(ALLOWED_ALGS))
def test_wrong_key_fails(alg: str) -> None:
    key = _key_for(alg)
    token = sign_jws({"alg": alg, "kid": "k"}, {"x": 1}, key)  # type: ignore[arg-type]
    signing_input, sig = _parts(token)
    other = _key_for(alg)
    if other is key:  # the shared RSA pool returned the same key
        other = _key_for(alg)
    assert not verify_jws_signature(alg, signing_input, sig, other.public_key())  # type: ignore[attr-defined]


def test_alg_key_type_confusion_is_refused() -> None:
    ec256, ec384, rsa = ec_key(), ec_key(ec.SECP384R1()), rsa_key()
    es = sign_jws({"kid": "k"}, {"x": 1}, ec256)
    si, sig = _parts(es)
    # the same signature bytes, offered under other algs or to other key types
    for alg in ("RS256", "PS256", "ES384"):
        assert not verify_jws_signature(alg, si, sig, ec256.public_key())
    assert not verify_jws_signature("ES256", si, sig, rsa.public_key())
    assert not verify_jws_signature("ES256", si, sig, ec384.public_key())
    rs = sign_jws({"kid": "k"}, {"x": 1}, rsa)
    si, sig = _parts(rs)
    assert verify_jws_signature("RS256", si, sig, rsa.public_key())
    assert not verify_jws_signature("PS256", si, sig, rsa.public_key())
    assert not verify_jws_signature("ES256", si, sig, rsa.public_key())


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512", "EdDSA", "", "es256"])
def test_algs_outside_the_list_never_verify(alg: str) -> None:
    key = ec_key()
    si, sig = _parts(sign_jws({"kid": "k"}, {"x": 1}, key))
    assert not verify_jws_signature(alg, si, sig, key.public_key())
    with pytest.raises(JwtSvidError, match="not allowed"):
        sign_jws({"alg": alg or "HS256", "kid": "k"}, {}, key)


def test_sign_refuses_mismatched_key() -> None:
    with pytest.raises(JwtSvidError, match="needs an RSA key"):
        sign_jws({"alg": "RS256"}, {}, ec_key())
    with pytest.raises(JwtSvidError, match="needs curve"):
        sign_jws({"alg": "ES384"}, {}, ec_key())
    with pytest.raises(JwtSvidError, match="needs an EC key"):
        sign_raw("ES256", b"x", rsa_key())


def test_es_signature_of_wrong_length_is_false() -> None:
    key = ec_key()
    si, sig = _parts(sign_jws({"kid": "k"}, {}, key))
    assert len(sig) == 64
    assert not verify_jws_signature("ES256", si, b"\x00" + sig, key.public_key())
    assert not verify_jws_signature("ES256", si, sig[:63], key.public_key())


def test_thumbprint_kid_is_stable_and_distinct() -> None:
    a, b = ec_key(), ec_key()
    kid = public_key_thumbprint_kid(a.public_key())
    assert kid == public_key_thumbprint_kid(a.public_key())
    assert kid != public_key_thumbprint_kid(b.public_key())
    assert len(kid) == 32
    assert b64url_decode(kid)

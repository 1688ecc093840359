"""Fuzz targets: the SPIFFE bundle (JWKS) readers and the JWK key reader.

Property: on arbitrary bytes, on real bundle JSON with bytes mutated, and on JSON documents whose
structure hypothesis chooses (keys with every member present, missing or of the wrong type), each
reader returns a bundle or raises BundleError, and never hangs; a bundle it returns serialises and
reads back as itself.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from svid import BundleError, JwtBundle, SpiffeBundle, TrustDomain
from svid._jwk import public_key_from_jwk, public_key_members
from tests.fuzz._mutate import mutated_bytes
from tests.fuzz._profile import fuzz_settings
from tests.svid.certs import make_ca, rsa_key

TD = TrustDomain("example.org")
CA = make_ca()
EC_KEY = ec.generate_private_key(ec.SECP384R1()).public_key()
RSA_KEY = rsa_key().public_key()
BUNDLE = SpiffeBundle(TD, (CA.cert,), {"k1": EC_KEY, "k2": RSA_KEY}, sequence=3, refresh_hint=60)
SEEDS = [BUNDLE.to_json(), BUNDLE.jwt_bundle().to_jwks(), b'{"keys":[]}']
_DOC = json.loads(SEEDS[0])
JWKS = [dict(k) for k in _DOC["keys"]]
_CA_DER = CA.cert.public_bytes(serialization.Encoding.DER)
_CA_X5C = base64.b64encode(_CA_DER).decode()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_MEMBERS = ("kty", "use", "kid", "crv", "x", "y", "n", "e", "x5c")
_ODD_MEMBER_VALUES = st.sampled_from(
    [
        "EC",
        "RSA",
        "OKP",
        "oct",
        "x509-svid",
        "jwt-svid",
        "P-256",
        "P-384",
        "P-521",
        "secp256k1",
        "",
        "AQAB",
        "AA",
        "A",
        "AAAA====",
        "_-_-",
        "+/+/",
        [_CA_X5C],
        [_CA_X5C, _CA_X5C],
        ["AAAA"],
        _CA_X5C[:-8],
        0,
        None,
    ]
)


@st.composite
def jwks(draw: st.DrawFn) -> dict[str, Any]:
    """A real key with a few members removed, replaced by a value of another key, or odd."""
    jwk = dict(draw(st.sampled_from(JWKS)))
    for name in draw(st.lists(st.sampled_from(_MEMBERS), max_size=3)):
        choice = draw(st.integers(0, 4))
        if choice == 0:
            jwk.pop(name, None)
        elif choice == 1:
            other = draw(st.sampled_from(JWKS))
            if name in other:
                jwk[name] = other[name]
        elif choice == 2:
            jwk[name] = draw(_ODD_MEMBER_VALUES)
        elif name == "x5c":  # the CA certificate with bytes mutated
            jwk[name] = [base64.b64encode(draw(mutated_bytes([_CA_DER]))).decode()]
        else:
            jwk[name] = draw(json_values)
    return jwk


@st.composite
def bundle_documents(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = {"keys": draw(st.lists(jwks() | json_values, max_size=4))}
    for name in ("spiffe_sequence", "spiffe_refresh_hint"):
        if draw(st.booleans()):
            doc[name] = draw(st.sampled_from([0, 1, -1, 2**64, 1.5, True, "1", None]))
    if draw(st.booleans()):
        return json.dumps(doc).encode()
    return json.dumps(draw(json_values)).encode()


@st.composite
def mutated_x5c(draw: st.DrawFn) -> bytes:
    """The real bundle with its CA certificate's DER mutated inside x5c."""
    doc = json.loads(SEEDS[0])
    for jwk in doc["keys"]:
        if jwk["use"] == "x509-svid":
            jwk["x5c"] = [base64.b64encode(draw(mutated_bytes([_CA_DER]))).decode()]
    return json.dumps(doc).encode()


# JSON nested deeper than the decoder's recursion limit.
_DEEP = st.sampled_from([b"[" * 5000, b'{"keys":' + b"[" * 5000, b'{"a":' * 5000])
bundle_bytes = st.one_of(
    bundle_documents(),
    mutated_x5c(),
    mutated_bytes(SEEDS, max_edits=6),
    st.binary(max_size=60),
    _DEEP,
)


@fuzz_settings()
@given(bundle_bytes)
def test_spiffe_bundle_parse(data: bytes) -> None:
    try:
        bundle = SpiffeBundle.parse(TD, data)
    except BundleError:
        return
    assert SpiffeBundle.parse(TD, bundle.to_json()) == bundle


@fuzz_settings()
@given(bundle_bytes)
def test_jwt_bundle_parse_jwks(data: bytes) -> None:
    try:
        bundle = JwtBundle.parse_jwks(TD, data)
    except BundleError:
        return
    assert JwtBundle.parse_jwks(TD, bundle.to_jwks()) == bundle


@fuzz_settings()
@given(jwks())
def test_public_key_from_jwk(jwk: dict[str, Any]) -> None:
    try:
        key = public_key_from_jwk(jwk, "fuzz")
    except BundleError:
        return
    assert public_key_from_jwk(public_key_members(key), "again") == key

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
import spiffe
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from svid import (
    BundleError,
    BundleSet,
    JwtBundle,
    SpiffeBundle,
    SpiffeId,
    TrustDomain,
    X509Bundle,
    der_concat,
)
from svid._jwk import public_key_members
from tests.svid.certs import ec_key, make_ca, rsa_key, slow_rsa_key

TD = TrustDomain("example.org")


def _spki(key: Any) -> bytes:
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def full_bundle() -> SpiffeBundle:
    cas = (make_ca().cert, make_ca(key=rsa_key()).cert)
    keys: dict[str, Any] = {
        "k256": ec_key().public_key(),
        "k384": ec_key(ec.SECP384R1()).public_key(),
        "k521": ec_key(ec.SECP521R1()).public_key(),
        "krsa": rsa_key().public_key(),
    }
    return SpiffeBundle(TD, cas, keys, sequence=7, refresh_hint=300)


def test_spiffe_bundle_json_round_trip(full_bundle: SpiffeBundle) -> None:
    data = full_bundle.to_json()
    doc = json.loads(data)
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300
    x509_keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_keys) == 2
    assert all("kid" not in k and len(k["x5c"]) == 1 for k in x509_keys)
    assert sorted(k["kid"] for k in jwt_keys) == ["k256", "k384", "k521", "krsa"]
    assert {k["kty"] for k in doc["keys"]} == {"EC", "RSA"}
    again = SpiffeBundle.parse(TD, data)
    assert again == full_bundle
    assert again.to_json() == data
    assert again.x509_bundle() == X509Bundle(TD, full_bundle.x509_authorities)
    assert again.jwt_bundle() == JwtBundle(TD, full_bundle.jwt_authorities)


def test_spiffe_bundle_values_are_immutable(full_bundle: SpiffeBundle) -> None:
    with pytest.raises(TypeError):
        full_bundle.jwt_authorities["new"] = ec_key().public_key()  # type: ignore[index]
    src = {"a": ec_key().public_key()}
    b = JwtBundle(TD, src)
    src["b"] = ec_key().public_key()
    assert list(b.keys) == ["a"]


def test_empty_keys_is_a_valid_bundle() -> None:
    b = SpiffeBundle.parse(TD, b'{"keys": []}')
    assert b.x509_authorities == ()
    assert dict(b.jwt_authorities) == {}
    assert b.sequence == 0


def test_unknown_use_and_kty_are_ignored(full_bundle: SpiffeBundle) -> None:
    doc = json.loads(full_bundle.to_json())
    doc["keys"].append(
        {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "use": "jwt-svid", "kid": "ed"}
    )
    doc["keys"].append({**doc["keys"][-2], "use": "wit-svid", "kid": "other"})
    doc["keys"].append({"kty": "EC", "use": "something", "crv": "P-999"})
    doc["keys"].append({"kty": "oct", "k": "c2VjcmV0", "use": "jwt-svid", "kid": "hmac"})
    parsed = SpiffeBundle.parse(TD, json.dumps(doc).encode())
    assert parsed == full_bundle


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b"{}", "no 'keys' array"),
        (b'{"keys": {}}', "no 'keys' array"),
        (b'{"keys": [1]}', "key #0 is not a JSON object"),
        (b'{"keys": [], "spiffe_sequence": -1}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_sequence": "1"}', "spiffe_sequence"),
        # The format's spiffe_sequence is a uint64.
        (b'{"keys": [], "spiffe_sequence": 18446744073709551616}', "spiffe_sequence"),
        (b'{"keys": [], "spiffe_refresh_hint": true}', "spiffe_refresh_hint"),
        (
            b'{"keys": [{"kty": "EC", "use": "jwt-svid", "crv": "P-256"}]}',
            "needs a non-empty 'kid'",
        ),
        (
            b'{"keys": [{"kty": "EC", "use": "jwt-svid", "kid": "a", "crv": "P-256"}]}',
            "member 'x' is missing",
        ),
        (
            b'{"keys": [{"kty": "EC", "use": "jwt-svid", "kid": "a", "crv": "P-192", "x": "AA"}]}',
            "unsupported EC curve",
        ),
        (b'{"keys": [{"kty": "EC", "use": "x509-svid"}]}', "exactly one certificate"),
        (
            b'{"keys": [{"kty": "EC", "use": "x509-svid", "x5c": ["!!!"]}]}',
            "not a base64 DER certificate",
        ),
    ],
)
def test_malformed_bundles_raise_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        SpiffeBundle.parse(TD, data)


@pytest.mark.parametrize("depth", [5000, 100_000])
def test_deeply_nested_json_is_a_bundle_error(depth: int) -> None:
    # Found by tests/fuzz: json.loads raised RecursionError, which is no ValueError. How deep
    # it parses depends on the Python: 5000 levels raise on 3.11 and parse on 3.13 (then
    # refused as no JWK), 100,000 raise on every Python svidd runs on.
    message = "not valid JSON" if depth > 20_000 else None
    for data in (b"[" * depth, b'{"keys":' + b"[" * depth + b"]" * depth + b"}"):
        with pytest.raises(BundleError, match=message):
            SpiffeBundle.parse(TD, data)
        with pytest.raises(BundleError, match=message):
            JwtBundle.parse_jwks(TD, data)


def _with_x5c(bundle: SpiffeBundle, mutate: Any) -> bytes:
    doc = json.loads(bundle.to_json())
    for jwk in doc["keys"]:
        if jwk["use"] == "x509-svid":
            der = base64.b64decode(jwk["x5c"][0])
            jwk["x5c"] = [base64.b64encode(mutate(der)).decode()]
    return json.dumps(doc).encode()


def _flip_point(der: bytes) -> bytes:
    """The certificate with a coordinate of its EC public key changed: no longer on the curve."""
    at = der.index(b"\x03\x42\x00\x04") + 8  # BIT STRING of a P-256 point, into x
    return der[:at] + bytes([der[at] ^ 1]) + der[at + 1 :]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda der: der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x05", 1),
        lambda der: der.replace(bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d0209")),
        _flip_point,
    ],
    ids=["invalid version", "unknown key algorithm", "point off the curve"],
)
def test_unreadable_x5c_certificates_are_bundle_errors(mutate: Any) -> None:
    # Found by tests/fuzz: InvalidVersion, UnsupportedAlgorithm and ValueError escaped.
    bundle = SpiffeBundle(TD, (make_ca().cert,))
    with pytest.raises(BundleError, match="not a base64 DER certificate"):
        SpiffeBundle.parse(TD, _with_x5c(bundle, mutate))


def test_ec_point_off_curve_is_refused(full_bundle: SpiffeBundle) -> None:
    doc = json.loads(full_bundle.to_json())
    k = next(k for k in doc["keys"] if k.get("kid") == "k256")
    k["y"] = k["x"]
    with pytest.raises(BundleError, match="not on curve"):
        SpiffeBundle.parse(TD, json.dumps(doc).encode())


def test_x5c_key_mismatch_is_refused(full_bundle: SpiffeBundle) -> None:
    doc = json.loads(full_bundle.to_json())
    k = next(k for k in doc["keys"] if k["use"] == "x509-svid" and k["kty"] == "EC")
    other = make_ca().cert.public_bytes(serialization.Encoding.DER)
    k["x5c"] = [base64.b64encode(other).decode()]
    with pytest.raises(BundleError, match="do not match"):
        SpiffeBundle.parse(TD, json.dumps(doc).encode())


def test_duplicate_kid_is_refused(full_bundle: SpiffeBundle) -> None:
    doc = json.loads(full_bundle.to_json())
    doc["keys"].append(next(k for k in doc["keys"] if k.get("kid") == "k256"))
    with pytest.raises(BundleError, match="duplicate kid"):
        SpiffeBundle.parse(TD, json.dumps(doc).encode())


def test_duplicate_kid_in_a_jwks_is_refused(full_bundle: SpiffeBundle) -> None:
    # As SpiffeBundle.parse: a second key under one kid was kept silently in place of the first,
    # so which key verifies a token depended on the order of the document.
    doc = json.loads(full_bundle.to_json())
    first = next(k for k in doc["keys"] if k.get("kid") == "k256")
    other = next(k for k in doc["keys"] if k.get("use") == "jwt-svid" and k is not first)
    doc["keys"].append({**other, "kid": "k256"})
    with pytest.raises(BundleError, match="duplicate kid 'k256'"):
        JwtBundle.parse_jwks(TD, json.dumps(doc).encode())


def test_an_oidc_jwks_listing_one_key_once_per_alg_under_one_kid_is_taken() -> None:
    # RFC 7517 §4.5 asks distinct kids with a SHOULD, and issuers list one key once per
    # algorithm it signs with (RS256 and PS256) under one kid (FAPI's vendors, Keycloak). The
    # refusal of a kid named twice refused such an issuer's whole JWKS, every token of it,
    # though which entry is kept cannot change what verifies: the key is the same.
    uses = ("sig", "jwt-svid")  # server.oauth.issuers.KEY_USES: an OIDC issuer's JWKS
    key, other = rsa_key().public_key(), ec_key().public_key()
    doc = {
        "keys": [
            {**public_key_members(key), "use": "sig", "kid": "k1", "alg": "RS256"},
            {**public_key_members(key), "use": "sig", "kid": "k1", "alg": "PS256"},
            {**public_key_members(other), "use": "sig", "kid": "k2", "alg": "ES256"},
        ]
    }
    bundle = JwtBundle.parse_jwks(TD, json.dumps(doc).encode(), uses=uses)
    assert sorted(bundle.keys) == ["k1", "k2"]
    # Two different keys under one kid are still refused: which verifies would be the order's.
    doc["keys"][1] = {**public_key_members(other), "use": "sig", "kid": "k1"}
    with pytest.raises(BundleError, match="duplicate kid 'k1'"):
        JwtBundle.parse_jwks(TD, json.dumps(doc).encode(), uses=uses)


def test_jwks_round_trip_has_only_jwt_keys(full_bundle: SpiffeBundle) -> None:
    # Parsing the full SPIFFE bundle as a JWKS keeps only the JWT keys.
    jb = JwtBundle.parse_jwks(TD, full_bundle.to_json())
    assert jb == full_bundle.jwt_bundle()
    doc = json.loads(jb.to_jwks())
    assert set(doc) == {"keys"}
    assert all(k["use"] == "jwt-svid" and k["kid"] for k in doc["keys"])
    assert JwtBundle.parse_jwks(TD, jb.to_jwks()) == jb
    assert jb.get("k256") is not None
    assert jb.get("nope") is None


def test_an_oidc_jwks_gives_its_sig_keys_when_asked_and_never_its_enc_keys(
    full_bundle: SpiffeBundle,
) -> None:
    doc = json.loads(full_bundle.jwt_bundle().to_jwks())
    (first, *rest) = doc["keys"]
    oidc = {"keys": [{**first, "use": "sig"}] + [{**k, "use": "enc"} for k in rest]}
    data = json.dumps(oidc).encode()
    assert JwtBundle.parse_jwks(TD, data).keys == {}  # a SPIFFE JWT bundle says jwt-svid
    taken = JwtBundle.parse_jwks(TD, data, uses=("sig", "jwt-svid"))
    assert list(taken.keys) == [first["kid"]]


def test_a_jwks_use_that_is_no_string_is_skipped_whatever_collection_names_the_uses(
    full_bundle: SpiffeBundle,
) -> None:
    # A JWKS is read from the network (an OIDC issuer's): a "use" of [] or {} once reached a
    # set's hash and raised TypeError instead of skipping the key.
    doc = json.loads(full_bundle.jwt_bundle().to_jwks())
    (first, *rest) = doc["keys"]
    data = json.dumps({"keys": [{**first, "use": []}, {**rest[0], "use": {}}, *rest[1:]]})
    for uses in (("jwt-svid",), frozenset({"sig", "jwt-svid"}), {"jwt-svid"}):
        taken = JwtBundle.parse_jwks(TD, data.encode(), uses=uses)
        assert set(taken.keys) == {k["kid"] for k in rest[1:]}


def test_jwks_key_without_kid_is_an_error() -> None:
    with pytest.raises(BundleError, match="kid"):
        JwtBundle.parse_jwks(TD, b'{"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}]}')


def test_py_spiffe_accepts_our_jwks(full_bundle: SpiffeBundle) -> None:
    ours = full_bundle.jwt_bundle()
    theirs = spiffe.JwtBundle.parse(spiffe.TrustDomain("example.org"), ours.to_jwks())
    got = theirs.jwt_authorities
    assert set(got) == set(ours.keys)
    for kid, key in ours.keys.items():
        assert _spki(got[kid]) == _spki(key)
    empty = spiffe.JwtBundle.parse(spiffe.TrustDomain("example.org"), JwtBundle(TD).to_jwks())
    assert empty.jwt_authorities == {}


def test_py_spiffe_accepts_our_x509_der(full_bundle: SpiffeBundle) -> None:
    xb = full_bundle.x509_bundle()
    theirs = spiffe.X509Bundle.parse_raw(spiffe.TrustDomain("example.org"), xb.to_der())
    assert set(theirs.x509_authorities) == set(xb.authorities)
    assert X509Bundle.parse_pem(TD, xb.to_pem()) == xb
    assert X509Bundle.parse_der(TD, xb.to_der()) == xb


def test_x509_bundle_errors() -> None:
    assert X509Bundle.parse_der(TD, b"").authorities == ()
    with pytest.raises(BundleError, match=r"example\.org.*offset 0"):
        X509Bundle.parse_der(TD, b"junk")
    with pytest.raises(BundleError, match=r"example\.org"):
        X509Bundle.parse_pem(TD, b"junk")


def test_bundle_set() -> None:
    other = TrustDomain("other.org")
    a = X509Bundle(TD, (make_ca().cert,))
    b = X509Bundle(other, (make_ca("other.org").cert,))
    bs = BundleSet.of(a, b)
    assert bs.get(TD) is a
    assert bs.for_id(SpiffeId.parse("spiffe://other.org/w")) is b
    assert len(bs) == 2
    assert set(bs) == {TD, other}
    with pytest.raises(BundleError, match=r"no bundle for trust domain third\.org"):
        bs.for_id(SpiffeId.parse("spiffe://third.org/w"))
    with pytest.raises(BundleError, match="filed under"):
        BundleSet({other: a})
    a2 = X509Bundle(TD, ())
    bs2 = bs.with_bundle(a2)
    assert bs2[TD] is a2
    assert bs[TD] is a
    with pytest.raises(TypeError):
        bs[TD] = a2  # type: ignore[index]
    assert der_concat(bs2[other].authorities)


_CA_POOL = [make_ca().cert for _ in range(3)]
_KEY_POOL = [ec_key().public_key() for _ in range(2)] + [ec_key(ec.SECP384R1()).public_key()]


@given(
    cas=st.lists(st.sampled_from(_CA_POOL), max_size=3, unique=True),
    kids=st.dictionaries(
        st.text(alphabet="abcdefghijklmnop0123456789-_", min_size=1, max_size=12),
        st.sampled_from(_KEY_POOL),
        max_size=3,
    ),
    sequence=st.integers(0, 2**53),
    refresh=st.integers(0, 86400),
)
def test_bundle_json_round_trip_property(
    cas: list[Any], kids: dict[str, Any], sequence: int, refresh: int
) -> None:
    b = SpiffeBundle(TD, tuple(cas), kids, sequence=sequence, refresh_hint=refresh)
    again = SpiffeBundle.parse(TD, b.to_json())
    assert again == b
    assert JwtBundle.parse_jwks(TD, b.jwt_bundle().to_jwks()) == b.jwt_bundle()
    assert X509Bundle.parse_der(TD, b.x509_bundle().to_der()) == b.x509_bundle()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_jwk_like = st.fixed_dictionaries(
    {},
    optional={
        "kty": st.sampled_from(["EC", "RSA", "OKP"]) | _json,
        "use": st.sampled_from(["x509-svid", "jwt-svid"]) | _json,
        "kid": _json,
        "crv": st.sampled_from(["P-256", "P-384"]) | _json,
        "x": _json,
        "y": _json,
        "n": _json,
        "e": _json,
        "x5c": _json,
    },
)


@given(
    st.fixed_dictionaries(
        {"keys": st.lists(_jwk_like, max_size=3) | _json},
        optional={"spiffe_sequence": _json, "spiffe_refresh_hint": _json},
    )
    | _json
)
def test_parsers_raise_only_bundle_error_on_arbitrary_json(doc: object) -> None:
    data = json.dumps(doc).encode()
    for parse in (SpiffeBundle.parse, JwtBundle.parse_jwks):
        with contextlib.suppress(BundleError):
            parse(TD, data)


def _b64uint(value: int) -> str:
    return (
        base64.urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big"))
        .rstrip(b"=")
        .decode()
    )


_N_2048 = rsa_key().public_key().public_numbers().n


@pytest.mark.parametrize(
    ("n", "e", "bound"),
    [
        # An exponent as long as the modulus: each signature check costs ~130x (SPIRE refuses).
        (_N_2048, (_N_2048 - 2) | 1, r"2\*\*31-1"),
        (_N_2048, 2**31 + 1, r"2\*\*31-1"),
        ((1 << 8200) | 1, 65537, "2048 to 8192"),  # a bigger modulus costs alike
        ((1 << 1500) | 1, 65537, "2048 to 8192"),
    ],
    ids=[
        "exponent-near-modulus",
        "exponent-past-2**31-1",
        "modulus-8201-bits",
        "modulus-1501-bits",
    ],
)
def test_rsa_jwt_keys_past_the_exponent_and_modulus_bounds_are_refused(
    n: int, e: int, bound: str
) -> None:
    jwk = {"kty": "RSA", "n": _b64uint(n), "e": _b64uint(e), "use": "jwt-svid", "kid": "slow"}
    body = json.dumps({"keys": [jwk]}).encode()
    with pytest.raises(BundleError, match=f"kid 'slow'.*{bound}"):
        JwtBundle.parse_jwks(TD, body)
    with pytest.raises(BundleError, match=f"kid 'slow'.*{bound}"):
        SpiffeBundle.parse(TD, body)


def test_rsa_jwt_keys_at_the_bounds_are_accepted() -> None:
    jwk = {"kty": "RSA", "n": _b64uint(_N_2048), "e": _b64uint(2**31 - 1), "kid": "edge"}
    bundle = JwtBundle.parse_jwks(TD, json.dumps({"keys": [jwk]}).encode())
    assert bundle.keys["edge"].public_numbers().e == 2**31 - 1  # type: ignore[union-attr]


def test_x509_authorities_with_an_rsa_key_past_the_bounds_are_refused() -> None:
    slow = make_ca(key=slow_rsa_key()).cert
    for parse in (
        lambda: X509Bundle.parse_der(TD, der_concat([make_ca().cert, slow])),
        lambda: X509Bundle.parse_pem(TD, slow.public_bytes(serialization.Encoding.PEM)),
        lambda: SpiffeBundle.parse(TD, SpiffeBundle(TD, (slow,)).to_json()),
    ):
        with pytest.raises(BundleError, match=r"'CN=CA example\.org'.*2\*\*31-1"):
            parse()

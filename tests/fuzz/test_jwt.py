"""Fuzz targets: base64url, the JWS splitters, the JWT-SVID parsers and the JWT verifier.

Property: on arbitrary text, on real tokens with characters mutated, and on freshly signed tokens
whose header and claims hypothesis chooses, each parser returns or raises its documented error
(JwtSvidError; VerificationError and its subclasses from the verifier), never hangs; the one-pass
parser equals the general one (tests/svid/test_fast_paths.py), and the verifier is at least as
strict as PyJWT on what PyJWT checks (tests/svid/test_differential.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import time
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from agent_attestor.jwt_validate import unverified_claims
from svid import (
    ALLOWED_ALGS,
    FakeClock,
    JwtSvid,
    JwtVerifier,
    MemoryBundleSource,
    RevocationSet,
    SpiffeBundle,
    TrustDomain,
    VerificationError,
    b64url_decode,
    b64url_encode,
    sign_jws,
)
from svid._errors import JwtSvidError
from svid._jwt import check_claims, split_and_check_fast, split_and_check_header, split_token
from svid._revocation import MAX_CLOCK_SKEW
from svid._verify_jwt import DEFAULT_LEEWAY
from tests.fuzz._mutate import mutated_text
from tests.fuzz._profile import fuzz_settings

TD = TrustDomain("example.org")
KID = "k1"
KEY = ec.generate_private_key(ec.SECP256R1())
T0 = 1_700_000_000
CLAIMS: dict[str, Any] = {"sub": "spiffe://example.org/w", "aud": ["svc"], "exp": T0 + 60}
TOKENS = [
    sign_jws({"kid": KID, "typ": "JWT"}, CLAIMS, KEY),
    sign_jws({"kid": KID}, {**CLAIMS, "aud": "svc", "iat": T0, "nbf": T0, "jti": "j1"}, KEY),
    sign_jws({"kid": KID, "typ": "JOSE"}, {**CLAIMS, "exp": T0 + 60.5, "x": [1, {"y": None}]}, KEY),
]
B64_ALPHABET = "AZaz09-_+/=. \x00é\ud800{}\"'"
tokens = st.one_of(
    mutated_text(TOKENS, B64_ALPHABET),
    st.text(alphabet="ABCDabcd0123-_=.", max_size=60),
    st.text(max_size=40),
)


@fuzz_settings()
@given(st.one_of(st.text(max_size=30), st.text(alphabet="AZaz09-_=+/", max_size=30)))
def test_b64url_decode(text: str) -> None:
    try:
        raw = b64url_decode(text)
    except JwtSvidError:
        return
    # What it accepts is base64url; it reads it as the standard library does.
    stripped = text.rstrip("=")
    assert base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4)) == raw


@fuzz_settings()
@given(st.binary(max_size=64))
def test_b64url_round_trip(data: bytes) -> None:
    assert b64url_decode(b64url_encode(data)) == data


def _reference(token: str) -> tuple[Any, ...] | None:
    try:
        parsed = split_and_check_header(token)
        sid, audience, exp = check_claims(parsed.claims)
    except JwtSvidError:
        return None
    return (parsed.alg, parsed.kid, parsed.claims, sid, audience, exp, parsed.signing_input,
            parsed.signature)  # fmt: skip


@fuzz_settings()
@given(tokens)
def test_token_parsers(token: str) -> None:
    with contextlib.suppress(JwtSvidError):
        split_token(token)
    with contextlib.suppress(JwtSvidError):
        JwtSvid.parse_insecure(token)
    assert isinstance(unverified_claims(token), dict)  # the agent's audit reader never raises
    reference = _reference(token)
    fast = split_and_check_fast(token)
    assert fast is None or fast == reference
    if reference is None:
        assert fast is None


def _verifier(now: float, revocations: RevocationSet | None = None) -> JwtVerifier:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {KID: KEY.public_key()}))
    return JwtVerifier(
        source.jwt_bundle_for, clock=FakeClock(now), revocations=revocations, cache_size=0
    )


@fuzz_settings()
@given(tokens, st.sampled_from(["svc", "other", ""]))
def test_verifier_on_mutated_tokens(token: str, audience: str) -> None:
    revocations = RevocationSet()
    revocations.revoke_jti("j1", T0 + 3600)
    with contextlib.suppress(VerificationError):
        _verifier(T0, revocations).verify(token, audience)


# --- freshly signed tokens: ours against PyJWT ---

# Offsets from now that stay clear of the leeway's edges, where the two clocks could disagree.
_OFFSETS = [-3600, -60, -20, -1, 0, 1, 20, 60, 3600]
_ODD = [None, "1700000000", True, [], {}, 2**60, 10**400, -(10**400), 1e300, math.nan, math.inf,
        -0.0]  # fmt: skip
_MISSING = object()


class _Rel(float):
    """A time claim relative to the moment the token is made."""


# What each header member and claim may become: a valid token changed in a few places at a time
# (a token with everything drawn at random would almost never be valid, leaving PyJWT's
# verdict nothing to check).
_HEADER_CHANGES: dict[str, list[Any]] = {
    "alg": ["ES384", "RS256", "PS256", "none", "HS256", "EdDSA", "es256", 1, _MISSING],
    "kid": ["k2", "", 1, None, _MISSING],
    "typ": ["JOSE", "jwt", "at+jwt", 1, _MISSING],
    "crit": [["exp"], []],
}
_CLAIM_CHANGES: dict[str, list[Any]] = {
    "sub": ["spiffe://example.org", "spiffe://other.org/w", "spiffe://example.org/a/../b",
            "SPIFFE://example.org/w", "spiffe://example.org/w/", "", 7, None, _MISSING],
    "aud": ["svc", ["other", "svc"], ["other"], [], "", ["svc", ""], ["svc", 1], 5, None,
            {"svc": 1}, _MISSING],
    "exp": [*map(_Rel, _OFFSETS), *(_Rel(o + 0.25) for o in _OFFSETS), *_ODD, _MISSING],
    "nbf": [*map(_Rel, _OFFSETS), *(_Rel(o + 0.25) for o in _OFFSETS), *_ODD],
    "iat": [*map(_Rel, _OFFSETS), *(_Rel(o + 0.25) for o in _OFFSETS), *_ODD],
    "jti": ["j1", "", 3, None, ["j"]],
    "iss": ["https://example.org", 4],
}  # fmt: skip


@st.composite
def _headers_and_claims(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    header: dict[str, Any] = {"alg": "ES256", "kid": KID, "typ": "JWT"}
    claims: dict[str, Any] = {"sub": "spiffe://example.org/w", "aud": ["svc"], "exp": _Rel(60)}
    for _ in range(draw(st.integers(0, 3))):
        target, changes = draw(
            st.sampled_from([(header, _HEADER_CHANGES), (claims, _CLAIM_CHANGES)])
        )
        name = draw(st.sampled_from(sorted(changes)))
        value = draw(st.sampled_from(changes[name]))
        if value is _MISSING:
            target.pop(name, None)
        else:
            target[name] = value
    return header, claims


def _resolved(claims: dict[str, Any], now: int) -> dict[str, Any]:
    return {k: now + v if type(v) is _Rel else v for k, v in claims.items()}


def _es256_token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token signed with ES256 whatever its header says (a wrong alg must then fail)."""
    h = b64url_encode(json.dumps(header).encode())
    c = b64url_encode(json.dumps(claims).encode())
    r, s = decode_dss_signature(KEY.sign(f"{h}.{c}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{h}.{c}.{b64url_encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _pyjwt_accepts(token: str, audience: str) -> bool:
    try:
        if pyjwt.get_unverified_header(token).get("kid") != KID:
            return False
        # exp with the verifier's leeway; iat and nbf with the wider bound it allows them (a
        # server clock ahead, svid._verify_jwt.future_leeway): PyJWT has one leeway for all.
        for leeway, skip in ((DEFAULT_LEEWAY, ("iat", "nbf")), (MAX_CLOCK_SKEW, ("exp",))):
            pyjwt.decode(
                token,
                KEY.public_key(),
                algorithms=sorted(ALLOWED_ALGS),
                audience=audience,
                leeway=leeway,
                options={
                    "require": ["exp", "aud", "sub"],
                    **{f"verify_{name}": False for name in skip},
                },
            )
    except Exception:
        return False
    return True


@fuzz_settings()
@given(_headers_and_claims(), st.sampled_from(["svc", "svc", "other"]))
def test_verifier_at_least_as_strict_as_pyjwt(
    header_claims: tuple[dict[str, Any], dict[str, Any]], audience: str
) -> None:
    header, claims = header_claims
    claims = _resolved(claims, int(time.time()))
    token = _es256_token(header, claims)
    now = time.time()
    try:
        _verifier(now).verify(token, audience)
        ours = True
    except VerificationError:
        ours = False
    assert not ours or _pyjwt_accepts(token, audience), (header, claims, audience)

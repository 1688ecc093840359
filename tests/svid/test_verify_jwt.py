from __future__ import annotations

import copy
import json
import math
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from svid import (
    MAX_CLOCK_SKEW,
    MAX_VERIFIER_LEEWAY,
    AudienceError,
    ExpiredError,
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    RevocationSet,
    RevokedError,
    SpiffeBundle,
    TrustDomain,
    VerificationError,
    b64url_encode,
    sign_jws,
)
from svid._jose import sign_raw
from tests.svid.certs import T0, ec_key, rsa_key

TD = TrustDomain("example.org")
OTHER = TrustDomain("other.org")
KEY = ec_key()
OTHER_KEY = ec_key()


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "spiffe://example.org/w",
        "aud": ["svc"],
        "exp": int(T0) + 300,
        "iat": int(T0),
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def token(key: Any = KEY, kid: str = "k1", **over: Any) -> str:
    return sign_jws({"kid": kid, "typ": "JWT"}, claims(**over), key)


@pytest.fixture
def source() -> MemoryBundleSource:
    return MemoryBundleSource.of(
        SpiffeBundle(TD, (), {"k1": KEY.public_key(), "krsa": rsa_key().public_key()}),
        SpiffeBundle(OTHER, (), {"o1": OTHER_KEY.public_key()}),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def revocations() -> RevocationSet:
    return RevocationSet()


@pytest.fixture
def verifier(
    source: MemoryBundleSource, clock: FakeClock, revocations: RevocationSet
) -> JwtVerifier:
    return JwtVerifier(source.jwt_bundle_for, clock=clock, revocations=revocations, leeway=5)


def test_valid_token(verifier: JwtVerifier) -> None:
    got = verifier.verify(token(), "svc")
    assert str(got.spiffe_id) == "spiffe://example.org/w"
    assert got.audience == ("svc",)
    assert got.expires_at == int(T0) + 300
    assert got.kid == "k1"
    assert got.claims["iat"] == int(T0)
    assert "eyJ" not in repr(got)


def test_rsa_token(verifier: JwtVerifier) -> None:
    rsa = rsa_key()
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"krsa": rsa.public_key()}))
    v = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0))
    for alg in ("RS256", "PS384"):
        tok = sign_jws({"alg": alg, "kid": "krsa"}, claims(), rsa)
        assert v.verify(tok, "svc").kid == "krsa"


def test_verify_any_accepts_a_token_naming_one_of_the_names(verifier: JwtVerifier) -> None:
    t = token(aud=["other", "svc-endpoint"])
    assert verifier.verify_any(t, ("svc", "svc-endpoint")).audience == ("other", "svc-endpoint")
    # Refused after its signature held: an AudienceError, whose claims are the issuer's.
    with pytest.raises(AudienceError, match="none of"):
        verifier.verify_any(t, ("svc", "nope"))
    with pytest.raises(AudienceError, match="is not for audience"):
        verifier.verify(t, "nope")
    with pytest.raises(VerificationError, match="required"):
        verifier.verify_any(t, ())
    with pytest.raises(VerificationError, match="signature"):
        verifier.verify_any(token(key=OTHER_KEY), ("svc",))


def test_verify_any_refuses_one_name_given_as_a_string(verifier: JwtVerifier) -> None:
    # A str is a sequence of its characters: verify_any(t, "svc") admitted a token for "s".
    t = token(aud=["s"])
    with pytest.raises(TypeError, match="use verify"):
        verifier.verify_any(t, "svc")
    with pytest.raises(TypeError, match="use verify"):
        verifier.verify_any(t, b"svc")  # type: ignore[arg-type]
    with pytest.raises(VerificationError, match="none of"):
        verifier.verify_any(t, ["svc"])


def test_audience_rules(verifier: JwtVerifier) -> None:
    tok = token(aud=["a", "b"])
    assert verifier.verify(tok, "a")
    assert verifier.verify(tok, "b")  # cached result, other audience
    with pytest.raises(VerificationError, match="not for audience 'c'"):
        verifier.verify(tok, "c")
    with pytest.raises(VerificationError, match="audience is required"):
        verifier.verify(tok, "")
    assert verifier.verify(token(aud="svc"), "svc")
    # A list of this service's names is a mistake of the caller's, said as one: it read as
    # the token's ("not for audience ['a']"), whichever audience the token named.
    with pytest.raises(TypeError, match="verify_any"):
        verifier.verify(tok, ["a"])  # type: ignore[arg-type]


def test_padded_copies_of_a_token_are_refused(verifier: JwtVerifier) -> None:
    """A compact JWS is unpadded base64url: its signature segment read with any number of '='
    made that many tokens of one, each cached apart (up to 64 KB a key). Whoever held any token
    the service accepts, for any audience, could fill its cache with copies."""
    good = token(aud=["elsewhere"])
    assert verifier.verify(good, "elsewhere")
    for pads in (1, 2, 3, 4, 40_000):
        with pytest.raises(VerificationError, match="padding"):
            verifier.verify(good + "=" * pads, "svc")
    head, body, signature = good.split(".")
    with pytest.raises(VerificationError, match="padding"):
        verifier.verify(f"{head}==.{body}.{signature}", "elsewhere")
    assert len(verifier.cache) == 1


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.mark.parametrize("key", [KEY, rsa_key()], ids=["ES256", "RS256"])
def test_copies_of_a_token_with_spare_bits_set_are_refused(key: Any) -> None:
    """A 64- or 256-byte signature is 86 or 342 base64url characters, the last carrying 4 bits
    past the last byte, which the decoder drops: each of their 16 values made another token of
    the same signature, verified and cached apart, for anyone holding one token."""
    kid = "k1" if key is KEY else "krsa"
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {kid: key.public_key()}))
    verifier = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), leeway=5)
    good = token(key, kid)
    assert verifier.verify(good, "svc")
    last = _B64URL.index(good[-1])
    assert last & 0x0F == 0  # an encoder leaves them clear
    for spare in range(1, 16):
        with pytest.raises(VerificationError, match="not canonical base64url"):
            verifier.verify(good[:-1] + _B64URL[last | spare], "svc")
    assert len(verifier.cache) == 1


def _unsigned(header: dict[str, Any], body: dict[str, Any], sig: bytes = b"") -> str:
    h = b64url_encode(json.dumps(header).encode())
    c = b64url_encode(json.dumps(body).encode())
    return f"{h}.{c}.{b64url_encode(sig)}"


def test_alg_none_and_hmac_key_confusion_are_refused(verifier: JwtVerifier) -> None:
    with pytest.raises(VerificationError, match="alg 'none'"):
        verifier.verify(_unsigned({"alg": "none", "kid": "k1"}, claims()), "svc")
    import hashlib
    import hmac

    # HS256 "signed" with the public key bytes as the secret: the classic confusion attack.
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    h = b64url_encode(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    c = b64url_encode(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{h}.{c}".encode(), hashlib.sha256).digest()
    with pytest.raises(VerificationError, match="alg 'HS256'"):
        verifier.verify(f"{h}.{c}.{b64url_encode(mac)}", "svc")


def test_alg_swapped_to_other_family_is_refused(verifier: JwtVerifier) -> None:
    h = {"alg": "RS256", "kid": "k1"}
    signing_input = (
        b64url_encode(json.dumps(h).encode()) + "." + b64url_encode(json.dumps(claims()).encode())
    ).encode()
    sig = sign_raw("ES256", signing_input, KEY)
    with pytest.raises(VerificationError, match="signature is invalid"):
        verifier.verify(f"{signing_input.decode()}.{b64url_encode(sig)}", "svc")


def test_tampered_token(verifier: JwtVerifier) -> None:
    tok = token()
    h, _, s = tok.split(".")
    forged = b64url_encode(json.dumps(claims(sub="spiffe://example.org/admin")).encode())
    with pytest.raises(VerificationError, match="signature is invalid"):
        verifier.verify(f"{h}.{forged}.{s}", "svc")


def test_unknown_kid_and_wrong_trust_domain(verifier: JwtVerifier) -> None:
    with pytest.raises(VerificationError, match="no JWT authority with kid 'nope'"):
        verifier.verify(token(kid="nope"), "svc")
    # other.org's key, claiming example.org: kid looked up in example.org's bundle only
    with pytest.raises(VerificationError, match=r"kid\ 'o1'\ in\ trust\ domain\ example\.org"):
        verifier.verify(token(key=OTHER_KEY, kid="o1"), "svc")
    ok = token(key=OTHER_KEY, kid="o1", sub="spiffe://other.org/w")
    assert verifier.verify(ok, "svc").spiffe_id.trust_domain == OTHER
    with pytest.raises(VerificationError, match=r"no\ JWT\ bundle\ for\ trust\ domain\ third\.org"):
        verifier.verify(token(sub="spiffe://third.org/w"), "svc")


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"aud": None}, "'aud'"),
        ({"aud": []}, "'aud'"),
        ({"exp": None}, "'exp'"),
        ({"sub": None}, "'sub'"),
        ({"sub": "spiffe://example.org"}, "without a path"),
    ],
)
def test_missing_claims(verifier: JwtVerifier, over: dict[str, Any], message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        verifier.verify(token(**over), "svc")


def test_typ_rule(verifier: JwtVerifier) -> None:
    tok = sign_jws({"kid": "k1", "typ": "at+jwt"}, claims(), KEY)
    with pytest.raises(VerificationError, match="typ"):
        verifier.verify(tok, "svc")
    assert verifier.verify(sign_jws({"kid": "k1", "typ": "JOSE"}, claims(), KEY), "svc")


def test_exp_leeway_one_second_either_side(verifier: JwtVerifier, clock: FakeClock) -> None:
    tok = token(exp=int(T0) + 10)
    clock.set(T0 + 15)  # exp + leeway exactly
    assert verifier.verify(tok, "svc")
    clock.set(T0 + 16)
    with pytest.raises(ExpiredError, match="expired"):
        verifier.verify(tok, "svc")


def test_zero_leeway(source: MemoryBundleSource) -> None:
    v = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0 + 11), leeway=0)
    with pytest.raises(ExpiredError):
        v.verify(token(exp=int(T0) + 10), "svc")
    with pytest.raises(ValueError, match="leeway"):
        JwtVerifier(source.jwt_bundle_for, leeway=-1)


def test_leeway_up_to_the_revocation_retention_is_accepted(source: MemoryBundleSource) -> None:
    clock = FakeClock(T0 + 10 + MAX_VERIFIER_LEEWAY)
    v = JwtVerifier(source.jwt_bundle_for, clock=clock, leeway=MAX_VERIFIER_LEEWAY)
    assert v.verify(token(exp=int(T0) + 10), "svc")


@pytest.mark.parametrize("leeway", [MAX_VERIFIER_LEEWAY + 0.5, 3600.0, math.inf, math.nan])
def test_leeway_wider_than_the_revocation_retention_is_refused(
    source: MemoryBundleSource, leeway: float
) -> None:
    # The server forgets a revocation MAX_VERIFIER_LEEWAY after exp: a wider leeway would
    # accept the revoked token again after that.
    with pytest.raises(ValueError, match=r"leeway must be between 0 and 300 seconds"):
        JwtVerifier(source.jwt_bundle_for, leeway=leeway)


@pytest.mark.parametrize("name", ["nbf", "iat"])
def test_not_before_and_issued_in_future(
    verifier: JwtVerifier, clock: FakeClock, name: str
) -> None:
    # Up to MAX_CLOCK_SKEW ahead (a server whose clock runs ahead), past the 5 s exp leeway.
    over: dict[str, Any] = {name: int(T0 + MAX_CLOCK_SKEW) + 1}
    tok = token(**over)
    with pytest.raises(ExpiredError, match=f"{name} .* in the future"):
        verifier.verify(tok, "svc")
    clock.advance(1)
    assert verifier.verify(tok, "svc")


def test_an_iat_ahead_is_taken_at_zero_leeway_while_exp_keeps_it(
    source: MemoryBundleSource,
) -> None:
    v = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), leeway=0)
    assert v.verify(token(iat=int(T0) + 8, nbf=int(T0) + 8), "svc")
    with pytest.raises(ExpiredError, match="expired"):
        v.verify(token(exp=int(T0) - 1), "svc")


def test_revoked_jti(verifier: JwtVerifier, revocations: RevocationSet) -> None:
    revocations.revoke_jti("j1", T0 + 300)
    with pytest.raises(RevokedError, match="'j1'"):
        verifier.verify(token(jti="j1"), "svc")
    assert verifier.verify(token(jti="j2"), "svc")


# --- cache ------------------------------------------------------------------------------------


def test_cache_hit(verifier: JwtVerifier) -> None:
    tok = token()
    first = verifier.verify(tok, "svc")
    assert verifier.verify(tok, "svc") is first
    assert verifier.cache.hits == 1


def test_cache_respects_revocation(verifier: JwtVerifier, revocations: RevocationSet) -> None:
    tok = token(jti="j9")
    verifier.verify(tok, "svc")
    revocations.revoke_jti("j9", T0 + 300)
    with pytest.raises(RevokedError):
        verifier.verify(tok, "svc")


def test_cache_respects_key_removal(verifier: JwtVerifier, source: MemoryBundleSource) -> None:
    tok = token()
    verifier.verify(tok, "svc")
    new = ec_key(ec.SECP384R1())
    source.update(SpiffeBundle(TD, (), {"k1": KEY.public_key(), "k2": new.public_key()}))
    assert verifier.verify(tok, "svc")  # rotation that keeps k1
    source.update(SpiffeBundle(TD, (), {"k2": new.public_key()}))
    with pytest.raises(VerificationError, match="no JWT authority with kid 'k1'"):
        verifier.verify(tok, "svc")


def test_cache_respects_key_replaced_under_same_kid(
    verifier: JwtVerifier, source: MemoryBundleSource
) -> None:
    tok = token()
    verifier.verify(tok, "svc")
    source.update(SpiffeBundle(TD, (), {"k1": ec_key().public_key()}))
    with pytest.raises(VerificationError, match="signature is invalid"):
        verifier.verify(tok, "svc")


def test_cache_respects_expiry(verifier: JwtVerifier, clock: FakeClock) -> None:
    tok = token(exp=int(T0) + 1)
    verifier.verify(tok, "svc")
    clock.advance(7)
    with pytest.raises(ExpiredError):
        verifier.verify(tok, "svc")


def test_cache_bounded_and_thread_safe(source: MemoryBundleSource) -> None:
    v = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), cache_size=4)
    toks = [token(sub=f"spiffe://example.org/w{i}") for i in range(8)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                for i, t in enumerate(toks):
                    assert str(v.verify(t, "svc").spiffe_id).endswith(f"/w{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(v.cache) == 4


def test_nested_claims_of_a_cached_answer_are_read_only(verifier: JwtVerifier) -> None:
    # The verifier hands the same claims to every request with the token (svid.asgi puts them
    # in the request's scope): editing what they nest changed what later requests saw.
    tok = token(act={"sub": "spiffe://example.org/a", "act": {"sub": "spiffe://example.org/b"}})
    first = verifier.verify(tok, "svc")
    act = first.claims["act"]
    with pytest.raises(TypeError, match="read-only"):
        act["sub"] = "spiffe://example.org/evil"
    with pytest.raises(TypeError, match="read-only"):
        act["act"].update(sub="spiffe://example.org/evil")
    with pytest.raises(TypeError, match="read-only"):
        first.claims["aud"].append("other")
    with pytest.raises(TypeError, match="read-only"):
        first.claims["aud"] += ["other"]  # type: ignore[index]
    later = verifier.verify(tok, "svc")
    assert later.claims["act"]["act"]["sub"] == "spiffe://example.org/b"
    assert later.claims["aud"] == ["svc"]
    assert isinstance(later.claims["act"], dict)
    assert json.loads(json.dumps(dict(later.claims))) == claims(
        act={"sub": "spiffe://example.org/a", "act": {"sub": "spiffe://example.org/b"}}
    )
    mine = copy.deepcopy(dict(later.claims))  # a copy is the caller's own to edit
    mine["act"]["sub"] = "spiffe://example.org/c"
    assert verifier.verify(tok, "svc").claims["act"]["sub"] == "spiffe://example.org/a"

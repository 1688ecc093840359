"""The hand-encoded JWT-SVID fast path with `iss`, held to sign_jws (its oracle)."""

from __future__ import annotations

from typing import Any

import jwt as pyjwt
import pytest

from server.ca.keys import generate_key
from server.ca.signer import JwtSigner, _EsSigner
from svid._clock import FakeClock
from svid._jose import sign_jws
from svid._spiffe_id import SpiffeId

ISSUER = "https://oidc.example.org:8443"


@pytest.mark.parametrize("issuer", [ISSUER, 'https://é.example/"q\\'])
def test_fast_path_with_iss_equals_sign_jws(issuer: str) -> None:
    key = generate_key("ec-p256")
    signer = JwtSigner(key, "kid-1", FakeClock(1_700_000_000), 2_000_000_000, issuer)
    es = signer._es
    assert es is not None
    for aud in ("one", ["a", 'b"\n']):
        claims = {
            "iss": issuer,
            "sub": "spiffe://example.org/w",
            "aud": aud,
            "exp": 1_700_000_300,
            "iat": 1_700_000_000,
            "jti": "j" * 22,
        }
        reference = sign_jws(signer._header, claims, key).rsplit(".", 1)[0]
        plain = es.sign_plain("spiffe://example.org/w", aud, 1_700_000_300, 1_700_000_000, "j" * 22)
        assert plain.rsplit(".", 1)[0] == reference


def test_signed_tokens_carry_iss_on_both_paths() -> None:
    key = generate_key("ec-p256")
    signer = JwtSigner(key, "k", FakeClock(1_700_000_000), 2_000_000_000, ISSUER)
    sid = SpiffeId.parse("spiffe://example.org/w")
    for extra in (None, {"txn": "t-1"}):
        token = signer.sign(sid, ["a"], 60, extra).token
        claims = pyjwt.decode(token, options={"verify_signature": False})
        assert claims["iss"] == ISSUER
    with pytest.raises(Exception, match="iss"):
        signer.sign(sid, ["a"], 60, {"iss": "https://evil.example"})
    plain = JwtSigner(key, "k", FakeClock(1_700_000_000), 2_000_000_000)
    assert "iss" not in pyjwt.decode(
        plain.sign(sid, ["a"], 60).token, options={"verify_signature": False}
    )


def test_a_fast_path_that_drops_iss_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.ca import signer as signer_module

    real = signer_module._claims_json

    def without_iss(*args: Any, iss: str | None = None, **kwargs: Any) -> str:
        return real(*args, **kwargs)

    monkeypatch.setattr(signer_module, "_claims_json", without_iss)
    key = generate_key("ec-p256")
    assert _EsSigner.checked(key, {"alg": "ES256", "kid": "k", "typ": "JWT"}, ISSUER) is None
    assert _EsSigner.checked(key, {"alg": "ES256", "kid": "k", "typ": "JWT"}) is not None


def test_access_tokens_say_at_jwt_and_need_an_issuer() -> None:
    key = generate_key("ec-p256")
    signer = JwtSigner(key, "k", FakeClock(1_700_000_000), 2_000_000_000, ISSUER)
    issued = signer.mint_access_token(
        "alice", "https://r.example", 120, 1_700_000_000, {"scope": "read"}
    )
    assert pyjwt.get_unverified_header(issued.token)["typ"] == "at+jwt"
    claims = pyjwt.decode(
        issued.token,
        key.public_key(),
        algorithms=["ES256"],
        audience="https://r.example",
        issuer=ISSUER,
        options={"verify_exp": False},
    )
    assert claims["jti"] == issued.jti
    assert claims["scope"] == "read"
    no_issuer = JwtSigner(key, "k", FakeClock(1_700_000_000), 2_000_000_000)
    with pytest.raises(Exception, match="issuer"):
        no_issuer.mint_access_token("alice", "r", 60, 1_700_000_000, {})

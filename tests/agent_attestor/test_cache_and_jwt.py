"""Cache fan-out, JWT cache and the internal JWT validator."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent_attestor import _crypto
from agent_attestor.cache import Cache, SyncState
from agent_attestor.errors import JwtValidationError
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.jwt_validate import validate_jwt
from agent_attestor.model import Entry, Selector
from svid._clock import FakeClock
from svid._errors import SvidParseError
from tests.agent_attestor.pki import FakeSigner, LocalCa

SEL = frozenset({Selector("unix", "uid:1")})


def test_waiters_wake_on_change_and_identical_syncs_do_not_wake() -> None:
    ca = LocalCa(FakeClock(start=time.time()))
    cache = Cache()
    state = SyncState(entries=(), bundle=ca.bundle())

    async def scenario() -> list[int]:
        cache.apply_sync(state)
        v = cache.version
        waiter = asyncio.create_task(cache.wait_change(v))
        await asyncio.sleep(0)
        cache.apply_sync(state)  # same full state: no news
        await asyncio.sleep(0)
        woke_early = waiter.done()
        cache.apply_sync(
            SyncState(entries=(Entry("e", "spiffe://example.org/e", SEL),), bundle=ca.bundle())
        )
        return [int(woke_early), await waiter - v]

    assert asyncio.run(scenario()) == [0, 1]


def test_entry_with_no_selectors_matches_nobody() -> None:
    assert not Entry("e", "spiffe://example.org/e", frozenset()).matches(SEL)


def test_jwt_cache_mints_once_under_concurrency_and_surfaces_errors() -> None:
    clock = FakeClock(start=time.time())
    signer = FakeSigner(LocalCa(clock))
    jwts = JwtCache(signer, clock)

    async def scenario() -> set[str]:
        got = await asyncio.gather(
            *(jwts.get("spiffe://example.org/w", ["a"], "e") for _ in range(20))
        )
        return {j.token for j in got}

    assert len(asyncio.run(scenario())) == 1
    assert signer.jwt_calls == 1
    signer.fail = True
    with pytest.raises(ConnectionError):
        asyncio.run(jwts.get("spiffe://example.org/w", ["b"], "e"))
    assert "token=" not in repr(asyncio.run(jwts.get("spiffe://example.org/w", ["a"], "e")))


def test_jwt_cache_evicts_least_recently_used() -> None:
    clock = FakeClock(start=time.time())
    signer = FakeSigner(LocalCa(clock))
    jwts = JwtCache(signer, clock, max_entries=2)
    for aud in ("a", "b", "c"):
        asyncio.run(jwts.get("spiffe://example.org/w", [aud], "e"))
    assert jwts.cached("spiffe://example.org/w", ["a"]) is None
    assert jwts.cached("spiffe://example.org/w", ["c"]) is not None


def _bundles(ca: LocalCa) -> dict[str, object]:
    return {"example.org": ca.bundle()}


def _token(
    header: dict[str, object], claims: dict[str, object], key: ec.EllipticCurvePrivateKey
) -> str:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    si = (
        _crypto.b64url(json.dumps(header).encode())
        + "."
        + _crypto.b64url(json.dumps(claims).encode())
    )
    r, s = decode_dss_signature(key.sign(si.encode(), ec.ECDSA(hashes.SHA256())))
    return si + "." + _crypto.b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@pytest.mark.parametrize(
    ("header", "claims", "message"),
    [
        ({"alg": "none"}, {}, "algorithm"),
        ({"alg": "HS256"}, {}, "algorithm"),
        ({"alg": "EdDSA"}, {}, "algorithm"),
        ({"alg": "ES256"}, {}, "kid"),
        ({"alg": "ES256", "kid": "K", "typ": "JWS"}, {}, "typ"),
        ({"alg": "ES256", "kid": "K"}, {"sub": "not-an-id"}, "SPIFFE ID"),
        ({"alg": "ES256", "kid": "K"}, {"sub": "spiffe://example.org/w"}, "aud"),
        ({"alg": "ES256", "kid": "K"}, {"sub": "spiffe://example.org/w", "aud": []}, "aud"),
        ({"alg": "ES256", "kid": "K"}, {"sub": "spiffe://example.org/w", "aud": "svc"}, "exp"),
        (
            {"alg": "ES256", "kid": "unknown"},
            {"sub": "spiffe://example.org/w", "aud": "svc", "exp": 1 << 40},
            "no JWT key",
        ),
        (
            {"alg": "ES256", "kid": "K"},
            {"sub": "spiffe://other.org/w", "aud": "svc", "exp": 1 << 40},
            "no bundle",
        ),
        (
            {"alg": "RS256", "kid": "K"},
            {"sub": "spiffe://example.org/w", "aud": "svc", "exp": 1 << 40},
            "signature",
        ),
    ],
)
def test_validator_rejects_with_a_named_reason(header: dict, claims: dict, message: str) -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock, jwt_kid="K")
    token = _token(header, claims, ca.jwt_key)
    with pytest.raises(JwtValidationError, match=message):
        validate_jwt(token, "svc", _bundles(ca), clock.now())  # type: ignore[arg-type]


def test_validator_accepts_a_string_aud_and_rejects_exp_equal_to_now() -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock, jwt_kid="K")
    exp = int(clock.now()) + 10
    token = _token(
        {"alg": "ES256", "kid": "K"},
        {"sub": "spiffe://example.org/w", "aud": "svc", "exp": exp},
        ca.jwt_key,
    )
    assert validate_jwt(token, "svc", _bundles(ca), exp - 1).spiffe_id == "spiffe://example.org/w"  # type: ignore[arg-type]
    with pytest.raises(JwtValidationError, match="expired"):
        validate_jwt(token, "svc", _bundles(ca), exp)  # type: ignore[arg-type]


def test_jwks_leaves_out_keys_it_cannot_express() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from agent_attestor.model import JwtKey

    ed = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    rsa_pub = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    jwks = json.loads(_crypto.jwt_jwks([JwtKey("ed", ed), JwtKey("rsa", rsa_pub)]))
    assert [(k["kid"], k["kty"]) for k in jwks["keys"]] == [("rsa", "RSA")]


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x85\x00", b"\x31\x00", b"\x30\x10abc"])
def test_der_chain_parser_names_the_offset(data: bytes) -> None:
    with pytest.raises(SvidParseError):
        _crypto.parse_der_certs(data)

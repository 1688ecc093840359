"""Cache fan-out, JWT cache, and ValidateJWTSVID's verifier fed from the cache."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent_attestor import _crypto
from agent_attestor import jwt_cache as jwt_cache_module
from agent_attestor.cache import Cache, SyncState
from agent_attestor.jwt_cache import DEFAULT_MAX_BYTES, JwtCache, entry_size, refresh_point
from agent_attestor.jwt_validate import CacheJwtValidator, unverified_claims
from agent_attestor.model import Entry, JwtKey, Selector
from agent_attestor.signer import MintedJwt
from svid._clock import FakeClock
from svid._errors import ExpiredError, RevokedError, VerificationError
from svid._jose import b64url_encode
from svid._spiffe_id import TrustDomain
from svid._verify_jwt import DEFAULT_LEEWAY
from tests.agent_attestor.pki import FakeSigner, LocalCa, SizedSigner

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
            *(jwts.get("spiffe://example.org/w", ["a"], "e", 0) for _ in range(20))
        )
        return {j.token for j in got}

    assert len(asyncio.run(scenario())) == 1
    assert signer.jwt_calls == 1
    signer.fail = True
    with pytest.raises(ConnectionError):
        asyncio.run(jwts.get("spiffe://example.org/w", ["b"], "e", 0))
    assert "token=" not in repr(asyncio.run(jwts.get("spiffe://example.org/w", ["a"], "e", 0)))


def _held_mints() -> tuple[FakeSigner, JwtCache, asyncio.Event]:
    """A JWT cache whose signer holds each mint until the event is set."""
    clock = FakeClock(start=time.time())
    signer = FakeSigner(LocalCa(clock))
    new_jwt = signer.new_jwt
    gate = asyncio.Event()

    async def held_new_jwt(spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        await gate.wait()
        return await new_jwt(spiffe_id, audience, entry_id)

    signer.new_jwt = held_new_jwt  # type: ignore[method-assign]
    return signer, JwtCache(signer, clock), gate


def test_a_caller_gone_while_its_jwt_is_minted_does_not_fail_those_waiting_for_it() -> None:
    # The first caller mints; the others wait for its token. When the first went away (its
    # client's deadline, a hang-up), every waiter got CancelledError: their FetchJWTSVID ended
    # CANCELLED, which clients do not retry, though they had asked for nothing of the kind.
    signer, jwts, gate = _held_mints()

    async def scenario() -> MintedJwt:
        first = asyncio.create_task(jwts.get("spiffe://example.org/w", ["a"], "e", 0))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(jwts.get("spiffe://example.org/w", ["a"], "e", 0))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.wait_for(waiter, 5)

    assert asyncio.run(scenario()).token
    assert signer.jwt_calls == 1


def test_a_token_minted_while_its_identity_is_forgotten_is_not_kept() -> None:
    # EndTask forgets a task's tokens while a mint for it may be out at the server. The token
    # that came back was cached after the forget (and later callers waited for it), so it was
    # served after the task's end until the task's entry left the agent.
    signer, jwts, gate = _held_mints()
    sid = "spiffe://example.org/bot/task/t1"

    async def scenario() -> tuple[MintedJwt, MintedJwt]:
        minting = asyncio.create_task(jwts.get(sid, ["a"], "e", 0))
        await asyncio.sleep(0)
        generation = jwts.generation
        jwts.forget({sid})
        assert jwts.generation > generation  # answers built from it are dropped too
        later = asyncio.create_task(jwts.get(sid, ["a"], "e", 0))
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.wait_for(minting, 5), await asyncio.wait_for(later, 5)

    before, after = asyncio.run(scenario())
    assert before.token != after.token
    assert signer.jwt_calls == 2
    assert jwts.cached(sid, ["a"], "e") == after
    jwts.forget({sid})
    assert jwts.cached(sid, ["a"], "e") is None


def test_a_token_minted_while_its_entry_is_forgotten_is_not_kept() -> None:
    # As for an identity: an entry changed in place (its jwt_svid_ttl cut) while a mint under
    # it was out may get back a token of the old TTL, which must not be served afterwards.
    signer, jwts, gate = _held_mints()
    sid = "spiffe://example.org/w"

    async def scenario() -> MintedJwt:
        minting = asyncio.create_task(jwts.get(sid, ["a"], "e", 0))
        other = asyncio.create_task(jwts.get(sid, ["a"], "f", 0))
        await asyncio.sleep(0)
        generation = jwts.generation
        jwts.forget_entries({"e"})
        assert jwts.generation > generation  # answers built from it are dropped too
        gate.set()
        await asyncio.wait_for(other, 5)
        return await asyncio.wait_for(minting, 5)

    assert asyncio.run(scenario()).token  # handed to the caller that asked before the forget
    assert signer.jwt_calls == 2
    assert jwts.cached(sid, ["a"], "e") is None
    assert jwts.cached(sid, ["a"], "f") is not None  # another entry of the ID is left alone
    jwts.forget_entries({"f"})
    assert jwts.cached(sid, ["a"], "f") is None
    assert len(jwts) == 0


def test_a_token_is_refreshed_half_its_life_after_the_ask_by_the_agent_clock() -> None:
    # The server's iat/exp (its clock, 1000 s ahead here) give only the lifetime; an issued_at
    # after expires_at (no positive lifetime) is never handed out again.
    assert refresh_point(MintedJwt("t", issued_at=1000, expires_at=1300), asked_at=0) == 150
    assert refresh_point(MintedJwt("t", issued_at=1600, expires_at=1300), asked_at=0) == 0


class _SlowSigner(FakeSigner):
    """Its answer comes back `delay` seconds (of the agent's clock) after the server minted."""

    def __init__(self, ca: LocalCa, clock: FakeClock, delay: float) -> None:
        super().__init__(ca)
        self.clock, self.delay = clock, delay

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        minted = await super().new_jwt(spiffe_id, audience, entry_id)
        self.clock.advance(self.delay)
        return minted


def test_a_tokens_half_life_is_counted_from_the_ask_not_the_answer() -> None:
    # The server's iat is no earlier than the ask: counted from the answer, a slow one would
    # keep the token past its true half life (and, slower still, past its exp).
    clock = FakeClock(start=time.time())
    jwts = JwtCache(_SlowSigner(LocalCa(clock), clock, delay=100), clock)
    sid = "spiffe://example.org/w"
    asyncio.run(jwts.get(sid, ["a"], "e", 0))
    clock.advance(49)
    assert jwts.cached(sid, ["a"], "e") is not None
    clock.advance(1)  # 150 s after the ask: half the 300 s token's life
    assert jwts.cached(sid, ["a"], "e") is None


def test_jwt_cache_evicts_least_recently_used() -> None:
    clock = FakeClock(start=time.time())
    signer = FakeSigner(LocalCa(clock))
    jwts = JwtCache(signer, clock, max_entries=2)
    for aud in ("a", "b", "c"):
        asyncio.run(jwts.get("spiffe://example.org/w", [aud], "e", 0))
    assert jwts.cached("spiffe://example.org/w", ["a"], "e") is None
    assert jwts.cached("spiffe://example.org/w", ["c"], "e") is not None


def test_jwt_cache_counts_bytes_and_evicts_least_recently_used_to_stay_in_budget() -> None:
    signer = SizedSigner(10_000)
    sid = "spiffe://example.org/w"
    one = entry_size(JwtCache.key(sid, ["a"], "e"), MintedJwt("x" * 10_000, 0, 1))
    jwts = JwtCache(signer, FakeClock(start=0), max_bytes=3 * one)

    def get(aud: str) -> MintedJwt:
        return asyncio.run(jwts.get(sid, [aud], "e", 0))

    for aud in ("a", "b", "c"):
        get(aud)
    assert (len(jwts), jwts.bytes) == (3, 3 * one)
    get("a")  # a hit: "a" becomes the most recently used
    get("d")
    assert jwts.cached(sid, ["b"], "e") is None  # the least recently used went
    assert all(jwts.cached(sid, [aud], "e") is not None for aud in ("a", "c", "d"))
    assert (len(jwts), jwts.bytes) == (3, 3 * one)
    jwts.forget({sid})
    assert (len(jwts), jwts.bytes) == (0, 0)
    signer.size = 4 * one  # bigger than the whole budget: handed out, never kept
    assert len(get("e").token) == 4 * one
    assert (len(jwts), jwts.bytes) == (0, 0)


def test_jwt_cache_memory_stays_near_its_default_byte_budget() -> None:
    # Issue 11: big tokens grew the agent by 727 MB while the cache was capped by count alone.
    signer = SizedSigner(64 * 1024)
    jwts = JwtCache(signer, FakeClock(start=0))
    # Only blocks allocated directly by the cache or this file's signer count: threads other
    # tests left running, and event-loop buffers, allocate too and are not what is measured.
    mine = [
        tracemalloc.Filter(True, jwt_cache_module.__file__),
        tracemalloc.Filter(True, __file__),
    ]

    def traced() -> int:
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(mine)
        return sum(stat.size for stat in snapshot.statistics("filename"))

    tracemalloc.start(25)
    try:
        before = traced()
        for i in range(400):  # 25 MB of tokens offered
            asyncio.run(jwts.get("spiffe://example.org/w", [f"aud-{i}"], "e", 0))
        held = traced() - before
    finally:
        tracemalloc.stop()
    assert jwts.bytes <= DEFAULT_MAX_BYTES == 16 * 1024 * 1024
    assert held <= DEFAULT_MAX_BYTES * 1.1


def _validator(ca: LocalCa, clock: FakeClock) -> tuple[Cache, CacheJwtValidator]:
    cache = Cache()
    cache.apply_sync(SyncState(entries=(), bundle=ca.bundle()))
    return cache, CacheJwtValidator(cache, clock)


def _token(
    header: dict[str, object], claims: dict[str, object], key: ec.EllipticCurvePrivateKey
) -> str:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    si = (
        b64url_encode(json.dumps(header).encode())
        + "."
        + b64url_encode(json.dumps(claims).encode())
    )
    r, s = decode_dss_signature(key.sign(si.encode(), ec.ECDSA(hashes.SHA256())))
    return si + "." + b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@pytest.mark.parametrize(
    ("header", "claims", "message"),
    [
        ({"alg": "none"}, {}, "alg"),
        ({"alg": "HS256"}, {}, "alg"),
        ({"alg": "EdDSA"}, {}, "alg"),
        ({"alg": "ES256"}, {}, "kid"),
        ({"alg": "ES256", "kid": "K", "typ": "JWS"}, {}, "typ"),
        ({"alg": "ES256", "kid": "K"}, {"sub": "not-an-id"}, "SPIFFE ID"),
        ({"alg": "ES256", "kid": "K"}, {"sub": "spiffe://example.org/w"}, "aud"),
        ({"alg": "ES256", "kid": "K"}, {"sub": "spiffe://example.org/w", "aud": []}, "aud"),
        ({"alg": "ES256", "kid": "K"}, {"sub": "spiffe://example.org/w", "aud": "svc"}, "exp"),
        (
            {"alg": "ES256", "kid": "unknown"},
            {"sub": "spiffe://example.org/w", "aud": "svc", "exp": 1 << 40},
            "no JWT authority with kid 'unknown'",
        ),
        (
            {"alg": "ES256", "kid": "K"},
            {"sub": "spiffe://other.org/w", "aud": "svc", "exp": 1 << 40},
            "no JWT bundle for trust domain other.org",
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
    _, validator = _validator(ca, clock)
    token = _token(header, claims, ca.jwt_key)
    with pytest.raises(VerificationError, match=message) as err:
        validator.validate(token, "svc")
    assert token not in str(err.value)


def test_validator_accepts_a_string_aud_until_exp_plus_leeway() -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock, jwt_kid="K")
    _, validator = _validator(ca, clock)
    exp = int(clock.now()) + 10
    token = _token(
        {"alg": "ES256", "kid": "K"},
        {"sub": "spiffe://example.org/w", "aud": "svc", "exp": exp},
        ca.jwt_key,
    )
    result = validator.validate(token, "svc")
    assert (str(result.spiffe_id), result.audience) == ("spiffe://example.org/w", ("svc",))
    clock.set(exp + DEFAULT_LEEWAY)
    assert validator.validate(token, "svc").expires_at == exp
    clock.set(exp + DEFAULT_LEEWAY + 1)
    with pytest.raises(ExpiredError, match="expired"):
        validator.validate(token, "svc")


def test_validator_refuses_a_jti_once_the_cache_lists_it_revoked() -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    cache, validator = _validator(ca, clock)
    minted = ca.mint_jwt("spiffe://example.org/task/1", ["docs"])
    jti = str(unverified_claims(minted.token)["jti"])
    assert validator.validate(minted.token, "docs").claims["jti"] == jti  # now in its cache
    cache.apply_sync(
        SyncState(
            entries=(),
            bundle=ca.bundle(),
            revoked_jtis=frozenset({jti}),
            revocation_expiry={("jwt_id", jti): int(minted.expires_at)},
        )
    )
    with pytest.raises(RevokedError, match=jti):
        validator.validate(minted.token, "docs")
    other = ca.mint_jwt("spiffe://example.org/task/2", ["docs"])
    assert str(validator.validate(other.token, "docs").spiffe_id) == "spiffe://example.org/task/2"


def test_bundle_conversion_is_stable_while_keys_are_and_follows_rotation() -> None:
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    cache, validator = _validator(ca, clock)
    td = TrustDomain("example.org")
    first = validator.bundles(td)
    assert first is not None
    assert first.get(ca.jwt_kid) is not None
    old = ca.mint_jwt("spiffe://example.org/w", ["svc"])
    validator.validate(old.token, "svc")
    # An equal bundle from a new sync message: the same object, so cached answers stay usable.
    cache.apply_sync(
        SyncState(entries=(Entry("e", "spiffe://example.org/e", SEL),), bundle=ca.bundle())
    )
    assert validator.bundles(td) is first
    # The JWT key is rotated out: tokens it signed are refused, cached or not.
    ca.jwt_key = ec.generate_private_key(ec.SECP256R1())
    ca.jwt_kid = "rotated"
    cache.apply_sync(SyncState(entries=(), bundle=ca.bundle()))
    assert validator.bundles(td) is not first
    with pytest.raises(VerificationError, match="no JWT authority"):
        validator.validate(old.token, "svc")
    assert validator.bundles(TrustDomain("other.org")) is None


def test_unverified_claims_reads_claims_of_any_compact_jws_and_nothing_else() -> None:
    token = _token(
        {"alg": "none"}, {"sub": "x", "jti": "j"}, ec.generate_private_key(ec.SECP256R1())
    )
    assert unverified_claims(token) == {"sub": "x", "jti": "j"}
    assert unverified_claims("not-a-token") == {}
    assert unverified_claims("a.b") == {}


def test_jwks_leaves_out_keys_it_cannot_express() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from agent_attestor.model import TrustBundle

    def spki(key: object) -> bytes:
        return key.public_key().public_bytes(  # type: ignore[attr-defined,no-any-return]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    keys = (
        JwtKey("ed", spki(ed25519.Ed25519PrivateKey.generate())),
        JwtKey("k1", spki(ec.generate_private_key(ec.SECP256K1()))),
        JwtKey("junk", b"not DER"),
        JwtKey("rsa", spki(rsa.generate_private_key(65537, 2048))),
        JwtKey("rsa", spki(ec.generate_private_key(ec.SECP256R1()))),  # a repeated kid
    )
    jwks = json.loads(_crypto.jwt_bundle(TrustBundle("example.org", jwt_keys=keys)).to_jwks())
    assert [(k["kid"], k["kty"], k["use"]) for k in jwks["keys"]] == [("rsa", "RSA", "jwt-svid")]

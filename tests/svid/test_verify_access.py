"""AccessTokenVerifier: svidd's RFC 9068 access tokens and Txn-Tokens, refused as JWT-SVIDs and
JWT-SVIDs refused as them; typ, iss, aud, times, revocation, and the cache."""

from __future__ import annotations

from typing import Any

import pytest

from server.ca.signer import JwtSigner
from svid import (
    MAX_CLOCK_SKEW,
    AccessTokenVerifier,
    ExpiredError,
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    RevocationSet,
    Revoked,
    RevokedError,
    SpiffeBundle,
    SpiffeId,
    TrustDomain,
    VerificationError,
    sign_jws,
)
from tests.svid.certs import T0, ec_key

TD = TrustDomain("example.org")
KEY = ec_key()
OTHER_KEY = ec_key()
ISSUER = "https://svidd.example.org"
RESOURCE = "https://tickets.example.org/mcp"
TASK = "spiffe://example.org/agents/bot/task/t1"


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user:alice",
        "aud": RESOURCE,
        "exp": int(T0) + 300,
        "iat": int(T0),
        "jti": "j1",
        "client_id": "spiffe://example.org/agents/bot",
        "scope": "read tool:read_ticket",
        "act": {"sub": TASK},
        "txn": "t1",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def token(typ: str = "at+jwt", key: Any = KEY, kid: str = "k1", **over: Any) -> str:
    return sign_jws({"kid": kid, "typ": typ}, claims(**over), key)


@pytest.fixture
def source() -> MemoryBundleSource:
    return MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": KEY.public_key()}))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def revocations() -> RevocationSet:
    return RevocationSet()


@pytest.fixture
def verifier(
    source: MemoryBundleSource, clock: FakeClock, revocations: RevocationSet
) -> AccessTokenVerifier:
    return AccessTokenVerifier(
        source.jwt_bundle_for,
        issuer=ISSUER,
        audience=RESOURCE,
        trust_domain=TD,
        clock=clock,
        revocations=revocations,
    )


def test_accepts_an_access_token_with_typed_claims(verifier: AccessTokenVerifier) -> None:
    result = verifier.verify(token())
    assert result.token_type == "at+jwt"
    assert result.subject == "user:alice"
    assert result.issuer == ISSUER
    assert result.act_chain == (TASK,)
    assert result.delegated
    assert result.scopes == {"read", "tool:read_ticket"}
    assert result.grants_tool("read_ticket")
    assert not result.grants_tool("export_customer_data")
    assert result.task_id == "t1"
    assert result.client_id == "spiffe://example.org/agents/bot"
    assert result.jti == "j1"


def test_invoke_tool_grants_every_tool_as_in_a_task_token(verifier: AccessTokenVerifier) -> None:
    # TaskClaims.grants_tool says yes for the task's own JWT-SVID of the same scope: the token
    # exchanged for it said no, so a tool asking the token refused what the task was granted.
    result = verifier.verify(token(scope="read invoke_tool"))
    assert result.grants_tool("export_customer_data")
    assert result.tools == frozenset()  # none by name


def test_invoke_tool_in_a_txn_token_grants_no_tool_of_every_service(
    verifier: AccessTokenVerifier,
) -> None:
    """A Txn-Token is for the whole trust domain (its aud); the task decision it carries was
    made for one resource (tctx.resource), and its invoke_tool means every tool of that one.
    Read as every tool, any service of the trust domain checking grants_tool ran any tool."""
    txn = token(
        typ="txntoken+jwt",
        aud=TD.name,
        scope="read invoke_tool",
        tctx={"resource": "https://other.example.org/api"},
    )
    result = verifier.verify_txn_token(txn)
    assert not result.grants_tool("export_customer_data")
    assert not result.grants_tool("export_customer_data", resource="https://other.example.org/api")
    # An access token's aud is its resource (checked by verify): there it is every tool.
    assert verifier.verify(token(scope="read invoke_tool")).grants_tool("export_customer_data")


def txn_token(**over: Any) -> str:
    """A Txn-Token as the token endpoint mints one: for the trust domain, its decision made
    for RESOURCE (tctx.resource)."""
    return token(**{"typ": "txntoken+jwt", "aud": TD.name, "tctx": {"resource": RESOURCE}, **over})


def test_a_txn_token_grants_its_tool_at_the_resource_it_was_decided_for(
    verifier: AccessTokenVerifier,
) -> None:
    result = verifier.verify_txn_token(txn_token())
    assert result.txn_resource == RESOURCE
    assert result.grants_tool("read_ticket", resource=RESOURCE)
    assert not result.grants_tool("export_customer_data", resource=RESOURCE)


def test_a_txn_token_grants_no_tool_at_another_resource_or_none_named(
    verifier: AccessTokenVerifier,
) -> None:
    """Its aud is every service of the trust domain: the tickets server's read_ticket was no
    grant of an unrelated server's tool of the same name, nor of a caller naming no resource."""
    result = verifier.verify_txn_token(txn_token())
    assert not result.grants_tool("read_ticket", resource="https://other.example.org/mcp")
    assert not result.grants_tool("read_ticket", resource=RESOURCE + "/")  # exact match only
    assert not result.grants_tool("read_ticket")


@pytest.mark.parametrize(
    "tctx", [None, {}, {"resource": ""}, {"resource": [RESOURCE]}, [RESOURCE]], ids=repr
)
def test_a_txn_token_naming_no_resource_grants_no_tool(
    verifier: AccessTokenVerifier, tctx: Any
) -> None:
    result = verifier.verify_txn_token(txn_token(tctx=tctx))
    assert result.txn_resource is None
    assert not result.grants_tool("read_ticket", resource=RESOURCE)


def test_an_access_token_grants_its_tools_whatever_resource_is_named(
    verifier: AccessTokenVerifier,
) -> None:
    """Its aud is its resource, which verify checked: the tool grant stays as it was."""
    result = verifier.verify(token(tctx={"resource": "https://other.example.org/mcp"}))
    assert result.txn_resource is None
    assert result.grants_tool("read_ticket")
    assert result.grants_tool("read_ticket", resource="https://other.example.org/api")
    assert not result.grants_tool("export_customer_data", resource=RESOURCE)


def test_a_txn_token_grants_its_actions_at_the_resource_it_was_decided_for_only(
    verifier: AccessTokenVerifier,
) -> None:
    """Its actions are the same decision as its tools, made for tctx.resource: a service of
    the trust domain asking for `read` at another resource (or naming none) is not granted a
    read decided for the tickets server."""
    result = verifier.verify_txn_token(txn_token(scope="read invoke_tool tool:read_ticket"))
    assert result.allows("read", resource=RESOURCE)
    assert result.allows("invoke_tool", resource=RESOURCE)
    assert not result.allows("write", resource=RESOURCE)
    assert not result.allows("read", resource="https://other.example.org/api")
    assert not result.allows("read", resource=RESOURCE + "/")  # exact match only
    assert not result.allows("read")
    assert not verifier.verify_txn_token(txn_token(tctx={})).allows("read", resource=RESOURCE)


def test_an_access_token_allows_its_actions_whatever_resource_is_named(
    verifier: AccessTokenVerifier,
) -> None:
    result = verifier.verify(token())
    assert result.allows("read")
    assert result.allows("read", resource="https://other.example.org/api")
    assert not result.allows("write")


@pytest.mark.parametrize("asked", ["tool:read_ticket", "tool:", "", "read tool:read_ticket"])
def test_allows_reads_no_tool_and_nothing_but_one_action_as_task_claims(
    verifier: AccessTokenVerifier, asked: str
) -> None:
    """A tool's scope-token is no action: TaskClaims.allows says no to it whatever the scope
    (grants_tool answers for tools), and so does this, for either kind of token."""
    scope = "read tool:read_ticket tool:"
    assert not verifier.verify(token(scope=scope)).allows(asked)
    txn = verifier.verify_txn_token(txn_token(scope=scope))
    assert not txn.allows(asked, resource=RESOURCE)


def test_accepts_what_the_servers_signer_mints(
    verifier: AccessTokenVerifier, clock: FakeClock
) -> None:
    signer = JwtSigner(KEY, "k1", clock, int(T0) + 3600, issuer=ISSUER)
    extra = {"client_id": "c", "scope": "read", "act": {"sub": TASK}, "txn": "t1"}
    issued = signer.mint_access_token("user:alice", RESOURCE, 300, int(T0), extra)
    assert verifier.verify(issued.token).jti == issued.jti
    txn = signer.mint_access_token("user:alice", TD.name, 300, int(T0), extra, typ="txntoken+jwt")
    assert verifier.verify_txn_token(txn.token).task_id == "t1"


def test_a_token_without_act_is_not_delegated(verifier: AccessTokenVerifier) -> None:
    """A workload's own token (JWT bearer): its `sub` is the workload that authenticated."""
    result = verifier.verify(token(sub="spiffe://example.org/billing", act=None, txn=None))
    assert result.act_chain == ()
    assert not result.delegated


def test_media_type_forms_of_typ_are_accepted(verifier: AccessTokenVerifier) -> None:
    assert verifier.verify(token(typ="application/at+JWT")).token_type == "at+jwt"


@pytest.mark.parametrize("typ", ["JWT", "JOSE", "txntoken+jwt", "at+jwt+x"])
def test_a_token_of_another_typ_is_refused(verifier: AccessTokenVerifier, typ: str) -> None:
    with pytest.raises(VerificationError, match="typ"):
        verifier.verify(token(typ=typ, aud=[RESOURCE, TD.name]))


def test_a_jwt_svid_is_not_an_access_token(verifier: AccessTokenVerifier) -> None:
    svid_token = sign_jws(
        {"kid": "k1", "typ": "JWT"},
        {"sub": TASK, "aud": [RESOURCE], "exp": int(T0) + 300, "iat": int(T0), "jti": "s1"},
        KEY,
    )
    no_typ = sign_jws({"kid": "k1"}, claims(), KEY)
    with pytest.raises(VerificationError, match="typ"):
        verifier.verify(svid_token)
    with pytest.raises(VerificationError, match="typ"):
        verifier.verify(no_typ)


def test_an_access_token_is_not_a_jwt_svid(source: MemoryBundleSource, clock: FakeClock) -> None:
    jwt_svids = JwtVerifier(source.jwt_bundle_for, clock=clock)
    spiffe_sub = token(sub=TASK)  # even with a SPIFFE ID as its subject
    with pytest.raises(VerificationError, match="typ"):
        jwt_svids.verify(spiffe_sub, RESOURCE)


def test_wrong_issuer_is_refused(verifier: AccessTokenVerifier) -> None:
    with pytest.raises(VerificationError, match="issuer"):
        verifier.verify(token(iss="https://evil.example.org"))


def test_wrong_audience_is_refused(verifier: AccessTokenVerifier) -> None:
    with pytest.raises(VerificationError, match="audience"):
        verifier.verify(token(aud="https://other.example.org/mcp"))


def test_a_txn_token_needs_the_trust_domain_as_audience(verifier: AccessTokenVerifier) -> None:
    good = token(typ="txntoken+jwt", aud=TD.name, client_id=None)
    assert verifier.verify_txn_token(good).token_type == "txntoken+jwt"
    with pytest.raises(VerificationError, match="audience"):
        verifier.verify_txn_token(token(typ="txntoken+jwt", aud=RESOURCE))
    with pytest.raises(VerificationError, match="typ"):
        verifier.verify(good)
    with pytest.raises(VerificationError, match="typ"):  # and an access token is no Txn-Token
        verifier.verify_txn_token(token(aud=TD.name))


def test_expiry_with_leeway(verifier: AccessTokenVerifier, clock: FakeClock) -> None:
    t = token()
    clock.advance(300 + 5)
    assert verifier.verify(t).subject == "user:alice"
    clock.advance(1)
    with pytest.raises(ExpiredError):
        verifier.verify(t)


def test_not_yet_valid_is_refused(verifier: AccessTokenVerifier) -> None:
    # MAX_CLOCK_SKEW ahead is taken (an issuer whose clock runs ahead), a second more is not.
    with pytest.raises(ExpiredError, match="nbf"):
        verifier.verify(token(nbf=int(T0 + MAX_CLOCK_SKEW) + 1))
    with pytest.raises(ExpiredError, match="iat"):
        verifier.verify(token(iat=int(T0 + MAX_CLOCK_SKEW) + 1))
    assert verifier.verify(token(iat=int(T0 + MAX_CLOCK_SKEW), nbf=int(T0 + MAX_CLOCK_SKEW)))


def test_a_revoked_jti_is_refused_even_when_cached(
    verifier: AccessTokenVerifier, revocations: RevocationSet
) -> None:
    t = token()
    verifier.verify(t)
    assert len(verifier.cache) == 1
    revocations.add([Revoked("jwt_id", "j1", T0 + 300)])
    with pytest.raises(RevokedError):
        verifier.verify(t)


def test_a_signature_by_another_key_is_refused(verifier: AccessTokenVerifier) -> None:
    with pytest.raises(VerificationError, match="signature"):
        verifier.verify(token(key=OTHER_KEY))
    with pytest.raises(VerificationError, match="kid"):
        verifier.verify(token(kid="nope"))


@pytest.mark.parametrize(
    ("over", "what"),
    [
        ({"jti": None}, "jti"),
        ({"client_id": None}, "client_id"),
        ({"iat": None}, "iat"),
        ({"exp": "soon"}, "exp"),
        ({"sub": ""}, "sub"),
        ({"scope": ["read"]}, "scope"),
        ({"act": {"who": "x"}}, "act"),
        ({"aud": []}, "aud"),
    ],
)
def test_malformed_claims_are_named(
    verifier: AccessTokenVerifier, over: dict[str, Any], what: str
) -> None:
    with pytest.raises(VerificationError, match=what):
        verifier.verify(token(**over))


def test_a_bundle_change_drops_the_cached_answer(
    source: MemoryBundleSource, verifier: AccessTokenVerifier
) -> None:
    t = token()
    verifier.verify(t)
    source.update(SpiffeBundle(TD, (), {"k2": OTHER_KEY.public_key()}))
    with pytest.raises(VerificationError, match="kid"):
        verifier.verify(t)


def test_tokens_are_never_in_errors(verifier: AccessTokenVerifier) -> None:
    t = token(iss="https://evil.example.org")
    with pytest.raises(VerificationError) as caught:
        verifier.verify(t)
    assert t.split(".")[1] not in str(caught.value)
    assert SpiffeId.parse(TASK)  # the fixture's task ID is a real SPIFFE ID


def test_the_mcp_token_verifier_hands_the_sdk_the_verified_token(
    verifier: AccessTokenVerifier,
) -> None:
    import asyncio

    from svid.mcp import AccessTokenAuth

    class Source:  # the one method AccessTokenAuth asks of a Workload API source
        def access_token_verifier(self, issuer: str, resource: str) -> AccessTokenVerifier:
            assert (issuer, resource) == (ISSUER, RESOURCE)
            return verifier

    auth = AccessTokenAuth(Source(), issuer=ISSUER, resource=RESOURCE)  # type: ignore[arg-type]
    got = asyncio.run(auth.verify_token(token()))
    assert got is not None
    assert got.subject == "user:alice"
    assert set(got.scopes) == {"read", "tool:read_ticket"}
    assert got.claims == {"iss": ISSUER, "act": {"sub": TASK}, "txn": "t1"}
    # A tool tells a principal a task acts for from a workload that authenticated itself.
    assert got.delegated
    assert got.act_chain == (TASK,)
    own = asyncio.run(auth.verify_token(token(sub="spiffe://example.org/billing", act=None)))
    assert own is not None
    assert not own.delegated
    assert own.subject == "spiffe://example.org/billing"
    # A tool that logs what get_access_token() returns logs no bearer token.
    assert got.token.split(".")[2] not in repr(got) + str(got)
    assert asyncio.run(auth.verify_token(token(aud="https://other.example.org"))) is None
    assert asyncio.run(auth.verify_token(token(typ="JWT"))) is None
    assert str(auth.settings.issuer_url).rstrip("/") == ISSUER

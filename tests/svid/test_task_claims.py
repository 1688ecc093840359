"""TaskClaims from verified JWT-SVIDs: the claim schema of docs/claims.md, read strictly."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from svid import (
    FakeClock,
    JwtSvid,
    JwtVerifier,
    MemoryBundleSource,
    SpiffeBundle,
    SpiffeId,
    TaskClaimsError,
    TrustDomain,
    VerificationError,
    sign_jws,
    task_claims,
    tool_scope,
)
from svid.tasks import tools_from_scope
from tests.svid.certs import T0, ec_key

TD = TrustDomain("example.org")
KEY = ec_key()
RUNTIME = "spiffe://example.org/agents/research-bot"
TASK = f"{RUNTIME}/task/0123abcd"
PARENT = f"{RUNTIME}/task/99ff"


def sign(key: ec.EllipticCurvePrivateKey = KEY, **over: Any) -> str:
    claims: dict[str, Any] = {
        "sub": TASK,
        "aud": ["mcp-tickets"],
        "exp": int(T0) + 300,
        "iat": int(T0),
        "jti": "j1",
        "txn": "0123abcd",
        "scope": "read tool:read_ticket",
        "tctx": {"classification": "internal", "environment": "prod", "resources": ["docs"]},
        "obo": "user:alice",
        "act": {"sub": TASK, "act": {"sub": PARENT}},
        "parent_txn": "99ff",
    }
    claims.update(over)
    return sign_jws(
        {"kid": "k1", "typ": "JWT"}, {k: v for k, v in claims.items() if v is not None}, key
    )


@pytest.fixture
def verifier() -> JwtVerifier:
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": KEY.public_key()}))
    return JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0))


def test_a_verified_task_token_gives_typed_task_claims(verifier: JwtVerifier) -> None:
    verified = verifier.verify(sign(), "mcp-tickets")
    assert verified.is_task
    task = verified.task
    assert task is not None
    assert task.is_task
    assert task.spiffe_id == SpiffeId.parse(TASK)
    assert task.runtime_id == SpiffeId.parse(RUNTIME)
    assert task.task_id == "0123abcd"
    assert task.scope == ("read", "tool:read_ticket")
    assert task.actions == frozenset({"read"})
    assert task.tools == frozenset({"read_ticket"})
    assert task.on_behalf_of == "user:alice"
    assert task.delegation_chain == (TASK, PARENT)
    assert task.parent_task_id == "99ff"
    assert (task.classification, task.environment, task.resources) == (
        "internal",
        "prod",
        ("docs",),
    )
    assert not task.elevated


def test_tool_grants_are_per_tool_and_per_audience(verifier: JwtVerifier) -> None:
    task = verifier.verify(sign(), "mcp-tickets").task
    assert task is not None
    assert task.grants_tool("read_ticket", audience="mcp-tickets")
    assert not task.grants_tool("read_ticket", audience="mcp-billing")
    assert not task.grants_tool("export_customer_data", audience="mcp-tickets")
    assert task.required_scope("export_customer_data") == "tool:export_customer_data"
    assert task.required_scope("read_ticket") == ""
    assert task.allows("read", audience="mcp-tickets")
    assert not task.allows("write")
    # invoke_tool is every tool of the audience.
    every = verifier.verify(sign(scope="invoke_tool"), "mcp-tickets").task
    assert every is not None
    assert every.grants_tool("export_customer_data", audience="mcp-tickets")


def test_a_workload_token_is_not_a_task_token(verifier: JwtVerifier) -> None:
    plain = sign(sub=RUNTIME, txn=None, scope=None, tctx=None, obo=None, act=None, parent_txn=None)
    verified = verifier.verify(plain, "mcp-tickets")
    assert not verified.is_task
    assert verified.task is None
    # The same reading for a token the agent handed out (not verified here).
    assert task_claims(JwtSvid.parse_insecure(plain)) is None
    root = task_claims(JwtSvid.parse_insecure(sign(act=None, parent_txn=None, obo=None)))
    assert root is not None
    assert root.delegation_chain == ()
    assert root.on_behalf_of is None
    assert root.parent_task_id is None


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"txn": "other"}, "is not a task ID for txn"),
        ({"txn": ""}, "'txn'"),
        ({"txn": 7}, "'txn'"),
        ({"sub": "spiffe://example.org/task/0123abcd"}, "is not a task ID"),
        ({"scope": ["read"]}, "'scope'"),
        ({"tctx": "internal"}, "'tctx'"),
        ({"tctx": {"resources": "docs"}}, "tctx.resources"),
        ({"tctx": {"elevated": "yes"}}, "tctx.elevated"),
        ({"obo": {"sub": "user:alice"}}, "'obo'"),
        ({"act": {"sub": "user:alice", "act": "x"}}, "actor chain"),
        ({"act": {"act": {"sub": TASK}}}, "actor chain"),
        ({"parent_txn": ""}, "'parent_txn'"),
    ],
)
def test_malformed_task_claims_fail_closed(
    verifier: JwtVerifier, over: dict[str, Any], needle: str
) -> None:
    verified = verifier.verify(sign(**over), "mcp-tickets")
    with pytest.raises(TaskClaimsError, match=needle) as err:
        _ = verified.task
    assert isinstance(err.value, VerificationError)  # a handler's 401 path catches it


def test_a_deep_actor_chain_is_refused(verifier: JwtVerifier) -> None:
    act: dict[str, Any] = {"sub": TASK}
    for _ in range(40):
        act = {"sub": PARENT, "act": act}
    with pytest.raises(TaskClaimsError, match="deeper"):
        _ = verifier.verify(sign(act=act), "mcp-tickets").task


def test_scope_strings_for_insufficient_scope_answers() -> None:
    assert tool_scope("export_customer_data") == "tool:export_customer_data"
    assert tools_from_scope("read tool:a tool: tool:b") == ("a", "b")
    with pytest.raises(ValueError, match="whitespace"):
        tool_scope("two words")

"""The task client's pure parts: the request built from an intent, and JWT refresh timing."""

from __future__ import annotations

import pytest

from svid import JwtSvid, sign_jws
from svid._task_model import begin_request, fresh, tool_refs
from tests.svid.certs import T0, ec_key

KEY = ec_key()


def jwt(iat: int | None, exp: int) -> JwtSvid:
    claims = {"sub": "spiffe://example.org/w/task/t1", "aud": "a", "exp": exp}
    if iat is not None:
        claims["iat"] = iat
    return JwtSvid.parse_insecure(sign_jws({"kid": "k", "typ": "JWT"}, claims, KEY))


def test_a_cached_task_jwt_is_refreshed_once_half_its_lifetime_has_passed() -> None:
    token = jwt(int(T0), int(T0) + 300)
    assert fresh(token, T0, T0 + 149.9)
    assert not fresh(token, T0, T0 + 150)
    # Without iat, from when it was fetched.
    untimed = jwt(None, int(T0) + 60)
    assert fresh(untimed, T0, T0 + 29)
    assert not fresh(untimed, T0, T0 + 30)


def test_a_cached_task_jwt_is_never_handed_out_at_or_past_its_exp() -> None:
    # An iat after exp (a bad issuer clock) put "half its lifetime" past the exp itself.
    skewed = jwt(int(T0) + 600, int(T0) + 300)
    assert not fresh(skewed, T0, T0 + 300)
    assert not fresh(skewed, T0, T0 + 400)


def test_tools_as_a_mapping_or_as_refs() -> None:
    assert tool_refs({"mcp-a": ["read", "list"], "mcp-b": ()}) == ["mcp-a#read", "mcp-a#list"]
    assert tool_refs(["mcp-a#read"]) == ["mcp-a#read"]
    with pytest.raises(TypeError, match="not a string"):
        tool_refs("mcp-a#read")
    with pytest.raises(TypeError, match="list of tool names"):
        tool_refs({"mcp-a": "read"})


def test_begin_request_carries_the_whole_intent() -> None:
    request = begin_request(
        actions=["read"],
        resources=["docs"],
        tools={"mcp-a": ["read_ticket"]},
        classification="confidential",
        environment="prod",
        on_behalf_of="user:alice",
        goal="why",
        ttl=60,
        spiffe_id=None,
        parent_task_id="p1",
        elevate=True,
    )
    assert list(request.intent.tools) == ["mcp-a#read_ticket"]
    assert request.elevate
    assert request.parent_task_id == "p1"
    assert request.spiffe_id == ""
    with pytest.raises(TypeError, match="actions must be a list"):
        begin_request(
            actions="read",
            resources=["docs"],
            tools=(),
            classification="",
            environment="",
            on_behalf_of="",
            goal="",
            ttl=0,
            spiffe_id=None,
        )

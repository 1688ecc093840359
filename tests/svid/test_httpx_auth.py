"""svid.httpx.JwtAuth with real httpx clients against svid.asgi behind uvicorn, and the core
import staying free of every adapter's dependencies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import httpx
import pytest

import svid.asgi
import svid.httpx
from tests.svid.adapter_world import AUDIENCE, RevokingSource, serving, task_token


async def whoami(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":  # uvicorn then runs without one
        raise RuntimeError("no lifespan")
    caller = svid.asgi.caller_of(scope)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(caller.task_id).encode()})


class AsyncTaskLike:
    """What JwtAuth reads of an svid.tasks.AsyncTask: an awaitable jwt(audience)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def jwt(self, audience: str) -> str:
        self.asked.append(audience)
        return task_token(task_id="t9", jti="j9")


def test_jwt_auth_sends_the_provider_s_token_sync_and_async() -> None:
    app = svid.asgi.SvidAuthMiddleware(whoami, audience=AUDIENCE, source=RevokingSource())
    task = AsyncTaskLike()

    async def with_async_client(url: str) -> str:
        async with httpx.AsyncClient(auth=svid.httpx.JwtAuth(task, AUDIENCE)) as client:
            return (await client.get(url)).text

    with serving(app) as url:
        sync_reply = httpx.get(url, auth=svid.httpx.JwtAuth(lambda aud: task_token(), AUDIENCE))
        async_reply = asyncio.run(with_async_client(url))
        unauthenticated = httpx.get(url)
    assert sync_reply.text == "t1"
    assert async_reply == "t9"
    assert task.asked == [AUDIENCE]
    assert unauthenticated.status_code == 401


def _recorder(bodies: list[bytes]) -> Any:
    """An ASGI app keeping every request body it receives (its disconnects too, as b"")."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"access_token": "FORGED"}'})

    return app


def _redirecting(status: int, location: str) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan")
        headers = [(b"location", location.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize(
    ("status", "follow", "use_async"),
    [
        (307, True, False),
        (308, True, True),
        (303, True, False),
        (302, True, True),
        (307, False, False),
        (301, False, True),
    ],
)
def test_delegated_auth_s_exchange_never_sends_its_tokens_on_to_a_redirect(
    status: int, follow: bool, use_async: bool
) -> None:
    # The exchange goes through the caller's client (the MCP SDK's follows redirects), and on a
    # 307/308 httpx re-posts the same body, subject token and actor JWT-SVID, to the Location
    # on any origin. It is refused instead, naming the status and neither token.
    elsewhere: list[bytes] = []
    with serving(_recorder(elsewhere)) as other_url:
        other = other_url.replace("127.0.0.1", "localhost") + "/collect"
        with serving(_redirecting(status, other)) as issuer_url:
            auth = svid.httpx.DelegatedAuth(
                lambda audience: "ACTOR-JWT-SVID",
                issuer_url,
                "SUBJECT-ACCESS-TOKEN",
                "https://orders.example",
            )

            async def call_async() -> None:
                async with httpx.AsyncClient(auth=auth, follow_redirects=follow) as client:
                    await client.get(issuer_url + "/orders/7")

            def call_sync() -> None:
                with httpx.Client(auth=auth, follow_redirects=follow) as client:
                    client.get(issuer_url + "/orders/7")

            with pytest.raises(svid.httpx.TokenExchangeError) as refused:
                asyncio.run(call_async()) if use_async else call_sync()
    assert refused.value.error == "redirected"
    assert str(status) in str(refused.value)
    assert "TOKEN" not in str(refused.value)
    # A 301/302/303 turns the POST into a body-less GET; none is sent on, nor a 307/308's POST.
    assert elsewhere == [], f"the exchange went on: {elsewhere!r}"


def test_delegated_auth_s_exchange_body_is_not_sent_again_by_a_transport_without_trace() -> None:
    # httpx's own transports stop the redirected request at its first trace event; another
    # transport iterating the body (here an ASGITransport, which ignores the trace) gets none.
    bodies: list[tuple[str, bytes]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        bodies.append((scope["path"], body))
        location = [(b"location", b"https://elsewhere.example/collect")]
        await send({"type": "http.response.start", "status": 307, "headers": location})
        await send({"type": "http.response.body", "body": b""})

    auth = svid.httpx.DelegatedAuth(
        lambda audience: "ACTOR-JWT-SVID", "https://issuer.example", "SUBJECT", "https://r.example"
    )

    async def call() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(auth=auth, follow_redirects=True, transport=transport) as c:
            await c.get("https://issuer.example/orders/7")

    with pytest.raises(svid.httpx.TokenExchangeError, match="redirected"):
        asyncio.run(call())
    assert [path for path, _ in bodies] == ["/token"]


def test_import_svid_imports_no_adapter_dependency() -> None:
    code = (
        "import sys, svid, svid.tasks, svid.tls; "
        "print(sorted(m for m in ('mcp', 'httpx', 'httpx2', 'starlette', 'pydantic', "
        "'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

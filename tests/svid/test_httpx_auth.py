"""svid.httpx.JwtAuth with real httpx clients against svid.asgi behind uvicorn, and the core
import staying free of every adapter's dependencies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import httpx

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


def test_import_svid_imports_no_adapter_dependency() -> None:
    code = (
        "import sys, svid, svid.tasks, svid.tls; "
        "print(sorted(m for m in ('mcp', 'httpx', 'httpx2', 'starlette', 'pydantic', "
        "'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

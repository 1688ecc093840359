"""What the web adapters add to a request's verification (issue 14: at most 10 % over the bare
verifier). The same distinct task tokens go through the bare ``JwtVerifier.verify``, through
``svid.asgi.SvidAuthMiddleware`` in front of an app that answers at once, and through the MCP
path (``svid.mcp.TaskAuth.protect``'s middleware reading the JSON-RPC body for the tool's grant,
then the SDK's ``verify_token``). Each op serves a batch of requests inside one coroutine, so
the event loop's own entry cost is outside the comparison, as a server's is.

"new token": the verifier has no cache, so every request pays its signature check (what the
first request with each token costs). "cached": the verifier remembers tokens; the fixed cost
of the adapter is then most of the request and the ratio says how much (shown, not judged).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from bench.report import Rounds, Table, at_least, rate, rounds
from svid import JwtVerifier, MemoryBundleSource, SpiffeBundle, TrustDomain, sign_jws
from svid.asgi import SvidAuthMiddleware
from svid.mcp import TaskAuth, _admit
from tests.svid.certs import ec_key

TD = TrustDomain("example.org")
AUDIENCE = "mcp-tickets"
DISTINCT = 512
BATCH = 20
ROUNDS = 40
SLICE_SECONDS = 0.1
KEY = ec_key()
BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "read_ticket", "arguments": {"ticket_id": "7"}},
    }
).encode()


def _tokens(n: int) -> list[str]:
    now = int(time.time())
    return [
        sign_jws(
            {"kid": "k1", "typ": "JWT"},
            {
                "sub": f"spiffe://example.org/agents/bot/task/t{i}",
                "aud": [AUDIENCE],
                "exp": now + 3600,
                "iat": now,
                "jti": f"{i:032x}",
                "txn": f"t{i}",
                "scope": "read tool:read_ticket",
                "tctx": {"classification": "internal", "environment": "prod", "resources": []},
                "obo": "user:alice",
                "act": {"sub": f"spiffe://example.org/agents/bot/task/t{i}"},
            },
            KEY,
        )
        for i in range(n)
    ]


class _Source:
    def __init__(self, cache_size: int) -> None:
        self.bundles = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": KEY.public_key()}))
        self.cache_size = cache_size

    def jwt_verifier(self) -> JwtVerifier:
        return JwtVerifier(self.bundles.jwt_bundle_for, cache_size=self.cache_size)


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _scope(token: str, method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": "/mcp",
        "headers": [(b"authorization", f"Bearer {token}".encode()), (b"accept", b"*/*")],
    }


def _ops(cache_size: int, loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[], Any]]:
    tokens = _tokens(DISTINCT)
    source = _Source(cache_size)
    bare = source.jwt_verifier()
    asgi = SvidAuthMiddleware(_ok, audience=AUDIENCE, jwt_verifier=source.jwt_verifier())
    auth = TaskAuth(source, AUDIENCE)

    async def sdk_app(scope: Any, receive: Any, send: Any) -> None:
        # What the SDK's bearer backend does with our verifier before the MCP app runs.
        token = dict(scope["headers"])[b"authorization"].decode().partition(" ")[2]
        assert await auth.verify_token(token) is not None
        await _ok(scope, receive, send)

    mcp = SvidAuthMiddleware(
        _admit(sdk_app),
        audience=AUDIENCE,
        jwt_verifier=auth._jwt,
        accept_mtls=False,
        required_scopes=auth._rule,
    )
    statuses: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    a = itertools.cycle(tokens)
    # The scopes a server would have built, made before the measurement.
    b = itertools.cycle([_scope(t) for t in tokens])
    c = itertools.cycle([_scope(t, "POST") for t in tokens])

    def bare_batch() -> None:
        for _ in range(BATCH):
            bare.verify(next(a), AUDIENCE)

    async def through(app: Any, it: Any) -> None:
        for _ in range(BATCH):
            await app(next(it), receive, send)

    def asgi_batch() -> None:
        loop.run_until_complete(through(asgi, b))

    def mcp_batch() -> None:
        loop.run_until_complete(through(mcp, c))

    for op in (bare_batch, asgi_batch, mcp_batch):
        for _ in range(5):
            op()
    assert set(statuses) == {200}, statuses
    return {"bare": bare_batch, "asgi": asgi_batch, "mcp": mcp_batch}


def test_adapter_overhead_over_the_bare_verifier(benchmark: Any, table: Table) -> None:
    loop = asyncio.new_event_loop()
    try:
        rows = []
        for label, cache_size in (("new token", 0), ("cached", 10_000)):
            ops = _ops(cache_size, loop)
            r = Rounds(
                {name: (lambda op=op: rate(op, SLICE_SECONDS)) for name, op in ops.items()},
                rounds(ROUNDS),
            )
            judged = at_least(0.9) if cache_size == 0 else None
            rows += [
                r.rate_row(f"bare JwtVerifier.verify, {label} (x{BATCH}/op)", "bare"),
                r.ratio_row(
                    f"svid.asgi middleware / bare verify, {label}", "asgi", "bare", goal=judged
                ),
                r.ratio_row(
                    f"svid.mcp TaskAuth (tool check + SDK verify_token) / bare, {label}",
                    "mcp",
                    "bare",
                    goal=judged,
                ),
            ]
        benchmark.pedantic(ops["asgi"], rounds=20, iterations=1)
        table.add(*rows)
    finally:
        loop.close()

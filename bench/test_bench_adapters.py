"""What the web adapters add to a request's verification (issue 14: at most 10 % over the bare
verifier). The same distinct task tokens, cycled, go through the bare ``JwtVerifier.verify``,
through ``svid.asgi.SvidAuthMiddleware`` and through the MCP path (``svid.mcp.TaskAuth.protect``'s
middleware reading the JSON-RPC body for the tool's grant, then the SDK's ``verify_token``). Each
op serves a batch of requests inside one coroutine, so the event loop's own entry cost is
outside the comparison, as a server's is.

The adapter rows count only what the adapter adds: each adapter path is run next to the same
requests served without it (the same app and ASGI plumbing, with the token checked by the bare
verifier, as a hand-written server would), and the difference is the adapter's overhead ``o``.
The ratio is ``verify / (verify + o)``: 0.9 means the adapter adds 10 % to the verifier.

For MCP, a hand-written server has to give the SDK what it asks of any token verifier: the
SDK's ``AccessToken``, which such a verifier builds with the SDK's constructor, as the SDK's
own verifiers do. That is the judged baseline ("hand-written TokenVerifier"). The row after it
compares with the bare verifier alone, so that building the SDK's token also counts as the
adapter's (shown, not judged). Every baseline reads the JSON-RPC body (through svid's replay
on the adapter's side), as the SDK does; the source is what a WorkloadApiSource is to the
adapters (one revocation set, which the middleware checks again for each request it
registers, and revocation callbacks).

"new token": the verifier has no cache, so every request pays its signature check (what the
first request with each token costs). "cached": the verifier remembers tokens; the fixed cost
of the adapter is then most of the request and the ratio says how much (shown, not judged).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from mcp.server.auth.provider import AccessToken

from bench.report import Rounds, Row, Table, at_least, rate, rounds
from svid import (
    JwtVerifier,
    MemoryBundleSource,
    RevocationSet,
    SpiffeBundle,
    TrustDomain,
    VerificationError,
    X509Verifier,
    sign_jws,
)
from svid.asgi import SvidAuthMiddleware
from svid.mcp import TaskAuth
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
    """What the adapters use of a WorkloadApiSource: its verifiers on one revocation set (which
    the middleware checks again once a request is registered), and revocation callbacks."""

    def __init__(self, cache_size: int) -> None:
        self.bundles = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": KEY.public_key()}))
        self.cache_size = cache_size
        self.revocations = RevocationSet()
        self.callbacks: list[Callable[[Any], None]] = []

    def jwt_verifier(self) -> JwtVerifier:
        return JwtVerifier(
            self.bundles.jwt_bundle_for, cache_size=self.cache_size, revocations=self.revocations
        )

    def x509_verifier(self) -> X509Verifier:  # not used: every request has a bearer token
        return X509Verifier(self.bundles.x509_bundle_for, revocations=self.revocations)

    def on_revoked(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    if scope["method"] == "POST":  # the SDK reads the JSON-RPC body (through svid's replay)
        message = await receive()
        assert message["body"] == BODY
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _scope(token: str, method: str = "GET", session: str = "") -> dict[str, Any]:
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"accept", b"*/*")]
    if session:
        headers.append((b"mcp-session-id", session.encode()))
    return {"type": "http", "method": method, "path": "/mcp", "headers": headers}


def _bearer(scope: Any) -> str:
    # What the SDK's bearer backend (or a hand-written server) does to find the token.
    return str(dict(scope["headers"])[b"authorization"].decode().partition(" ")[2])


def _ops(cache_size: int, loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[], Any]]:
    tokens = _tokens(DISTINCT)
    source = _Source(cache_size)
    bare = source.jwt_verifier()
    asgi = SvidAuthMiddleware(_ok, audience=AUDIENCE, source=source)  # as the README has it
    auth = TaskAuth(source, AUDIENCE)
    plain = source.jwt_verifier()  # the bare verifier under the same app, for the baseline

    async def sdk_app(scope: Any, receive: Any, send: Any) -> None:
        # What the SDK's bearer backend does with our verifier before the MCP app runs.
        assert await auth.verify_token(_bearer(scope)) is not None
        await _ok(scope, receive, send)

    async def bare_app(scope: Any, receive: Any, send: Any) -> None:
        # The same request served without svid's adapters: the bare verifier's check only.
        plain.verify(_bearer(scope), AUDIENCE)
        await _ok(scope, receive, send)

    async def bare_verify_token(token: str) -> AccessToken | None:
        # A hand-written TokenVerifier: the bare verifier, and the token the SDK asks for.
        try:
            verified = plain.verify(token, AUDIENCE)
        except VerificationError:
            return None
        scope = verified.claims.get("scope", "")
        return AccessToken(
            token=token,
            client_id=str(verified.spiffe_id),
            scopes=scope.split() if isinstance(scope, str) else [],
            expires_at=verified.expires_at,
            resource=AUDIENCE,
        )

    async def bare_sdk_app(scope: Any, receive: Any, send: Any) -> None:
        # The same MCP request without svid: the SDK's bearer check with that verifier.
        assert await bare_verify_token(_bearer(scope)) is not None
        await _ok(scope, receive, send)

    # What TaskAuth.protect(server) builds around the server's app, with each task in its own
    # MCP session (the SDK's session table is all of the server that svid reads).
    sessions = {f"s{i}": object() for i in range(DISTINCT)}
    server = SimpleNamespace(session_manager=SimpleNamespace(_server_instances=sessions))
    mcp = auth._protected(sdk_app, server)
    statuses: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    a = itertools.cycle(tokens)
    # The scopes a server would have built, made before the measurement; every path cycles
    # through the same tokens.
    gets = [_scope(t) for t in tokens]
    posts = [_scope(t, "POST", f"s{i}") for i, t in enumerate(tokens)]
    b, b0 = itertools.cycle(gets), itertools.cycle(gets)
    c, c0, c00 = itertools.cycle(posts), itertools.cycle(posts), itertools.cycle(posts)

    def bare_batch() -> None:
        for _ in range(BATCH):
            bare.verify(next(a), AUDIENCE)

    async def through(app: Any, it: Any) -> None:
        for _ in range(BATCH):
            await app(next(it), receive, send)

    def batch(app: Any, it: Any) -> Callable[[], None]:
        return lambda: loop.run_until_complete(through(app, it))

    ops = {
        "bare": bare_batch,
        "asgi": batch(asgi, b),
        "asgi0": batch(bare_app, b0),
        "mcp": batch(mcp, c),
        "mcp0": batch(bare_sdk_app, c0),
        "mcp00": batch(bare_app, c00),
    }
    for op in ops.values():
        for _ in range(5):
            op()
    assert set(statuses) == {200}, statuses
    return ops


def _overhead_row(r: Rounds, what: str, path: str, goal: Any, without: str = "") -> Row:
    """Per round: verify / (verify + o), o = time(adapter path) - time(the same without it)."""
    without = without or path + "0"
    values = []
    for turn in r.turns:
        verify = 1 / turn["bare"]
        added = 1 / turn[path] - 1 / turn[without]
        values.append(verify / (verify + added))
    median = statistics.median(values)
    added_us = (1 / r.rate(path) - 1 / r.rate(without)) / BATCH * 1e6
    note = f"adds {added_us:.1f} us/request"
    return Row(what, median, "x", goal, tuple(values), r.count, note=note)


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
                _overhead_row(
                    r, f"svid.asgi middleware: verify / (verify + added), {label}", "asgi", judged
                ),
                _overhead_row(
                    r,
                    f"svid.mcp TaskAuth (tool check + SDK verify_token) over a hand-written "
                    f"TokenVerifier: same, {label}",
                    "mcp",
                    judged,
                ),
                _overhead_row(
                    r,
                    f"svid.mcp TaskAuth over the bare verifier alone (SDK AccessToken counted "
                    f"as svid's): same, {label}",
                    "mcp",
                    None,
                    without="mcp00",
                ),
            ]
        benchmark.pedantic(ops["asgi"], rounds=20, iterations=1)
        table.add(*rows)
    finally:
        loop.close()

"""What the adapter tests share: task tokens signed by a test key, a source that revokes on
demand (the real RevocationSet and RevocationEvents; only the agent's stream is left out), and
a real uvicorn server on a free port in a thread (plain HTTP, or mTLS with the ASGI TLS
extension filled in)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from svid import (
    AccessTokenVerifier,
    JwtVerifier,
    MemoryBundleSource,
    RevocationEvent,
    RevocationSet,
    Revoked,
    SpiffeBundle,
    SpiffeId,
    TrustDomain,
    X509Verifier,
    sign_jws,
)
from svid._ssl_peer import peer_chain_der
from tests.ports import free_port
from tests.svid.certs import ec_key

TD = TrustDomain("example.org")
KEY = ec_key()
RUNTIME = "spiffe://example.org/agents/bot"
AUDIENCE = "mcp-tickets"


def task_token(
    task_id: str = "t1", scope: str = "read tool:read_ticket", jti: str = "j1", **over: Any
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": f"{RUNTIME}/task/{task_id}",
        "aud": [AUDIENCE],
        "exp": now + 300,
        "iat": now,
        "jti": jti,
        "txn": task_id,
        "scope": scope,
        "tctx": {"classification": "internal", "environment": "test", "resources": [AUDIENCE]},
        "obo": "user:alice",
        "act": {"sub": f"{RUNTIME}/task/{task_id}"},
    }
    claims.update(over)
    return sign_jws({"kid": "k1", "typ": "JWT"}, {k: v for k, v in claims.items() if v}, KEY)


def workload_token(sub: str = "spiffe://example.org/svc", jti: str = "w1") -> str:
    now = int(time.time())
    claims = {"sub": sub, "aud": [AUDIENCE], "exp": now + 300, "iat": now, "jti": jti}
    return sign_jws({"kid": "k1", "typ": "JWT"}, claims, KEY)


class RevokingSource:
    """The part of a Workload API source the adapters use, with ``revoke`` for tests."""

    def __init__(self) -> None:
        self.bundles = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": KEY.public_key()}))
        self.revocations = RevocationSet()
        self._items: list[Revoked] = []
        self._subscribers: list[Callable[[RevocationEvent], Any]] = []

    def jwt_verifier(self, **options: Any) -> JwtVerifier:
        return JwtVerifier(self.bundles.jwt_bundle_for, revocations=self.revocations, **options)

    def x509_verifier(self, **options: Any) -> X509Verifier:
        return X509Verifier(self.bundles.x509_bundle_for, revocations=self.revocations, **options)

    def access_token_verifier(
        self, issuer: str, audience: str, **options: Any
    ) -> AccessTokenVerifier:
        return AccessTokenVerifier(
            self.bundles.jwt_bundle_for,
            issuer=issuer,
            audience=audience,
            trust_domain=TD,
            revocations=self.revocations,
            **options,
        )

    def on_revoked(self, callback: Callable[[RevocationEvent], Any]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def revoke(self, kind: str, value: str, spiffe_id: str = "") -> None:
        """As the source does: the set first (verifiers refuse), then the callbacks, from a
        thread of its own."""
        item = Revoked(kind, value, time.time() + 600, spiffe_id)
        self._items.append(item)
        self.revocations.replace(self._items)
        event = RevocationEvent(
            kind, value, item.expires_at, SpiffeId.parse(spiffe_id) if spiffe_id else None
        )

        def announce() -> None:
            for callback in list(self._subscribers):
                callback(event)

        thread = threading.Thread(target=announce)
        thread.start()
        thread.join()


class _TlsExtensionProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus what uvicorn leaves out: the ASGI TLS extension's
    ``client_cert_chain`` (PEM, leaf first), read from the connection's own TLS session."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        chain = tuple(
            ssl.DER_cert_to_PEM_cert(der)
            for der in peer_chain_der(transport.get_extra_info("ssl_object"))
        )
        inner = self.app

        async def with_tls(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                extensions = dict(scope.get("extensions") or {})
                extensions["tls"] = {"client_cert_chain": chain}
                scope["extensions"] = extensions
            await inner(scope, receive, send)

        self.app = with_tls


@contextlib.contextmanager
def serving(app: Any, ssl_context: ssl.SSLContext | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1; yields the base URL. With ``ssl_context``, over
    TLS; when it requires a client certificate, each request carries its client's chain in the
    ASGI TLS extension."""
    port = free_port()
    tls: dict[str, Any] = {}
    if ssl_context is not None:
        tls["ssl_context_factory"] = lambda config, default: ssl_context
        if ssl_context.verify_mode == ssl.CERT_REQUIRED:
            tls["http"] = _TlsExtensionProtocol
    # A stream a test left open (its app never ends one by itself) is cancelled a second into
    # the shutdown, rather than holding the join below for its whole 10 s.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="auto",
        timeout_graceful_shutdown=1,
        **tls,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"{'http' if ssl_context is None else 'https'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


async def call_asgi(
    app: Any,
    token: str,
    *,
    method: str = "GET",
    path: str = "/",
    parts: tuple[bytes, ...] = (b"",),
    on_read: Callable[[], Any] | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> list[dict[str, Any]]:
    """One request straight through an ASGI ``app`` with a bearer ``token`` (and ``headers``
    after it), its body in ``parts`` (one ASGI message each; ``on_read`` runs at each read):
    the messages sent back."""
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if on_read is not None:
            on_read()
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(b"authorization", f"Bearer {token}".encode()), *headers],
    }
    await app(scope, receive, send)
    return sent


MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2025-06-18",
}


async def open_sse_stream(
    http: httpx.AsyncClient, url: str, token: str
) -> tuple[str, contextlib.AbstractAsyncContextManager[httpx.Response]]:
    """A session opened by hand (initialize, initialized) at the server's base ``url``, and
    its SSE stream's GET, not yet entered: the SDK's client holds that stream itself, where a
    test cannot see it end."""
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }
    reply = await http.post(f"{url}/mcp", json=init, headers=headers)
    assert reply.status_code == 200, reply.text
    session = reply.headers["mcp-session-id"]
    headers["mcp-session-id"] = session
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await http.post(f"{url}/mcp", json=done, headers=headers)).status_code == 202
    return session, http.stream("GET", f"{url}/mcp", headers=headers)

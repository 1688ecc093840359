"""svid.httpx.JwtAuth with real httpx clients against svid.asgi behind uvicorn, and the core
import staying free of every adapter's dependencies."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

import svid.asgi
import svid.httpx
from tests.clocks import SleptClock, SteppedClock
from tests.svid.adapter_world import AUDIENCE, RevokingSource, serving, task_token
from tests.svid.certs import make_ca, make_leaf


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
    assert f"HTTP {status} to localhost;" in str(refused.value)
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


@contextlib.contextmanager
def _tunnelling_proxy() -> Iterator[str]:
    """An HTTP proxy that only tunnels (CONNECT), as one in front of HTTPS services does; yields
    its URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def tunnel(client: socket.socket) -> None:
        with client, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                if not (chunk := client.recv(4096)):
                    return
                head += chunk
            host, _, port = head.split(b" ")[1].decode().rpartition(":")
            with socket.create_connection((host, int(port)), timeout=10) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
                back.start()
                pipe(client, upstream)
                back.join(10)

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                client, _ = listener.accept()
                threading.Thread(target=tunnel, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def _localhost_tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for "localhost" and a client context trusting it, valid now (TLS
    checks the wall clock)."""
    now = time.time()
    ca = make_ca(not_before=now - 60, not_after=now + 3600)
    leaf = make_leaf(ca, uris=[], dns=["localhost"], not_before=now - 60, not_after=now + 3600)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(leaf.cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(
        cadata=ca.cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    return server, client


@pytest.mark.parametrize("use_async", [False, True])
def test_a_redirect_through_an_https_proxy_is_named_by_its_own_status_and_host(
    tmp_path: Path, use_async: bool
) -> None:
    # Through a proxy the exchange first hears the proxy's "200 Connection established" (the
    # CONNECT shares the request's trace), and the refusal named that: "answered HTTP 200".
    server_tls, client_tls = _localhost_tls(tmp_path)
    location = "https://collector.example:8443/collect?key=LOCATION-SECRET"
    with serving(_redirecting(307, location), server_tls) as url, _tunnelling_proxy() as proxy:
        issuer_url = url.replace("127.0.0.1", "localhost")
        auth = svid.httpx.DelegatedAuth(
            lambda audience: "ACTOR-JWT-SVID",
            issuer_url,
            "SUBJECT-ACCESS-TOKEN",
            "https://orders.example",
        )
        options: dict[str, Any] = {
            "auth": auth,
            "follow_redirects": True,
            "proxy": proxy,
            "verify": client_tls,
            "timeout": 10,
        }

        async def call_async() -> None:
            async with httpx.AsyncClient(**options) as client:
                await client.get(issuer_url + "/orders/7")

        def call_sync() -> None:
            with httpx.Client(**options) as client:
                client.get(issuer_url + "/orders/7")

        with pytest.raises(svid.httpx.TokenExchangeError) as refused:
            asyncio.run(call_async()) if use_async else call_sync()
    assert refused.value.error == "redirected"
    message = str(refused.value)
    assert "HTTP 307 to collector.example;" in message
    assert "200" not in message
    assert "SECRET" not in message
    assert "TOKEN" not in message


def test_import_svid_imports_no_adapter_dependency() -> None:
    code = (
        "import sys, svid, svid.tasks, svid.tls; "
        "print(sorted(m for m in ('mcp', 'httpx', 'httpx2', 'starlette', 'pydantic', "
        "'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _five_minute_tokens(clock: SteppedClock | SleptClock, sent: list[str]) -> httpx.Client:
    """A client whose DelegatedAuth (on `clock`) exchanges for tokens of 5 minutes, AT1, AT2...;
    the Authorization of each request to the resource is appended to `sent`."""
    issued: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            issued.append(f"AT{len(issued) + 1}")
            return httpx.Response(200, json={"access_token": issued[-1], "expires_in": 300})
        sent.append(request.headers["authorization"])
        return httpx.Response(200)

    auth = svid.httpx.DelegatedAuth(
        lambda audience: "ACTOR-JWT-SVID",
        "https://issuer.example",
        "SUBJECT",
        "https://r.example",
        clock=clock,
    )
    return httpx.Client(auth=auth, transport=httpx.MockTransport(handler))


def test_delegated_auth_does_not_send_an_expired_token_after_its_clock_steps_back() -> None:
    # The client's clock ran an hour ahead when it exchanged; NTP then stepped it back. Half
    # the token's life is an interval: counted on the wall clock, the step stretched it by the
    # hour, and every request meanwhile went out with a token past its expiry.
    sent: list[str] = []
    clock = SteppedClock(svid.FakeClock(), 3600.0)
    with _five_minute_tokens(clock, sent) as client:
        client.get("https://r.example/orders/7")
        clock.offset = 0.0  # the step back
        clock.base.advance(149)
        client.get("https://r.example/orders/7")
        clock.base.advance(152)  # the first token expired a second ago
        client.get("https://r.example/orders/7")
    assert sent == ["Bearer AT1", "Bearer AT1", "Bearer AT2"]


def test_delegated_auth_does_not_send_an_expired_token_after_its_host_slept() -> None:
    # The host slept an hour after an exchange: on the monotonic clock alone, the token's half
    # life had not passed on waking, and requests went out with it for up to that half again,
    # long past its expiry.
    sent: list[str] = []
    clock = SleptClock(svid.FakeClock())
    with _five_minute_tokens(clock, sent) as client:
        client.get("https://r.example/orders/7")
        clock.sleep(3600.0)
        client.get("https://r.example/orders/7")
    assert sent == ["Bearer AT1", "Bearer AT2"]

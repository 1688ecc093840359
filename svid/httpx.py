"""httpx adapters (``pip install 'svidd[httpx]'``): a JWT-SVID bearer ``Auth``, and clients
for mutual TLS with ``svid.tls``.

    auth = svid.httpx.JwtAuth(task, "docs-api")        # a task's token (task.jwt), refreshed
    auth = svid.httpx.JwtAuth(svid.WorkloadApiClient(), "docs-api")   # this workload's own
    httpx.get("https://docs/api", auth=auth)

    with svid.X509Source() as source:
        client = svid.httpx.mtls_client(source, authorize="spiffe://example.org/docs")
        client.get("https://docs:8443/")               # rotating SVID, server ID checked in TLS

The same ``JwtAuth`` works with ``httpx.Client`` and ``httpx.AsyncClient`` (an asyncio task's
or client's token is awaited; a sync one is fetched off the event loop).

A service that received an svidd access token (an MCP server, say) calls another resource for
the same task with ``DelegatedAuth``: RFC 8693 delegation at svidd's token endpoint, with its own
JWT-SVID as the actor token (``oauth_resource_workloads`` must name it for its resource):

    auth = svid.httpx.DelegatedAuth(client, issuer, received_token, "https://orders.example")
    await http.get("https://orders.example/orders/7", auth=auth)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any

import httpx

from svid import tls
from svid._bearer_tokens import BearerTokens
from svid._clock import Clock, ElapsedClock, SystemClock
from svid._errors import TokenExchangeError
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._tls_authorize import Authorizer

__all__ = ["DelegatedAuth", "JwtAuth", "TokenExchangeError", "async_mtls_client", "mtls_client"]

# RFC 8693 names.
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a name
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a name
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a name


class JwtAuth(httpx.Auth):
    """Sends ``Authorization: Bearer <JWT-SVID for audience>`` on every request.

    ``provider``: a task (``svid.tasks.Task`` / ``AsyncTask``: its ``jwt(audience)``), a
    ``WorkloadApiClient`` / ``AsyncWorkloadApiClient`` (this workload's own token, for
    ``spiffe_id`` if it has several; cached for a quarter of its lifetime), or a callable taking
    the audience and returning a token.
    """

    def __init__(
        self,
        provider: Any,
        audience: str,
        *,
        spiffe_id: SpiffeId | str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.tokens = BearerTokens(provider, audience, spiffe_id=spiffe_id, clock=clock)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {self.tokens.token()}"
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {await self.tokens.atoken()}"
        yield request


# httpcore's trace events that start a request's exchange with a server.
_BEFORE_SENDING = (
    ".connect_tcp.started",
    ".connect_unix_socket.started",
    ".send_request_headers.started",
)


def _redirected(status: int | str, location: str | None, endpoint: str) -> TokenExchangeError:
    """The refusal of a redirected exchange: its status and the host the redirect points to
    (the endpoint's own for a relative location). Never the rest of the location: its path,
    query or user part may carry anything."""
    if location is None:
        toward = ""
    else:
        try:
            host = httpx.URL(endpoint).join(location).host
        except httpx.InvalidURL:
            host = ""
        toward = f" to {host}" if host else " to a location that names no host"
    return TokenExchangeError(
        "redirected", f"the token endpoint answered HTTP {status}{toward}; not followed"
    )


def _redirect_answer(answer: Any) -> tuple[int, str | None] | None:
    """The status and Location of a redirect in httpcore's response headers trace value,
    (http_version, status, reason, headers) on HTTP/1.1 or (status, headers) on HTTP/2; None
    for any other answer (a proxy's "200 Connection established" to the CONNECT, which shares
    the request's trace)."""
    parts = tuple(answer or ())
    status = next((v for v in parts if isinstance(v, int)), None)
    if status is None or not 300 <= status < 400:
        return None
    headers = next((v for v in parts if isinstance(v, list)), [])
    location = next(
        (bytes(value).decode("latin-1") for name, value in headers if name.lower() == b"location"),
        None,
    )
    return status, location


class _SentOnce(httpx.SyncByteStream, httpx.AsyncByteStream):
    """The exchange's form body, which holds the subject token and the actor's JWT-SVID: given
    to the transport once. An auth flow's requests follow redirects as the caller's client does
    (httpx has no per-request switch for them, and the MCP SDK's client follows), and on a 307
    or 308 httpx re-sends the same body to the Location, any origin (it strips only the
    Authorization header). A second read ends the redirected request before its body leaves."""

    def __init__(self, body: bytes, endpoint: str) -> None:
        self._body = body
        self._endpoint = endpoint
        self._sent = False
        # What re-reads a body, and where to; the trace names them where it can.
        self._redirect: tuple[int | str, str | None] = ("307 or 308", None)

    def _take(self) -> bytes:
        self.refuse_resend()
        self._sent = True
        return self._body

    def refuse_resend(self) -> None:
        if self._sent:
            raise _redirected(*self._redirect, self._endpoint)

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's ``trace`` extension, which httpx copies to a redirected request: stops
        it before it connects or sends its headers, so the Location hears nothing (on httpx's
        own transports; on others ``_take`` still keeps the body from going again)."""
        if event.endswith(_BEFORE_SENDING):
            self.refuse_resend()
        elif event.endswith(".receive_response_headers.complete"):
            redirect = _redirect_answer(info.get("return_value"))
            if redirect is not None:
                self._redirect = redirect

    async def atrace(self, event: str, info: dict[str, Any]) -> None:
        self.trace(event, info)

    def __iter__(self) -> Iterator[bytes]:
        yield self._take()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._take()


class DelegatedAuth(httpx.Auth):
    """Sends ``Authorization: Bearer <access token for resource>``, the token got by RFC 8693
    delegation: ``subject_token`` (an svidd access token this workload received, naming it in
    ``may_act``) and this workload's own JWT-SVID for ``issuer`` as the actor token. The token
    is kept until half its life; the exchange goes through the same client (its TLS settings
    must trust the issuer), never following a redirect: any 3xx answer raises
    ``TokenExchangeError``, as a refusal does.

    ``provider``: as for ``JwtAuth`` (a ``WorkloadApiClient`` / ``AsyncWorkloadApiClient``, or a
    callable taking the audience), giving this workload's JWT-SVID for the issuer.
    """

    def __init__(
        self,
        provider: Any,
        issuer: str,
        subject_token: str,
        resource: str,
        *,
        spiffe_id: SpiffeId | str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not subject_token or not resource:
            raise ValueError("a subject token and a resource are required")
        self.resource = resource
        self._endpoint = issuer.rstrip("/") + "/token"
        self._subject = subject_token
        self._actor = BearerTokens(provider, issuer.rstrip("/"), spiffe_id=spiffe_id, clock=clock)
        # Counts a sleep of the host too (ElapsedClock): CLOCK_MONOTONIC stands still in one.
        self._clock = ElapsedClock(clock or SystemClock())
        # The token, and when to exchange again on the monotonic clock: expires_in is an
        # interval, and on the wall clock an NTP step back kept a token that long past expiry.
        self._token: tuple[str, float] | None = None

    def _fresh(self) -> str | None:
        kept = self._token
        return kept[0] if kept is not None and self._clock.monotonic() < kept[1] else None

    def _exchange(self, actor_token: str, *, asynchronous: bool) -> httpx.Request:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": self._subject,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "actor_token": actor_token,
            "actor_token_type": JWT_TOKEN_TYPE,
            "resource": self.resource,
        }
        encoded = httpx.Request("POST", self._endpoint, data=form)  # its headers, Host among them
        body = _SentOnce(encoded.read(), self._endpoint)
        # A new request, its body not held read: a transport reading it (a MockTransport, an
        # ASGITransport) takes it from the stream, so a second read is seen.
        trace = body.atrace if asynchronous else body.trace
        return httpx.Request(
            "POST",
            self._endpoint,
            headers=encoded.headers,
            stream=body,
            extensions={"trace": trace},
        )

    def _keep(self, reply: httpx.Response, asked_at: float) -> str:
        # A 301/302/303 turned into a GET without the body, followed by a client that follows;
        # any other 3xx not followed. Either way, whatever answered last is not the issuer's.
        redirect = reply.history[0] if reply.history else reply
        if redirect.is_redirect:
            location = redirect.headers.get("location")
            raise _redirected(redirect.status_code, location, self._endpoint)
        try:
            body = reply.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise TokenExchangeError("invalid_response", f"HTTP {reply.status_code}, not JSON")
        token = body.get("access_token")
        if reply.status_code != 200 or not isinstance(token, str) or not token:
            error = str(body.get("error") or f"HTTP {reply.status_code}")
            raise TokenExchangeError(error, str(body.get("error_description", ""))[:500])
        lifetime = body.get("expires_in")
        lifetime = lifetime if isinstance(lifetime, int) and lifetime > 0 else 0
        self._token = (token, asked_at + lifetime / 2)
        return token

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        token = self._fresh()
        if token is None:
            asked_at = self._clock.monotonic()
            reply = yield self._exchange(self._actor.token(), asynchronous=False)
            reply.read()
            token = self._keep(reply, asked_at)
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = self._fresh()
        if token is None:
            asked_at = self._clock.monotonic()
            reply = yield self._exchange(await self._actor.atoken(), asynchronous=True)
            await reply.aread()
            token = self._keep(reply, asked_at)
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


def mtls_client(
    source: tls.SvidSource,
    authorize: Authorizer | SpiffeId | TrustDomain | str,
    **client_options: Any,
) -> httpx.Client:
    """An ``httpx.Client`` that presents the source's newest X.509-SVID and admits only servers
    ``authorize`` accepts (``svid.tls.client_context``; its options, such as ``spiffe_id=``,
    ``max_revocation_staleness=`` and ``trust_domains=``, go there, the rest to
    ``httpx.Client``)."""
    context_options = _context_options(client_options)
    ctx = tls.client_context(source, authorize, **context_options)
    return httpx.Client(verify=ctx, **client_options)


def async_mtls_client(
    source: tls.SvidSource,
    authorize: Authorizer | SpiffeId | TrustDomain | str,
    **client_options: Any,
) -> httpx.AsyncClient:
    """``mtls_client`` for asyncio: an ``httpx.AsyncClient``."""
    context_options = _context_options(client_options)
    ctx = tls.client_context(source, authorize, **context_options)
    return httpx.AsyncClient(verify=ctx, **client_options)


def _context_options(options: dict[str, Any]) -> dict[str, Any]:
    # httpx ignores verify= for a transport given by hand: that client would send no SVID and
    # check no SPIFFE ID, authorize never asked.
    for name in ("transport", "mounts"):
        if name in options:
            raise TypeError(
                f"mtls_client makes its own TLS, which a {name}= would leave out: give your "
                "transport verify=svid.tls.client_context(source, authorize) and pass it to "
                "httpx.Client yourself"
            )
    # Every keyword of svid.tls.client_context: httpx.Client takes none of them.
    names = (
        "spiffe_id",
        "verifier",
        "max_revocation_staleness",
        "clock",
        "trust_domains",
        "federated",
    )
    return {name: options.pop(name) for name in names if name in options}

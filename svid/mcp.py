"""Task tokens for servers and clients of the official ``mcp`` SDK (``pip install
'svidd[mcp]'``): a token verifier whose ``AccessToken`` carries the typed task claims, per-tool
grants answered with ``403 insufficient_scope``, revoked tasks' streams and sessions closed,
and client auth for the streamable HTTP transport.

A server (the tools are yours; the other lines are all it takes):

    source = svid.WorkloadApiSource().start()                 # $SPIFFE_ENDPOINT_SOCKET
    auth = svid.mcp.TaskAuth(source, audience="mcp-tickets")
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)
    ...                                                       # @server.tool() functions
    uvicorn.run(auth.protect(server), port=8000)

Every ``tools/call`` needs a task token that grants that tool (``tool:<name>`` in its scope, or
``invoke_tool``); otherwise the HTTP answer is 403 with ``WWW-Authenticate: Bearer
error="insufficient_scope", scope="tool:<name>"``. ``TaskAuth(..., every_tool=False)`` checks
only the tools marked ``@auth.require_tool``. In a tool, ``get_access_token()`` (from
``mcp.server.auth.middleware.auth_context``) is a ``TaskAccessToken``: ``.task`` is the
``svid.TaskClaims``. When the task ends (any of its credentials revoked), its open SSE streams
are closed and its MCP sessions ended at once.

A client (an agent runtime with a task):

    async with svid.mcp.http_client(task, "mcp-tickets") as http:   # httpx2.AsyncClient
        async with streamable_http_client(url, http_client=http) as (read, write): ...
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

import httpx2
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from pydantic import ConfigDict, PrivateAttr

from svid._bearer_tokens import BearerTokens
from svid._caller import Caller
from svid._clock import Clock
from svid._errors import VerificationError
from svid._mcp_tools import called_tools
from svid._open_requests import Admission, OpenRequests, caller_keys
from svid._source_state import RevocationEvent
from svid._spiffe_id import SpiffeId
from svid._task_claims import TaskClaims, tool_scope
from svid._verify_jwt import JwtVerifier
from svid.asgi import ASGIApp, Message, Receive, Scope, Send, SvidAuthMiddleware, caller_of

__all__ = ["McpAuth", "TaskAccessToken", "TaskAuth", "http_client"]

log = logging.getLogger("svid.mcp")

F = TypeVar("F", bound=Callable[..., Any])
SESSION_HEADER = b"mcp-session-id"

# Set by TaskAuth.protect's middleware for the request it admitted: the SDK's own bearer check
# (inside it) then accepts only what went through the per-tool check.
# It holds the bearer token and the Caller made from it, so the SDK's check does not verify the
# same token twice in one request.
_admitted: contextvars.ContextVar[tuple[str, Caller] | None] = contextvars.ContextVar(
    "svid_mcp_admitted", default=None
)


class TaskAccessToken(AccessToken):
    """The SDK's ``AccessToken`` for a verified JWT-SVID: ``client_id`` and ``subject`` are its
    SPIFFE ID, ``scopes`` its ``scope``, ``resource`` the audience, and ``task`` the typed
    ``svid.TaskClaims`` (None for a token that is not a task token)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    spiffe_id: str
    _caller: Caller | None = PrivateAttr(default=None)

    @property
    def task(self) -> TaskClaims | None:
        """The typed task claims (read on first use; TaskClaimsError if malformed)."""
        return self._caller.task if self._caller is not None else None

    @classmethod
    def _of(cls, token: str, caller: Caller, audience: str) -> TaskAccessToken:
        """The token of a caller svid verified, built per request without pydantic's generic
        construction: what ``model_construct`` (the public way to skip validation) would make,
        in a quarter of its time (a test holds the two equal)."""
        verified = caller.jwt
        assert verified is not None
        scope = verified.claims.get("scope")
        sid = str(verified.spiffe_id)
        access = object.__new__(cls)
        fields = {
            "token": token,
            "client_id": sid,
            "scopes": scope.split() if type(scope) is str else [],
            "expires_at": verified.expires_at,
            "resource": audience,
            "subject": sid,
            "claims": dict(verified.claims),
            "spiffe_id": sid,
        }
        _set(access, "__dict__", fields)
        _set(access, "__pydantic_fields_set__", set(fields))
        _set(access, "__pydantic_extra__", None)
        _set(access, "__pydantic_private__", {"_caller": caller})
        return access


# Frozen models refuse setattr; these are the slots model_construct itself fills.
_set = object.__setattr__


class _ToolRule:
    """The scope rule for MCP requests: each ``tools/call`` needs that tool's grant."""

    def __init__(self, every_tool: bool, required: set[str]) -> None:
        self.every_tool = every_tool
        self.required = required

    def reads_body(self, scope: Scope) -> bool:
        return bool(scope.get("method") == "POST")

    def scopes(self, scope: Scope, body: bytes) -> tuple[str, ...]:
        if scope.get("method") != "POST":  # GET (the SSE stream), DELETE (end a session)
            return ()
        if self.every_tool:
            return tuple(map(tool_scope, called_tools(body)))
        return tuple(tool_scope(name) for name in called_tools(body) if name in self.required)


class TaskAuth:
    """Verifies task tokens for an MCP server: the SDK's ``TokenVerifier``, its auth settings,
    the per-tool grants and the closing of revoked tasks' streams and sessions."""

    def __init__(
        self,
        source: Any,
        audience: str,
        *,
        url: str = "http://127.0.0.1/mcp",
        every_tool: bool = True,
        jwt_verifier: JwtVerifier | None = None,
    ) -> None:
        """``source``: a WorkloadApiSource / AsyncWorkloadApiSource (its verifier, its
        revocations); ``audience``: what this server's tokens must name; ``url``: this
        server's MCP endpoint (the resource the SDK's auth settings name)."""
        if not audience:
            raise ValueError("an audience is required")
        self.audience = audience
        self._source = source
        self._jwt = jwt_verifier if jwt_verifier is not None else source.jwt_verifier()
        self._required: set[str] = set()
        self._rule = _ToolRule(every_tool, self._required)
        self.settings = AuthSettings(
            issuer_url=url,  # type: ignore[arg-type]  # pydantic parses it
            resource_server_url=None,
            validate_token_resource=False,  # the verifier checks the audience itself
        )

    # --- the SDK's TokenVerifier ---

    async def verify_token(self, token: str) -> TaskAccessToken | None:
        admitted = _admitted.get()
        if admitted is None:
            log.error("refused a token outside TaskAuth.protect(): serve auth.protect(server)")
            return None
        admitted_token, caller = admitted
        try:
            if token != admitted_token or caller.jwt is None:
                verified = self._jwt.verify(token, self.audience)
                caller = Caller(verified.spiffe_id, jwt=verified, audience=self.audience)
            return self._access_token(token, caller)
        except VerificationError:
            return None

    def access_token(self, token: str) -> TaskAccessToken:
        """The ``TaskAccessToken`` of a JWT-SVID for this audience; VerificationError if not."""
        verified = self._jwt.verify(token, self.audience)
        return self._access_token(
            token, Caller(verified.spiffe_id, jwt=verified, audience=self.audience)
        )

    def _access_token(self, token: str, caller: Caller) -> TaskAccessToken:
        return TaskAccessToken._of(token, caller, self.audience)

    # --- per-tool grants ---

    def require_tool(self, fn: F | None = None, *, name: str | None = None) -> Any:
        """Mark a tool as needing its grant (for ``every_tool=False``): ``@auth.require_tool``
        under ``@server.tool()``, or ``@auth.require_tool(name="...")`` for a renamed tool."""

        def mark(f: F) -> F:
            tool_scope(name or f.__name__)  # the same check a grant gets
            self._required.add(name or f.__name__)
            return f

        return mark(fn) if fn is not None else mark

    # --- serving ---

    def protect(self, server: Any, **app_options: Any) -> ASGIApp:
        """The server's streamable HTTP app (``server.streamable_http_app(**app_options)``)
        behind svid: verified task tokens only, each tool call checked, revoked tasks' streams
        and sessions closed."""
        return self._protected(server.streamable_http_app(**app_options), server)

    def _protected(self, app: ASGIApp, server: Any) -> ASGIApp:
        sessions = _Sessions(app, server)
        middleware = SvidAuthMiddleware(
            sessions,
            audience=self.audience,
            source=self._source,
            jwt_verifier=self._jwt,
            accept_mtls=False,
            required_scopes=self._rule,
        )
        subscribe = getattr(self._source, "on_revoked", None)
        if subscribe is not None:
            subscribe(sessions.on_revoked)
        return middleware


class _Sessions:
    """Inside svid's middleware, around the SDK's app: hands the SDK's token check the request
    svid admitted, and keeps the MCP sessions each task opened, to end them when the task is
    revoked. One layer, so each request's headers are read once."""

    def __init__(self, app: ASGIApp, server: Any) -> None:
        self.app = app
        self._server = server
        self._open = OpenRequests()
        self._admissions: dict[str, Admission] = {}
        self._ending: set[asyncio.Future[Any]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller = caller_of(scope)
        token = ""
        in_session = False
        for key, value in scope.get("headers", ()):
            # Only names of these lengths can match: no lowered copy of every header's name.
            size = len(key)
            if size == len(b"authorization") and key.lower() == b"authorization":
                token = bytes(value).decode("latin-1").partition(" ")[2].strip()
            elif size == len(SESSION_HEADER) and key.lower() == SESSION_HEADER:
                in_session = True
                self._track(caller, bytes(value).decode("latin-1"), asyncio.get_running_loop())
        if not in_session:  # a request in a session never opens another: no answer to watch
            send = self._watching(caller, send)
        reset = _admitted.set((token, caller))
        try:
            await self.app(scope, receive, send)
        finally:
            _admitted.reset(reset)

    def _watching(self, caller: Caller, send: Send) -> Send:
        loop = asyncio.get_running_loop()

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                for key, value in message.get("headers", ()):
                    if bytes(key).lower() == SESSION_HEADER:
                        self._track(caller, bytes(value).decode("latin-1"), loop)
            await send(message)

        return watching_send

    def _track(self, caller: Caller, session_id: str, loop: asyncio.AbstractEventLoop) -> None:
        if session_id in self._admissions:
            return
        self._forget_gone()

        def end() -> None:
            loop.call_soon_threadsafe(self._end, session_id)

        self._admissions[session_id] = self._open.open(caller_keys(caller), end)

    def _instances(self) -> dict[str, Any]:
        # The SDK keeps no public list of sessions; its manager's own table is read, not changed.
        manager = getattr(self._server, "session_manager", None)
        instances = getattr(manager, "_server_instances", None)
        return instances if isinstance(instances, dict) else {}

    def _forget_gone(self) -> None:
        live = self._instances()
        for session_id in [s for s in self._admissions if s not in live]:
            self._open.close(self._admissions.pop(session_id))

    def _end(self, session_id: str) -> None:
        self._admissions.pop(session_id, None)
        manager = self._server.session_manager
        transport = self._instances().get(session_id)
        if transport is None:
            return
        log.info("ending MCP session %s: its task's credential was revoked", session_id[:16])
        # The manager's own way of ending a session (what a client's DELETE leads to).
        ending = asyncio.ensure_future(manager._discard_session(session_id, transport))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    def on_revoked(self, event: RevocationEvent) -> None:
        self._open.on_revoked(event)


# --- the client side ---


class McpAuth(httpx2.Auth):
    """``Authorization: Bearer <JWT-SVID>`` for the MCP SDK's HTTP client (httpx2): a task's
    token (``task.jwt(audience)``), this workload's own (a Workload API client), or a
    callable's. Pass it as ``httpx2.AsyncClient(auth=...)`` (``http_client`` does)."""

    def __init__(
        self,
        provider: Any,
        audience: str,
        *,
        spiffe_id: SpiffeId | str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.tokens = BearerTokens(provider, audience, spiffe_id=spiffe_id, clock=clock)

    def sync_auth_flow(
        self, request: httpx2.Request
    ) -> Any:  # a generator, typed loosely as httpx2 types it
        request.headers["Authorization"] = f"Bearer {self.tokens.token()}"
        yield request

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        request.headers["Authorization"] = f"Bearer {await self.tokens.atoken()}"
        yield request


def http_client(
    provider: Any, audience: str, *, spiffe_id: SpiffeId | str | None = None, **options: Any
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` for ``streamable_http_client(url, http_client=...)`` that
    sends the task's (or workload's) JWT-SVID for ``audience``; options go to the client
    (the SDK's MCP timeouts are the default)."""
    # The SDK's defaults: a response stream may stay open for minutes.
    options.setdefault("timeout", httpx2.Timeout(30.0, read=300.0))
    return httpx2.AsyncClient(auth=McpAuth(provider, audience, spiffe_id=spiffe_id), **options)

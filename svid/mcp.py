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
are closed and its MCP sessions ended at once; with a verifier that fails closed on stale
revocation data (``max_revocation_staleness``), so are the streams and sessions it admitted
once the data grows too old.

A client (an agent runtime with a task):

    async with svid.mcp.http_client(task, "mcp-tickets") as http:   # httpx2.AsyncClient
        async with streamable_http_client(url, http_client=http) as (read, write): ...
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2
from mcp.client.auth import TokenStorage
from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url
from mcp.server.auth.settings import AuthSettings
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from pydantic import ConfigDict, PrivateAttr

from svid._bearer_tokens import BearerTokens
from svid._caller import Caller
from svid._clock import Clock
from svid._errors import VerificationError
from svid._http_refusal import (
    Refusal,
    insufficient_scope,
    invalid_token,
    no_credentials,
    several_credentials,
)
from svid._mcp_tools import called_tools
from svid._open_requests import JWT, CallerAdmission, OpenRequests
from svid._source_views import SourceViews
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._task_claims import TOOL_SCOPE_PREFIX, TaskClaims, tool_scope
from svid._unspent_assertions import UnspentAssertions
from svid._verify_access import AccessTokenVerifier, VerifiedAccessToken
from svid._verify_jwt import JwtVerifier
from svid.asgi import (
    CALLER,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    SvidAuthMiddleware,
    _bearer_token,
    _read_body,
    _RefusedError,
)

__all__ = [
    "AccessTokenAuth",
    "McpAuth",
    "OAuthAccessToken",
    "TaskAccessToken",
    "TaskAuth",
    "http_client",
    "oauth_auth",
]

log = logging.getLogger("svid.mcp")

F = TypeVar("F", bound=Callable[..., Any])
SESSION_HEADER = b"mcp-session-id"

# Set by TaskAuth.protect's middleware for the request it admitted: the SDK's own bearer check
# (inside it) then accepts only that token, which went through the per-tool check. It holds
# the token and the Caller made from it, so the SDK's check does not verify it a second time.
_admitted: contextvars.ContextVar[tuple[str, Caller] | None] = contextvars.ContextVar(
    "svid_mcp_admitted", default=None
)


class _UnprintedAccessToken(AccessToken):
    """The SDK's ``AccessToken`` without its bearer token in repr or str: the SDK's model
    shows every field, so a tool logging ``get_access_token()`` logged the token."""

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        return [(name, value) for name, value in super().__repr_args__() if name != "token"]


class OAuthAccessToken(_UnprintedAccessToken):
    """The SDK's ``AccessToken`` for a verified svidd access token (``AccessTokenAuth``):
    ``act_chain`` the RFC 8693 actors, the current one first, empty unless ``delegated``."""

    act_chain: tuple[str, ...] = ()

    @property
    def delegated(self) -> bool:
        """A task acts for ``subject``: the principal as its runtime declared it and policy
        allowed, not an authenticated user (``svid.VerifiedAccessToken.delegated``)."""
        return bool(self.act_chain)


class TaskAccessToken(_UnprintedAccessToken):
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
        in a fraction of its time (a test holds the two equal)."""
        verified = caller.jwt
        assert verified is not None
        claims = verified.claims
        scope = claims.get("scope")
        sid = claims.get("sub")  # str(verified.spiffe_id), which was parsed from it exactly
        if type(sid) is not str:
            sid = str(verified.spiffe_id)
        # The tool's own top level: the verifier's claims are shared with later requests. They
        # are a read-only view of a dict (copying the dict skips the view), and what they nest
        # is read-only itself (svid._frozen_json), so it is shared, not copied per request.
        own = claims.copy() if type(claims) is MappingProxyType else None
        if type(own) is not dict:
            own = dict(claims)
        access = _new(cls)
        _set_dict(
            access,
            {
                "token": token,
                "client_id": sid,
                "scopes": scope.split() if type(scope) is str else [],
                "expires_at": verified.expires_at,
                "resource": audience,
                "subject": sid,
                "claims": own,
                "spiffe_id": sid,
            },
        )
        _set_fields_set(access, _FIELDS_SET.copy())
        _set_extra(access, None)
        _set_private(access, {"_caller": caller})
        return access


def _descriptor_setter(name: str) -> Callable[[Any, Any], None]:
    # The slot descriptors BaseModel declares for each instance's state.
    for klass in TaskAccessToken.__mro__:
        if name in klass.__dict__:
            setter: Callable[[Any, Any], None] = klass.__dict__[name].__set__
            return setter
    raise AttributeError(name)


# Frozen models refuse setattr: these set the slots model_construct itself fills.
_new = object.__new__
_set_dict = _descriptor_setter("__dict__")
_set_fields_set = _descriptor_setter("__pydantic_fields_set__")
_set_extra = _descriptor_setter("__pydantic_extra__")
_set_private = _descriptor_setter("__pydantic_private__")
_FIELDS_SET = set(TaskAccessToken.model_fields)  # copied into each token: pydantic updates it


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
        return tuple(map(tool_scope, self.tools(body)))

    def tools(self, body: bytes) -> tuple[str, ...]:
        """The tools a POST's JSON-RPC body calls that need their grant."""
        names = called_tools(body)
        if not self.every_tool:
            names = tuple(name for name in names if name in self.required)
        return names

    def missing(self, caller: Caller, body: bytes) -> tuple[str, ...]:
        """The scopes of the tools a POST's body calls that ``caller`` is not granted: what
        ``caller.missing(self.scopes(...))`` says, in one step."""
        return caller.missing_tools(self.tools(body))


class _ToolGrants:
    """The per-tool grants both auths check in ``protect``: every tool's (``every_tool``), or
    only those marked ``require_tool``."""

    def __init__(self, every_tool: bool) -> None:
        self._required: set[str] = set()
        self._rule = _ToolRule(every_tool, self._required)

    def require_tool(self, fn: F | None = None, *, name: str | None = None) -> Any:
        """Mark a tool as needing its grant (for ``every_tool=False``): ``@auth.require_tool``
        under ``@server.tool()``, or ``@auth.require_tool(name="...")`` for a renamed tool."""

        def mark(f: F) -> F:
            tool_scope(name or f.__name__)  # the same check a grant gets
            self._required.add(name or f.__name__)
            return f

        return mark(fn) if fn is not None else mark

    def _name_unknown_marks(self, server: Any) -> None:
        """Warn of tools marked ``require_tool`` that the server has none of: marked by its
        function's name, a tool renamed with ``@server.tool(name=...)`` goes unchecked."""
        if self._rule.every_tool:
            return
        # The SDK lists its tools only asynchronously; its manager's table is read, not changed.
        tools = getattr(getattr(server, "_tool_manager", None), "_tools", None)
        if not isinstance(tools, dict):
            return
        for name in sorted(self._required - tools.keys()):
            log.warning(
                "require_tool marks %r, which this server has no tool of: a tool renamed with "
                "@server.tool(name=...) is not checked; mark it @auth.require_tool(name=...)",
                name,
            )


class TaskAuth(_ToolGrants):
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
        super().__init__(every_tool)
        self.audience = audience
        self._source = source
        self._jwt = jwt_verifier if jwt_verifier is not None else source.jwt_verifier()
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
        # The SDK hands on all that follows "Bearer ": after more than one space (RFC 6750
        # allows them) that starts with a space, which protect(), like RFC 6750, skips.
        token = token.strip()
        if token != admitted_token:  # not the token whose tool grants were checked
            log.error("refused a bearer token other than the one TaskAuth.protect() admitted")
            return None
        if caller.jwt is None or caller.audience != self.audience:
            # Admitted by another protect() (an AccessTokenAuth's, another audience's TaskAuth):
            # its tool grants were not checked for this server, nor is it a JWT-SVID.
            log.error("refused a token another auth's protect() admitted: serve auth.protect()")
            return None
        return TaskAccessToken._of(token, caller, self.audience)

    def access_token(self, token: str) -> TaskAccessToken:
        """The ``TaskAccessToken`` of a JWT-SVID for this audience; VerificationError if not."""
        verified = self._jwt.verify(token, self.audience)
        return self._access_token(
            token, Caller(verified.spiffe_id, jwt=verified, audience=self.audience)
        )

    def _access_token(self, token: str, caller: Caller) -> TaskAccessToken:
        return TaskAccessToken._of(token, caller, self.audience)

    # --- serving ---

    def protect(self, server: Any, **app_options: Any) -> ASGIApp:
        """The server's streamable HTTP app (``server.streamable_http_app(**app_options)``)
        behind svid: verified task tokens only, each tool call checked, revoked tasks' streams
        and sessions closed."""
        self._name_unknown_marks(server)
        return self._protected(server.streamable_http_app(**app_options), server)

    def _protected(self, app: ASGIApp, server: Any) -> ASGIApp:
        # Its sessions are held in its open requests: the source's revocations and the
        # staleness watch end them there, as they end its requests.
        return _McpMiddleware(
            app,
            server,
            self._rule,
            audience=self.audience,
            source=self._source,
            jwt_verifier=self._jwt,
            accept_mtls=False,
        )


_AUTHORIZATION = b"authorization"


class _McpMiddleware(SvidAuthMiddleware):
    """svid.asgi's middleware as ``TaskAuth.protect`` needs it, around the SDK's app: bearer
    task tokens only, each tool call checked; and, from the same one pass over the request's
    headers, the MCP session the request uses kept (to end it when the task is revoked) and
    the admitted token handed to the SDK's own token check (``verify_token``)."""

    def __init__(self, app: ASGIApp, server: Any, tools: _ToolRule, **options: Any) -> None:
        super().__init__(app, required_scopes=tools, **options)
        self.sessions = _Sessions(server, self.open_requests)
        self._tools = tools  # the rule reads bodies of POSTs only (the same as svid.asgi asks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # websocket, lifespan: as svid.asgi serves them
            await super().__call__(scope, receive, send)
            return
        seen = self._revocations_seen()
        header = session = None
        several = False  # Authorization headers: refused (RFC 6750 section 3.1)
        for key, value in scope.get("headers", ()):
            # Only names of these lengths can match: no lowered copy of every header's name.
            # The first session header counts, as for the SDK (Starlette's headers.get).
            size = len(key)
            if size == 13:  # len(b"authorization")
                if key == _AUTHORIZATION or key.lower() == _AUTHORIZATION:
                    if header is None:
                        header = value
                    else:
                        several = True
            elif (
                size == 14  # len(SESSION_HEADER)
                and session is None
                and (key == SESSION_HEADER or key.lower() == SESSION_HEADER)
            ):
                session = value
        try:
            if header is None:
                raise _RefusedError(no_credentials())
            if several:
                raise _RefusedError(several_credentials())
            token, caller = self._bearer(bytes(header).decode("latin-1"))
            if self._authorize is not None:
                self._check_authorized(caller)
            if scope.get("method") == "POST":  # tool calls: in the body
                body, receive = await _read_body(receive, self._max_body)
                try:  # what the rule's scopes() would ask of caller.missing(), in one step
                    missing = self._tools.missing(caller, body)
                except ValueError as exc:  # a body that cannot be read is refused, not passed
                    raise _RefusedError(Refusal(400, "invalid_request", str(exc))) from None
                if missing:
                    raise _RefusedError(insufficient_scope(missing))
        except _RefusedError as refused:
            await self._refuse("http", send, refused.refusal)
            return
        if session is None:  # a request in a session never opens another: no answer to watch
            send = self.sessions.watching(caller, send)
        else:
            self.sessions.track(caller, bytes(session).decode("latin-1"))
        scope = dict(scope)
        scope[CALLER] = caller
        reset = _admitted.set((token, caller))
        try:
            await self._serve(caller, scope, receive, send, seen)
        finally:
            _admitted.reset(reset)


class _AccessTokenCaller(Caller):
    """A caller admitted with an svidd access token (``AccessTokenAuth.protect``): its
    ``claims`` are the token's, so what revokes its requests and sessions is read as for a
    JWT-SVID: its ``jti``, and its task's ``txn`` (an exchanged token is a credential of the
    task, revoked with it). ``spiffe_id`` is the acting workload's (the first actor, else the
    client's), or the issuer's trust domain when the token names none."""

    __slots__ = ("access",)

    def __init__(
        self, access: VerifiedAccessToken, resource: str, trust_domain: TrustDomain
    ) -> None:
        super().__init__(_acting_id(access, trust_domain), audience=resource)
        self.access = access

    @property
    def claims(self) -> Mapping[str, Any]:
        return self.access.claims

    def grants(self, scope: str) -> bool:
        """The access token's scope read as a task token's (``TaskClaims``): an action, a
        tool by name, or every tool through ``invoke_tool``. A token without one grants
        nothing (a workload's own JWT-bearer token)."""
        access = self.access
        # AccessTokenAuth admits access tokens only (verify checks typ), whose aud is this
        # resource; the resource is named still, so a Txn-Token let in some day grants the
        # tools and actions decided for this server alone.
        if scope.startswith(TOOL_SCOPE_PREFIX):
            # As TaskClaims.grants_tool, a "tool:" naming no tool included (invoke_tool grants
            # it): the same scope answers the same through either auth.
            return access.grants_tool(scope[len(TOOL_SCOPE_PREFIX) :], resource=self.audience)
        return access.allows(scope, resource=self.audience)

    def missing_tools(self, tools: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(scope for scope in map(tool_scope, tools) if not self.grants(scope))


def _acting_id(access: VerifiedAccessToken, trust_domain: TrustDomain) -> SpiffeId:
    for candidate in (*access.act_chain[:1], access.client_id, access.subject):
        if candidate and candidate.startswith("spiffe://"):
            try:
                return SpiffeId.parse(candidate)
            except ValueError:
                continue
    return SpiffeId(trust_domain, "")


class _AccessTokenMiddleware(_McpMiddleware):
    """``_McpMiddleware`` admitting svidd access tokens (``AccessTokenAuth.protect``) in
    place of JWT-SVIDs: the same sessions, open requests, revocations and staleness watch, by
    the access token verifier's staleness limit. The SDK's RFC 9728 metadata is served to
    anyone, and a 401 names it (``resource_metadata``), as the SDK's own check does: that is
    how a client finds svidd to get a token from."""

    def __init__(
        self,
        app: ASGIApp,
        server: Any,
        access: AccessTokenVerifier,
        resource_metadata: str,
        tools: _ToolRule,
        **options: Any,
    ) -> None:
        self._access = access  # before the base class asks _fresh_for
        self._access_callers: dict[str, _AccessTokenCaller] = {}
        self._metadata_param = f'resource_metadata="{resource_metadata}"'.encode()
        # That one document only (RFC 9728 section 3.1): the server's other routes under the
        # well-known prefix (its own, another resource's) are its routes like any other.
        self._metadata_path = urlsplit(resource_metadata).path
        super().__init__(app, server, tools, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") == self._metadata_path:
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _refuse(self, kind: str, send: Send, refusal: Refusal) -> None:
        # A 403 insufficient_scope names it too: the MCP client asks the authorization server
        # it names for the scope the challenge gives (the MCP spec's scope challenge).
        if kind != "http" or refusal.status not in (401, 403):
            await super()._refuse(kind, send, refusal)
            return
        param = self._metadata_param

        async def naming_metadata(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        (key, _naming(value, param) if key == b"www-authenticate" else value)
                        for key, value in message["headers"]
                    ],
                }
            await send(message)

        await super()._refuse(kind, naming_metadata, refusal)

    def _fresh_for(self) -> dict[str, Callable[[], float | None]]:
        fresh_for = self._access.revocations_fresh_for
        return {JWT: fresh_for} if fresh_for() is not None else {}

    def _bearer(self, header: str) -> tuple[str, Caller]:
        token = _bearer_token(header)
        try:
            verified = self._access.verify(token)
        except VerificationError as exc:
            raise _RefusedError(invalid_token(str(exc))) from None
        # One Caller per token the verifier remembers, as for JWT-SVIDs (svid.asgi).
        callers = self._access_callers
        caller = callers.get(token)
        if caller is None or caller.access is not verified:
            if len(callers) >= max(1, self._access.cache.max_entries):
                callers.clear()
            caller = _AccessTokenCaller(verified, self.audience, self._access.trust_domain)
            callers[token] = caller
        return token, caller


def _naming(challenge: bytes, param: bytes) -> bytes:
    """A Bearer challenge with one more auth-param (a bare "Bearer" takes no comma)."""
    return challenge + (b" " if challenge == b"Bearer" else b", ") + param


_FIRST_SWEEP = 64  # sessions kept before the first look for ended ones


class _Sessions:
    """The MCP sessions each task opened, to end them when the task is revoked or the verifier
    that admitted them would now refuse them for stale revocation data (through the SDK's
    session manager, as a client's DELETE would). Each is held, with the caller that opened
    it, in the middleware's open requests, where the source's revocations and the staleness
    watch find it. Ended sessions are forgotten in sweeps; until then a revocation that names
    one finds it gone and does nothing."""

    def __init__(self, server: Any, open_requests: OpenRequests) -> None:
        self._server = server
        self._open = open_requests
        self._admissions: dict[str, CallerAdmission] = {}
        self._ending: set[asyncio.Future[Any]] = set()
        self._sweep_at = _FIRST_SWEEP

    def watching(self, caller: Caller, send: Send) -> Send:
        """``send`` that keeps the session its response opens (its ``mcp-session-id``)."""
        loop = asyncio.get_running_loop()

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                for key, value in message.get("headers", ()):
                    if bytes(key).lower() == SESSION_HEADER:
                        self._track(caller, bytes(value).decode("latin-1"), loop)
            await send(message)

        return watching_send

    def track(self, caller: Caller, session_id: str) -> None:
        """Keep the session a request is made in (its first request does; later ones find it)."""
        if session_id not in self._admissions:
            self._track(caller, session_id, asyncio.get_running_loop())

    def _track(self, caller: Caller, session_id: str, loop: asyncio.AbstractEventLoop) -> None:
        if session_id in self._admissions:
            return
        if len(self._admissions) >= self._sweep_at:
            self._forget_gone()
            # The next sweep once the table has doubled: each session is looked at a bounded
            # number of times on average, however many there are (a sweep per new session
            # made opening sessions quadratic).
            self._sweep_at = max(_FIRST_SWEEP, 2 * len(self._admissions))

        def end() -> None:
            loop.call_soon_threadsafe(self._end, session_id)

        self._admissions[session_id] = self._open.admit(caller, end)

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
        log.info(
            "ending MCP session %s: its credential was revoked, or its verifier now refuses "
            "the revocation data as too old",
            session_id[:16],
        )
        # The manager's own way of ending a session (what a client's DELETE leads to).
        ending = asyncio.ensure_future(manager._discard_session(session_id, transport))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)


# --- the client side ---


class AccessTokenAuth(_ToolGrants):
    """The SDK's ``TokenVerifier`` for OAuth access tokens from svidd's authorization server
    (RFC 9068 ``at+jwt``, e.g. a task's exchanged token), checked by
    ``svid.AccessTokenVerifier``: the issuer's JWT keys and the revocations from the agent, so
    a token of an ended task is refused as soon as the agent hears of it. ``settings`` names
    svidd as this server's authorization server (RFC 9728 metadata)::

        auth = svid.mcp.AccessTokenAuth(source, issuer="https://svidd.example", resource=url)
        server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)
        uvicorn.run(auth.protect(server), port=8000)

    Served through ``protect``, every ``tools/call`` needs a token whose scope grants that tool
    (``tool:<name>``, or ``invoke_tool``), as with ``TaskAuth``: otherwise 403 with
    ``WWW-Authenticate: Bearer error="insufficient_scope", scope="tool:<name>",
    resource_metadata="..."`` (the MCP spec's scope challenge). ``every_tool=False`` checks only
    the tools marked ``@auth.require_tool``: a workload's own token (the JWT-bearer grant
    without a task) carries no scope, so it can call only the unmarked ones. And what a token
    opened ends with it: when its ``jti`` or its task is revoked, or
    (``max_revocation_staleness``) the revocation data grows too old, its open requests and SSE
    streams are closed and its MCP sessions ended. Served without ``protect``, tools are not
    checked and only the next request is refused.

    In a tool, ``get_access_token()`` is an ``OAuthAccessToken``: ``subject`` (the principal),
    ``scopes``, ``delegated`` (a task acts for the subject, which is then as declared, not
    authenticated), ``act_chain``, and in ``claims`` the ``act`` and the task id (``txn``)."""

    def __init__(
        self,
        source: SourceViews,
        *,
        issuer: str,
        resource: str,
        every_tool: bool = True,
        **options: Any,
    ) -> None:
        """Options go to ``source.access_token_verifier`` (trust_domain, leeway,
        max_revocation_staleness, ...)."""
        super().__init__(every_tool)
        self.verifier = source.access_token_verifier(issuer, resource, **options)
        self._source = source
        self._issuer = issuer
        self._resource = resource

    def protect(self, server: Any, **app_options: Any) -> ASGIApp:
        """The server's streamable HTTP app (``server.streamable_http_app(**app_options)``)
        behind svid: verified access tokens only, each tool call checked, and the open
        requests, SSE streams and MCP sessions of a revoked token or task (or on stale
        revocation data) ended."""
        self._name_unknown_marks(server)
        return _AccessTokenMiddleware(
            server.streamable_http_app(**app_options),
            server,
            self.verifier,
            str(build_resource_metadata_url(self.settings.resource_server_url)),  # type: ignore[arg-type]
            self._rule,
            audience=self._resource,
            source=self._source,
            accept_mtls=False,
        )

    @property
    def settings(self) -> AuthSettings:
        return AuthSettings(
            issuer_url=self._issuer,  # type: ignore[arg-type]  # pydantic parses it
            resource_server_url=self._resource,  # type: ignore[arg-type]
            validate_token_resource=True,
        )

    async def verify_token(self, token: str) -> OAuthAccessToken | None:
        admitted = _admitted.get()
        caller = admitted[1] if admitted is not None else None
        if (
            isinstance(caller, _AccessTokenCaller)
            and caller.audience == self._resource
            and admitted is not None
            and admitted[0] == token.strip()
        ):  # protect() verified it just now: not a second time
            verified = caller.access
        else:
            try:
                verified = self.verifier.verify(token)
            except VerificationError:
                return None
        return OAuthAccessToken(
            token=token,
            client_id=verified.client_id or verified.subject,
            scopes=sorted(verified.scopes),
            expires_at=verified.expires_at,
            resource=self._resource,
            subject=verified.subject,
            act_chain=verified.act_chain,
            # `iss` binds MCP sessions to the issuer too (the SDK's principal_components).
            claims={
                "iss": verified.issuer,
                "act": verified.claims.get("act"),  # read-only, like all it nests
                "txn": verified.task_id,
            },
        )


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


class _MemoryTokens:
    """The SDK's ``TokenStorage``, in memory: a client's token for one server, in this process."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def oauth_auth(
    task: Any,
    url: str,
    *,
    issuer: str,
    scope: str | None = None,
    storage: TokenStorage | None = None,
) -> httpx2.Auth:
    """``httpx2.Auth`` for an MCP server at ``url`` that takes svidd's access tokens
    (``AccessTokenAuth``): the SDK's own RFC 7523 client (``IdentityAssertionOAuthProvider``)
    presenting ``task``'s JWT-SVID for ``issuer`` (``task.jwt(issuer)``) to svidd's token
    endpoint there. svidd takes a task JWT-SVID once per resource; after a 403
    ``insufficient_scope`` the SDK asks again for the tool it names (a step-up), presenting a
    JWT-SVID the agent mints anew (``task.jwt(issuer, fresh=True)``: the task hands out the one
    already traded for a while), and so when its token expires; svidd refuses
    ``invalid_scope``, naming it, a tool the task's intent does not hold. ``task``: an
    ``AsyncTask`` (or a ``Task``, asked on a thread); ``scope``: ask for less than the task's
    grant (a step-up then gets the tool named as well); ``storage``: the SDK's
    ``TokenStorage`` (in memory by default)."""
    return IdentityAssertionOAuthProvider(
        server_url=url,
        storage=storage if storage is not None else _MemoryTokens(),
        # The task's own SPIFFE ID: svidd checks a client_id against the assertion's subject.
        client_id=str(task.spiffe_id),
        # The SDK's provider takes confidential clients only; svidd authenticates the client by
        # its JWT-SVID (RFC 7523 §3.1) and reads no secret.
        client_secret="unused",  # noqa: S106  (not a secret: svidd reads none)
        issuer=issuer,
        assertion_provider=UnspentAssertions(task),
        scope=scope,
    )

"""ASGI middleware that admits only verified SPIFFE callers (pure ASGI: Starlette, FastAPI, the
``mcp`` SDK's apps, any ASGI server; no dependency of its own).

    source = svid.WorkloadApiSource().start()             # or AsyncWorkloadApiSource
    app = svid.asgi.SvidAuthMiddleware(app, audience="orders-api", source=source)

    async def endpoint(request):                          # Starlette, say
        caller = svid.asgi.caller_of(request.scope)       # svid.asgi.Caller
        caller.spiffe_id, caller.claims, caller.task      # task: svid.TaskClaims or None

A request is admitted with a JWT-SVID bearer token for ``audience`` (verified by the source's
``JwtVerifier``), or else with the mTLS peer the server reports in the ASGI TLS extension
(``scope["extensions"]["tls"]``: ``client_cert_chain``, verified by the source's
``X509Verifier``). ``authorize`` then decides who may call (a SPIFFE ID, a TrustDomain, or a
callable taking the ``Caller``), and ``required_scopes`` what the request needs from a task
token (``svid.asgi.require_scopes("tool:read_ticket")``, or a rule reading the body).

Refusals follow RFC 6750: 401 with ``WWW-Authenticate: Bearer realm=...`` (plus
``error="invalid_token"`` and why, when a credential came), 403 with
``error="insufficient_scope", scope="<the scope to ask for>"``. Nothing of the request reaches
the app. A response still open when its caller's credential is revoked (its ``jti``, its task,
its peer's certificate; the source's ``on_revoked``) is ended at once: a streamed body is closed,
one not started yet becomes a 401. With verifiers that fail closed on stale revocation data
(``max_revocation_staleness``), every open response is ended as the data grows too old, and
an mTLS caller's as its issuer's CRL grows too far past its nextUpdate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from asyncio import current_task
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol, cast

from svid._caller import Caller
from svid._der import load_pem_certs
from svid._errors import SvidError, VerificationError
from svid._http_refusal import (
    Refusal,
    insufficient_scope,
    invalid_token,
    no_credentials,
    not_authorised,
    several_credentials,
)
from svid._open_requests import JWT, X509, Admitted, OpenRequests
from svid._revocation import RevocationSet, cert_key
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._staleness_watch import StalenessWatch
from svid._tls_authorize import as_authorizer, refusal
from svid._verify_jwt import JwtVerifier
from svid._verify_x509 import VerifiedX509, X509Verifier

__all__ = [
    "CALLER",
    "Caller",
    "ScopeRule",
    "SvidAuthMiddleware",
    "caller_of",
    "require_scopes",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
CallerAuthorizer = Callable[[Caller], bool]

log = logging.getLogger("svid.asgi")

CALLER = "svid.caller"  # the scope key of the verified Caller
DEFAULT_MAX_BODY = 1 << 20  # what a body-reading scope rule buffers at most


def caller_of(scope: Scope) -> Caller:
    """The verified caller of a request that SvidAuthMiddleware admitted."""
    caller = scope.get(CALLER)
    if not isinstance(caller, Caller):
        raise VerificationError("this request was not admitted by svid.asgi.SvidAuthMiddleware")
    return caller


class ScopeRule(Protocol):
    """What a request needs from the caller's task token, as scope tokens (``tool:<name>``,
    or an action). ``reads_body`` says whether ``scopes`` needs the request body."""

    def reads_body(self, scope: Scope) -> bool: ...

    def scopes(self, scope: Scope, body: bytes) -> tuple[str, ...]: ...


class _Fixed:
    def __init__(self, scopes: tuple[str, ...]) -> None:
        self._scopes = scopes

    def reads_body(self, scope: Scope) -> bool:
        return False

    def scopes(self, scope: Scope, body: bytes) -> tuple[str, ...]:
        return self._scopes


def require_scopes(*scopes: str) -> ScopeRule:
    """Every request needs all of ``scopes`` (e.g. ``svid.tool_scope("export")``, ``"read"``)."""
    if not scopes or not all(s and not any(c.isspace() for c in s) for s in scopes):
        raise ValueError("scopes must be non-empty scope tokens without whitespace")
    return _Fixed(tuple(scopes))


class _RefusedError(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


class _Served(Admitted):
    """One response in flight: what was sent, and whether a revocation ended it. It is also
    the request's entry in OpenRequests (``keys``, ``end``)."""

    __slots__ = ("_send", "_task", "done", "finished", "revoked", "started")

    def __init__(self, send: Send, task: asyncio.Task[Any], caller: Caller) -> None:
        # Admitted's fields set here: one call less per request.
        self._caller = caller
        self._cert_keys = None
        self._send = send
        self._task = task
        self.started = self.finished = self.revoked = self.done = False

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine of its own: the server's send is what the app awaits.
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        return self._send(message)

    def end(self) -> None:
        """From any thread: cancel the request on its own loop."""
        self._task.get_loop().call_soon_threadsafe(self._end)

    def _end(self) -> None:
        if not self.done and not self.revoked:
            self.revoked = True
            self._task.cancel()


class SvidAuthMiddleware:
    """Admit verified SPIFFE callers only; put the ``Caller`` in ``scope["svid.caller"]``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        audience: str,
        source: Any = None,
        jwt_verifier: JwtVerifier | None = None,
        x509_verifier: X509Verifier | None = None,
        authorize: CallerAuthorizer | SpiffeId | TrustDomain | str | None = None,
        required_scopes: ScopeRule | None = None,
        accept_mtls: bool = True,
        realm: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        """``source``: a WorkloadApiSource / AsyncWorkloadApiSource / X509Source (anything with
        ``jwt_verifier()``, ``x509_verifier()`` and ``on_revoked()``); its verifiers are used
        unless you pass your own, and its revocations end open responses. Left out, the source
        that made the verifiers you pass (``source.jwt_verifier(...)``) is followed instead."""
        if not audience:
            raise ValueError("an audience is required: the one this service's tokens name")
        if jwt_verifier is None and source is not None:
            jwt_verifier = source.jwt_verifier()
        if x509_verifier is None and source is not None and accept_mtls:
            x509_verifier = source.x509_verifier()
        if jwt_verifier is None and x509_verifier is None:
            raise ValueError("pass source= (or jwt_verifier= / x509_verifier=)")
        self.app = app
        self.audience = audience
        self.realm = realm if realm is not None else audience
        self._jwt = jwt_verifier
        self._x509 = x509_verifier if accept_mtls else None
        # The svid.tls authorizers read only .spiffe_id, which a Caller has too.
        self._authorize: CallerAuthorizer | None = (
            None if authorize is None else cast(CallerAuthorizer, as_authorizer(authorize))  # type: ignore[arg-type]
        )
        self._rule = required_scopes
        self._max_body = max_body
        self.open_requests = OpenRequests()
        # Verifiers that fail closed on stale revocation data end open requests then too.
        fresh_for = self._fresh_for()
        # An mTLS caller's chain is refused sooner when its issuer's CRL lapses: its own.
        x509 = self._x509
        chain_fresh_for = {X509: x509.revocations_fresh_for} if x509 and X509 in fresh_for else {}
        self._watch = (
            StalenessWatch(fresh_for, self.open_requests, chain_fresh_for) if fresh_for else None
        )
        self._callers: dict[str, Caller] = {}
        # Given only verifiers, the source that made them: without it no revocation reached
        # the responses still open.
        feed = source if source is not None else _feed_of(self._jwt, self._x509)
        revocations = getattr(feed, "revocations", None)
        self._revocations = revocations if isinstance(revocations, RevocationSet) else None
        self._unsubscribe: Callable[[], None] | None = None
        subscribe = getattr(feed, "on_revoked", None)
        if subscribe is not None:
            self._unsubscribe = subscribe(self.open_requests.on_revoked)

    def _fresh_for(self) -> dict[str, Callable[[], float | None]]:
        """By what admits a request (``admitted_by``), the ``revocations_fresh_for`` of each
        verifier that fails closed on stale revocation data."""
        return {
            kind: v.revocations_fresh_for
            for kind, v in ((JWT, self._jwt), (X509, self._x509))
            if v is not None and v.revocations_fresh_for() is not None
        }

    def close(self) -> None:
        """Stop following the source's revocations (open responses are no longer ended)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._watch is not None:
            self._watch.stop()

    # --- the request path ---

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):  # lifespan: nothing to authenticate
            await self.app(scope, receive, send)
            return
        seen = self._revocations_seen()
        try:
            caller = self.authenticate(scope)
            if self._rule is not None:
                receive = await self._check_scopes(caller, scope, receive)
        except _RefusedError as refused:
            await self._refuse(kind, send, refused.refusal)
            return
        scope = dict(scope)
        scope[CALLER] = caller
        await self._serve(caller, scope, receive, send, seen)

    def authenticate(self, scope: Scope) -> Caller:
        """The verified, authorised Caller of ``scope``; raises _RefusedError."""
        caller = self._bearer_caller(scope)
        if caller is None:
            caller = self._peer_caller(scope)
        if caller is None:
            raise _RefusedError(no_credentials())
        if self._authorize is not None:
            self._check_authorized(caller)
        return caller

    def _check_authorized(self, caller: Caller) -> None:
        authorize = self._authorize
        if authorize is not None:
            try:
                why = refusal(authorize, caller)
            except VerificationError as exc:
                raise _RefusedError(not_authorised(f"caller {caller.spiffe_id}: {exc}")) from None
            except Exception as exc:
                # Refused as svid.tls refuses such a peer: let out, it became the server's 500
                # (a traceback per request of any caller it trips on; debug servers show the
                # caller that traceback). Its words may be private: only the log has them.
                log.error(
                    "caller %s refused: its authorizer raised", caller.spiffe_id, exc_info=True
                )
                why = f"refused: its authorizer raised {type(exc).__name__}"
                raise _RefusedError(not_authorised(f"caller {caller.spiffe_id} {why}")) from None
            if why is not None:
                raise _RefusedError(not_authorised(f"caller {caller.spiffe_id} {why}"))

    def _bearer_caller(self, scope: Scope) -> Caller | None:
        header = _only_header(scope, b"authorization")
        if header is None:
            return None
        return self._bearer(header)[1]

    def _bearer(self, header: str) -> tuple[str, Caller]:
        """The token of an Authorization header's value, and its verified Caller."""
        token = _bearer_token(header)
        if self._jwt is None:
            raise _RefusedError(invalid_token("this service takes no bearer tokens"))
        jwt = self._jwt
        try:
            verified = jwt.verify(token, self.audience)
        except VerificationError as exc:
            raise _RefusedError(invalid_token(str(exc))) from None
        limit = jwt.cache.max_entries
        if not limit:  # the verifier remembers no token: neither does this
            return token, Caller(verified.spiffe_id, jwt=verified, audience=self.audience)
        # One Caller per token the verifier remembers (checked again above, every request):
        # what a Caller reads of its token once (its task claims, its scope) is read once.
        callers = self._callers
        caller = callers.get(token)
        if caller is None or caller.jwt is not verified:
            if len(callers) >= limit:
                callers.clear()
            caller = callers[token] = Caller(
                verified.spiffe_id, jwt=verified, audience=self.audience
            )
        return token, caller

    def _peer_caller(self, scope: Scope) -> Caller | None:
        if self._x509 is None:
            return None
        tls = (scope.get("extensions") or {}).get("tls")
        if not isinstance(tls, dict):
            return None
        chain = tls.get("client_cert_chain")
        if not chain:
            return None
        try:
            certs = [c for pem in chain for c in load_pem_certs(_bytes(pem))]
            peer: VerifiedX509 = self._x509.verify(certs)
        except (SvidError, TypeError) as exc:
            raise _RefusedError(invalid_token(f"TLS client certificate refused: {exc}")) from None
        return Caller(peer.spiffe_id, x509=peer, audience=self.audience)

    async def _check_scopes(self, caller: Caller, scope: Scope, receive: Receive) -> Receive:
        rule = self._rule
        assert rule is not None
        body = b""
        if rule.reads_body(scope):
            body, receive = await _read_body(receive, self._max_body)
        try:
            needed = rule.scopes(scope, body)
        except ValueError as exc:  # a body the rule cannot read is refused, not waved through
            raise _RefusedError(Refusal(400, "invalid_request", str(exc))) from None
        missing = caller.missing(needed)
        if missing:
            raise _RefusedError(insufficient_scope(missing))
        return receive

    def _revocations_seen(self) -> int:
        """The revocation set's version, read before a request is verified: if it is the same
        once the request is admitted, no revocation came in between (see _serve)."""
        revocations = self._revocations
        return -1 if revocations is None else revocations.version

    async def _serve(
        self, caller: Caller, scope: Scope, receive: Receive, send: Send, seen: int
    ) -> None:
        """Serve an admitted request, ended if its credential is revoked while it is open.
        ``seen``: ``_revocations_seen()`` from before the caller was verified."""
        task = current_task()
        assert task is not None
        served = _Served(send, task, caller)
        open_requests = self.open_requests
        open_requests.add(served)
        watch = self._watch
        if watch is not None:
            watch.admitted()
        cancelling = task.cancelling()
        try:
            # Revoked between verification and registration: refuse (the verifier would now).
            # The set's version moves after each change is in place, so an unchanged version
            # means nothing was revoked since before the verification.
            revocations = self._revocations
            if (
                revocations is not None
                and revocations.version != seen
                and self._still_revoked(caller)
            ):
                served.done = True
                await self._refuse(scope["type"], send, invalid_token("credential revoked"))
                return
            await self.app(scope, receive, served.send)
        except asyncio.CancelledError:
            if not served.revoked or task.uncancel() > cancelling:
                raise  # not ours: the server is cancelling the request
            await self._end_revoked(scope["type"], send, served)
        else:
            if served.revoked:  # the app swallowed our cancellation: take it back
                task.uncancel()
        finally:
            served.done = True
            open_requests.close(served)
            if watch is not None:
                watch.closed()

    def _still_revoked(self, caller: Caller) -> bool:
        revocations = self._revocations
        if revocations is None:
            return False
        # Any bearer token's: a JWT-SVID's, or an access token's (svid.mcp.AccessTokenAuth).
        jti = caller.jti
        if jti is not None and revocations.is_jti_revoked(jti):
            return True
        peer = caller.x509
        if peer is None:
            return False
        td = peer.spiffe_id.trust_domain.name
        return any(revocations.is_revoked(cert_key(td, cert)) for cert in peer.chain)

    async def _end_revoked(self, kind: str, send: Send, served: _Served) -> None:
        with contextlib.suppress(Exception):  # the client may be gone already
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            elif not served.started:
                await self._refuse(kind, send, invalid_token("credential revoked"))
            elif not served.finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse(self, kind: str, send: Send, refusal: Refusal) -> None:
        if kind == "websocket":  # policy violation; the handshake is refused
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": refusal.status,
                "headers": refusal.headers(self.realm),
            }
        )
        await send({"type": "http.response.body", "body": refusal.body()})


def _feed_of(*verifiers: JwtVerifier | X509Verifier | None) -> Any:
    """The source whose revocations feed these verifiers, if a source made one of them."""
    for verifier in verifiers:
        feed = getattr(verifier, "_revocation_feed", None)
        if feed is not None:
            return feed
    return None


def _bearer_token(header: str) -> str:
    """The token of an Authorization header's value; refused unless it is a Bearer token."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if (scheme != "Bearer" and scheme.lower() != "bearer") or not token:
        raise _RefusedError(invalid_token("the Authorization header is not a Bearer token"))
    return token


def _only_header(scope: Scope, name: bytes) -> str | None:
    """The value of the request's one header ``name``; refused when it has several."""
    size = len(name)
    found = None
    for key, value in scope.get("headers", ()):
        # Names of another length cannot match: no lowered copy of every header's name.
        if len(key) == size and (key == name or key.lower() == name):
            if found is not None:
                raise _RefusedError(several_credentials())
            found = value
    return None if found is None else bytes(found).decode("latin-1")


def _bytes(pem: Any) -> bytes:
    return pem.encode() if isinstance(pem, str) else bytes(pem)


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """The whole request body (at most ``limit`` bytes), and a receive that hands it to the app
    again before passing on whatever comes next (a disconnect)."""
    message = await receive()
    if message["type"] != "http.request":
        raise _RefusedError(Refusal(400, "invalid_request", "the request body did not arrive"))
    body = message.get("body", b"")
    if len(body) > limit:
        raise _RefusedError(Refusal(413, "invalid_request", f"request body over {limit} bytes"))
    if message.get("more_body", False):
        body = await _rest_of_body(receive, body, limit)
        message = {"type": "http.request", "body": body, "more_body": False}
    # A body in one message (the common case) is handed on as the server sent it.
    return body, _Replay(message, receive).receive


async def _rest_of_body(receive: Receive, first: bytes, limit: int) -> bytes:
    parts = [first]
    size = len(first)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _RefusedError(Refusal(400, "invalid_request", "the request body did not arrive"))
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _RefusedError(Refusal(413, "invalid_request", f"request body over {limit} bytes"))
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class _Replay:
    __slots__ = ("_first", "_receive")

    def __init__(self, first: Message, receive: Receive) -> None:
        self._first: Message | None = first
        self._receive = receive

    async def receive(self) -> Message:
        first = self._first
        if first is not None:
            self._first = None
            return first
        return await self._receive()

"""The SPIFFE Workload API servicer (SPIFFE.md §1), fed only by the in-memory cache.

This is the one place where the agent's domain errors become gRPC status codes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import struct_pb2

from agent_attestor.cache import Cache, Identity, Snapshot
from agent_attestor.caller_check import checked_caller, not_serving, open_stream
from agent_attestor.jwt_answers import JwtAnswers, answer_key, split_budget
from agent_attestor.jwt_cache import DEFAULT_MAX_BYTES, JwtCache
from agent_attestor.jwt_validate import CacheJwtValidator, unverified_claims
from agent_attestor.mint_budget import MintBudget
from agent_attestor.mint_calls import (
    MINT_FAILURE_LOG_INTERVAL,
    abort_mint_failure,
    checked_audience,
)
from agent_attestor.model import Entry, Selector
from agent_attestor.peer import Caller, CallerRegistry
from agent_attestor.signer import MintedJwt
from agent_attestor.stream_budget import StreamBudget
from agent_attestor.watchers import Watch
from svid._clock import Clock
from svid._errors import (
    AudienceError,
    ExpiredError,
    RevokedError,
    SpiffeIdError,
    VerificationError,
)
from svid._limits import audience_problem
from svid._log_throttle import KeyedThrottles
from svid._proto import workload_pb2, workload_pb2_grpc
from svid._spiffe_id import SpiffeId

log = logging.getLogger(__name__)
_Msg = TypeVar("_Msg", workload_pb2.X509BundlesResponse, workload_pb2.JWTBundlesResponse)
_REPORTED_CHARS = 2048  # a SPIFFE ID's own limit; any longer claim is not a valid one
# gRPC refuses a status message over 16 KiB as sent (percent-encoded: up to 12 bytes for a
# character outside ASCII), and the client then hears RESOURCE_EXHAUSTED instead of the code.
_DETAIL_CHARS = 1024


def _details(text: str) -> str:
    """Status details quoting what a caller sent, cut to a size gRPC carries."""
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "..."


def _reported(text: str) -> str:
    """Free text from a refused token (its claims, the reason quoting them) as an audit report
    carries it: cut, and with each lone surrogate (JSON's "\\ud800" escape, which no UTF-8
    holds) replaced, since protobuf refuses to carry one and the whole report was lost with it:
    a forged token with one in its `sub` or `jti` left no trace of its refusal."""
    cut = text[:_REPORTED_CHARS]
    return cut if cut.isascii() else cut.encode("utf-8", "replace").decode("utf-8")


def _td_key(name: str) -> str:
    return f"spiffe://{name}"


def _own_identities(entries: Sequence[Entry]) -> list[Entry]:
    """A caller's identities when it names none: its own, one per hint. A task identity is
    minted only when asked for by name; minting it here would send the task's policy an
    audience it never declared, which counts as lateral movement against the runtime."""
    hints: set[str] = set()
    chosen: list[Entry] = []
    for entry in entries:
        if entry.is_task:
            continue
        if entry.hint and entry.hint in hints:
            continue
        hints.add(entry.hint)
        chosen.append(entry)
    return chosen


class ValidationHook(Protocol):
    """Told about every ValidateJWTSVID answer (the task layer reports them for audit).
    `until`, for a token accepted: when it can no longer be validated (0 for a refusal).
    `claims_verified`: the token's signature held, so subject, jti and txn are its issuer's."""

    def __call__(
        self,
        *,
        subject: str,
        audience: list[str],
        ok: bool,
        reason: str = "",
        jti: str = "",
        txn: str = "",
        caller_id: str = "",
        until: float = 0.0,
        claims_verified: bool = False,
    ) -> None: ...


class SvidDemand(Protocol):
    """Told which entries a workload asks for (the rotator: mints missing ones first)."""

    def demand(self, entry_ids: Iterable[str]) -> None: ...


# How long a first FetchX509SVID message may wait for SVIDs being minted on demand: with none to
# send yet, until the client's own retry would come anyway; with some, briefly, so that the first
# message usually carries every identity and a partial one is only the fallback.
FIRST_MESSAGE_WAIT = 5.0
PARTIAL_WAIT = 0.5


class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(
        self,
        cache: Cache,
        registry: CallerRegistry,
        jwts: JwtCache,
        clock: Clock,
        *,
        on_call: Callable[[str], None] | None = None,
        on_validate: ValidationHook | None = None,
        demand: SvidDemand | None = None,
        first_wait: float = FIRST_MESSAGE_WAIT,
        answer_bytes: int = split_budget(DEFAULT_MAX_BYTES)[1],
        streams: StreamBudget | None = None,
        mints: MintBudget | None = None,
    ) -> None:
        # Shared with the other services on the socket that stream (the revocation Watch).
        self.streams = streams or StreamBudget(clock)
        self.mints = mints or MintBudget(clock)
        self._demand = demand
        self._first_wait = first_wait
        self._on_call = on_call or (lambda _method: None)
        self._on_validate = on_validate
        self._cache = cache
        self._registry = registry
        self._jwts = jwts
        self._clock = clock
        self._validator = CacheJwtValidator(cache, clock)
        self._answers = JwtAnswers(jwts, answer_bytes)
        self._mint_failures = KeyedThrottles(MINT_FAILURE_LOG_INTERVAL, clock)

    # ---- shared checks -------------------------------------------------------------------

    async def _caller(self, context: grpc.aio.ServicerContext, method: str) -> Caller:
        self._on_call(method)
        return await checked_caller(context, self._registry)

    async def _ready(self, context: grpc.aio.ServicerContext) -> Snapshot:
        snap = self._cache.snapshot()
        problem = not_serving(snap)
        if problem is not None:
            await context.abort(*problem)
        return snap

    @staticmethod
    async def _not_refused(context: grpc.aio.ServicerContext, snap: Snapshot) -> None:
        """Checked by every call and on every stream wake-up: an evicted or banned agent ends
        open streams at once rather than leaving workloads on what it can no longer back."""
        if snap.refused:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, snap.refused)

    async def _entitled(
        self, context: grpc.aio.ServicerContext, snap: Snapshot, caller: Caller
    ) -> list[Entry]:
        entries = snap.entries_for(caller.selectors)
        if not entries:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        return entries

    # ---- X.509 -----------------------------------------------------------------------------

    @staticmethod
    def _x509_response(snap: Snapshot, ids: list[Identity]) -> workload_pb2.X509SVIDResponse:
        bundles = snap.all_bundles()
        svids = []
        for ident in ids:
            td = ident.svid.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
            bundle = bundles.get(td)
            svids.append(
                workload_pb2.X509SVID(
                    spiffe_id=ident.svid.spiffe_id,
                    x509_svid=ident.svid.chain_der,
                    x509_svid_key=ident.svid.key_der,
                    bundle=bundle.x509_der if bundle is not None else b"",
                    hint=ident.entry.hint,
                )
            )
        return workload_pb2.X509SVIDResponse(
            svids=svids,
            crl=list(snap.crl),
            federated_bundles={
                _td_key(td): b.x509_der
                for td, b in snap.federated_for(i.entry for i in ids).items()
            },
        )

    async def _await_first(
        self, watch: Watch, selectors: frozenset[Selector], pending: list[str]
    ) -> None:
        """Before the first message: ask for the caller's missing SVIDs and wait until they
        land, or until the deadline (shorter when there is something to send already)."""
        if self._demand is None:
            return
        self._demand.demand(pending)
        loop = asyncio.get_running_loop()
        has_some = len(pending) < len(watch.entry_ids)
        deadline = loop.time() + (
            min(self._first_wait, PARTIAL_WAIT) if has_some else self._first_wait
        )
        while pending and (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(watch.signal.wait(watch.signal.version), left)
            except TimeoutError:
                return
            snap = self._cache.snapshot()
            if snap.refused:
                return
            pending = snap.awaiting(selectors, self._clock.now())

    async def FetchX509SVID(  # noqa: N802 - gRPC method name
        self, request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        caller = await self._caller(context, "FetchX509SVID")
        await self._ready(context)
        await open_stream(context, self.streams, caller)
        watch = self._cache.watchers.open(caller.selectors)
        try:
            first = self._cache.snapshot().awaiting(caller.selectors, self._clock.now())
            if first:
                await self._await_first(watch, caller.selectors, first)
            sent: workload_pb2.X509SVIDResponse | None = None
            sent_ids: frozenset[str] = frozenset()  # the entries whose SVIDs `sent` carries
            while True:
                seen = watch.signal.version
                snap = self._cache.snapshot()
                await self._not_refused(context, snap)
                now = self._clock.now()
                ids = snap.identities_for(caller.selectors, now)
                pending = snap.awaiting(caller.selectors, now)
                if self._demand is not None:
                    # Keeps what this caller uses among the most recently used (a capped
                    # agent's LRU), and asks for what it lacks.
                    self._demand.demand(watch.entry_ids)
                if not ids:
                    if sent is None:
                        if pending:
                            await context.abort(
                                grpc.StatusCode.UNAVAILABLE, "SVIDs are being issued; retry"
                            )
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
                    elif not sent_ids <= set(pending):
                        # One sent is revoked or removed: the workload must drop it, and with
                        # nothing left to send (an empty list chokes clients) only ending the
                        # stream says so; another entry awaiting its SVID is no reason to wait.
                        # One merely awaiting renewal keeps the stream: its SVID comes next.
                        await context.abort(
                            grpc.StatusCode.PERMISSION_DENIED, "no identity issued any more"
                        )
                else:
                    msg = self._x509_response(snap, ids)
                    if msg != sent:
                        yield msg
                        sent = msg
                        sent_ids = frozenset(i.entry.id for i in ids)
                await watch.signal.wait(seen)
        finally:
            self._cache.watchers.close(watch)
            self.streams.give_back(caller.uid)

    async def _bundle_stream(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        build: Callable[[Snapshot, list[Entry]], _Msg],
    ) -> AsyncIterator[_Msg]:
        """A bundle stream: the first message at once, then one whenever what `build` makes of
        the cache changes; ended with PERMISSION_DENIED once the caller holds no identity."""
        caller = await self._caller(context, method)
        snap = await self._ready(context)
        await self._entitled(context, snap, caller)
        await open_stream(context, self.streams, caller)
        watch = self._cache.watchers.open(caller.selectors)
        try:
            sent: _Msg | None = None
            while True:
                seen = watch.signal.version
                snap = self._cache.snapshot()
                await self._not_refused(context, snap)
                if not watch.entry_ids:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
                msg = build(snap, snap.entries_for(caller.selectors))
                if msg != sent:
                    yield msg
                    sent = msg
                await watch.signal.wait(seen)
        finally:
            self._cache.watchers.close(watch)
            self.streams.give_back(caller.uid)

    async def FetchX509Bundles(  # noqa: N802 - gRPC method name
        self, request: workload_pb2.X509BundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        def build(snap: Snapshot, entries: list[Entry]) -> workload_pb2.X509BundlesResponse:
            return workload_pb2.X509BundlesResponse(
                crl=list(snap.crl),
                bundles={_td_key(td): b.x509_der for td, b in snap.bundles_for(entries).items()},
            )

        # grpc.aio streams from async generator methods only: re-yield.
        async for msg in self._bundle_stream(context, "FetchX509Bundles", build):
            yield msg

    # ---- JWT -------------------------------------------------------------------------------

    async def FetchJWTSVID(  # noqa: N802 - gRPC method name
        self, request: workload_pb2.JWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> workload_pb2.JWTSVIDResponse:
        # The agent's hot path. The same request again is answered with what was built for it
        # (jwt_answers says until when); else every step is a plain check that awaits only to
        # abort or mint. The header and the caller are checked on every call either way.
        caller = await self._caller(context, "FetchJWTSVID")
        snap = self._cache.snapshot()
        key = answer_key(caller.selectors, request)
        ready = self._answers.get(key, snap)
        if ready is not None:
            return ready
        generation = self._jwts.generation
        audience = await checked_audience(context, request.audience)
        if request.spiffe_id:
            try:
                SpiffeId.parse(request.spiffe_id)
            except SpiffeIdError as exc:  # as SPIRE: the request's fault, not entitlement's
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(f"spiffe_id: {exc}"))
        problem = not_serving(snap)
        if problem is not None:
            await context.abort(*problem)
        entries = snap.index.match(caller.selectors)
        if not entries:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        if request.spiffe_id:
            chosen = [e for e in entries if e.spiffe_id == request.spiffe_id][:1]
            if not chosen:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"caller is not entitled to {request.spiffe_id!r}",
                )
        else:
            chosen = _own_identities(entries)
            if not chosen:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "no identity issued but task identities: name one in spiffe_id",
                )
        reply = workload_pb2.JWTSVIDResponse()
        add = reply.svids.add
        tokens = []
        for entry in chosen:
            jwt = self._jwts.cached(entry.spiffe_id, audience, entry.id, snap.revoked_jtis)
            if jwt is None:
                jwt = await self._mint(context, entry, audience, caller.uid)
            token_key = JwtCache.key(entry.spiffe_id, audience, entry.id)
            # The JWT cache's refresh point (its monotonic clock): not one read from the token.
            tokens.append((token_key, jwt, self._jwts.refresh_at(token_key, jwt)))
            # An empty hint left out: upb pays for every keyword, set or not.
            if entry.hint:
                add(spiffe_id=entry.spiffe_id, svid=jwt.token, hint=entry.hint)
            else:
                add(spiffe_id=entry.spiffe_id, svid=jwt.token)
        self._answers.put(key, snap, generation, reply, tokens, uid=caller.uid)
        return reply

    async def _mint(
        self, context: grpc.aio.ServicerContext, entry: Entry, audience: list[str], uid: int
    ) -> MintedJwt:
        """A token not in the cache: minted by the server (once, however many callers wait),
        and kept in the share of the caller's uid.

        Only a mint started costs the caller's budget: it is what the server's per-agent limit
        counts, and what one workload could spend for all the others. A caller waiting for a
        mint already out costs nothing: charged too, a burst of one uid's callers asking for
        the same new audience at once was refused past the burst for a token minted once."""
        try:
            return await self._jwts.get(
                entry.spiffe_id, audience, entry.id, uid, lambda: self.mints.take(uid)
            )
        except Exception as exc:
            await abort_mint_failure(context, exc, self._mint_failures)
        raise AssertionError("abort() raises")  # pragma: no cover

    async def FetchJWTBundles(  # noqa: N802 - gRPC method name
        self, request: workload_pb2.JWTBundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        convert = self._validator.bundles.convert

        def build(snap: Snapshot, entries: list[Entry]) -> workload_pb2.JWTBundlesResponse:
            bundles = snap.bundles_for(entries)
            return workload_pb2.JWTBundlesResponse(
                bundles={_td_key(td): convert(b).to_jwks() for td, b in bundles.items()}
            )

        async for msg in self._bundle_stream(context, "FetchJWTBundles", build):
            yield msg

    def _report(
        self,
        snap: Snapshot,
        caller: Caller,
        request: workload_pb2.ValidateJWTSVIDRequest,
        claims: dict[str, Any],
        failure: str,
        *,
        until: float = 0.0,
        verified: bool = True,
    ) -> None:
        """`verified`: `claims` were signed by their issuer (checked), else anyone's words."""
        if self._on_validate is None:
            return
        entries = snap.entries_for(caller.selectors)

        def text(name: str) -> str:
            # A refused token's claims are the sender's words: bounded, or one caller could
            # queue gigabytes for the audit log (a token may be up to 64 KiB).
            value = claims.get(name)
            return _reported(value) if isinstance(value, str) else ""

        try:
            self._on_validate(
                subject=text("sub"),
                audience=[request.audience],
                ok=not failure,
                reason=_reported(failure),
                jti=text("jti"),
                txn=text("txn"),
                caller_id=entries[0].spiffe_id if entries else "",
                until=until,
                claims_verified=verified,
            )
        except Exception as exc:  # auditing must never change the answer
            log.warning("validation hook failed", extra={"error": str(exc)})

    async def ValidateJWTSVID(  # noqa: N802 - gRPC method name
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        caller = await self._caller(context, "ValidateJWTSVID")
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        # Only its size: a token of another issuer may name an audience with a comma, and
        # checking it mints nothing.
        too_big = audience_problem([request.audience], commas=True)
        if too_big:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, too_big)
        snap = await self._ready(context)
        # SPIFFE.md §1, as FetchJWTBundles: a caller holding no identity gets no bundle, so none
        # of its tokens checked against one (nor an audit record naming no caller).
        await self._entitled(context, snap, caller)
        try:
            result = self._validator.validate(request.svid, request.audience)
        except VerificationError as exc:  # ExpiredError and RevokedError included
            # Those three are raised once the signature held: the claims are the issuer's (a
            # task's genuine token presented to another audience, a replay, is the task's to
            # answer for). Any other refusal may be of a forged token, whose sub, jti and txn
            # name whoever its sender likes (another workload, another task): reported as
            # unverified, so that the audit log does not file the refusal under them.
            self._report(
                snap,
                caller,
                request,
                unverified_claims(request.svid),
                str(exc),
                verified=isinstance(exc, ExpiredError | RevokedError | AudienceError),
            )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, _details(f"token is invalid: {exc}")
            )
        td = result.spiffe_id.trust_domain.name
        if td not in snap.bundles_for(snap.entries_for(caller.selectors)):
            # The cache holds every foreign bundle any local workload federates with; a caller
            # whose entries do not federate with this one must not get its tokens accepted.
            failure = f"trust domain {td} is not one this workload federates with"
            self._report(snap, caller, request, dict(result.claims), failure)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token is invalid: {failure}")
        claims = struct_pb2.Struct()
        try:
            claims.update(dict(result.claims))
        except (ValueError, TypeError, OverflowError):
            # A signed token may hold a JSON number no double can carry (10**400): a Struct
            # cannot, and SPIRE's JSON decoder refuses such a token too.
            failure = "its claims hold a value a protobuf Struct cannot carry"
            self._report(snap, caller, request, dict(result.claims), failure)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token is invalid: {failure}")
        until = self._validator.usable_until(result)
        self._report(snap, caller, request, dict(result.claims), "", until=until)
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(result.spiffe_id), claims=claims)

"""The node API servicer: attestation, agent SVID renewal, the Sync push stream, SVID signing.

Transport only: identity comes from server.peer, entitlement from server.entitlement, errors
become status codes in server.status. Signing runs in thread pools so Sync streams and
attestations stay responsive while a large batch is signed; big batches of workload JWTs are
minted in worker processes (server.ca.jwt_workers).
"""

# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import grpc
from cryptography import x509

from server import status
from server.attestation.base import AttestationResult, NodeAttestor
from server.ca.jwt_workers import JwtWorkers, MintRequest
from server.ca.manager import CaManager
from server.ca.signer import (
    IssuedJwt,
    IssuedSvid,
    X509Signer,
    check_jwt_request,
    csr_public_key,
    verify_csr,
)
from server.convert import bundle_to_proto, entry_to_proto, revocation_to_proto
from server.datastore.records import AttestedAgent, Entry
from server.entitlement import Entitlement, entitled_entries
from server.errors import (
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    UnavailableError,
)
from server.events import ChangeNotifier
from server.ids import ServerIds
from server.metrics import Metrics
from server.peer import PeerCache, peer_host
from server.ratelimit import KeyedLimiter
from server.state import ServerState
from server.tasks.wiring import NodeHooks
from svid._clock import Clock
from svid._der import der_concat
from svid._errors import SvidError
from svid._limits import audience_problem
from svid._proto import common_pb2, node_pb2, node_pb2_grpc
from svid._spiffe_id import SpiffeId

_log = logging.getLogger("svid.server.node")
_P = ParamSpec("_P")
_R = TypeVar("_R")
MAX_BATCH = 1000
_ATTEST_LIMITED = "attestation rate limit exceeded for this host; retry later"


@dataclass(frozen=True)
class NodeSettings:
    default_x509_svid_ttl: int = 300
    default_jwt_svid_ttl: int = 300
    agent_svid_ttl: int = 3600
    attest_timeout: float = 30.0


@dataclass(frozen=True)
class Limiters:
    x509: KeyedLimiter
    jwt: KeyedLimiter
    attest: KeyedLimiter


Chain = tuple[x509.Certificate, ...]


def _serial_hex(chain: Chain) -> str:
    return format(chain[0].serial_number, "x")


def _expires(chain: Chain) -> int:
    return int(chain[0].not_valid_after_utc.timestamp())


class NodeServicer(node_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        state: ServerState,
        ca: CaManager,
        ids: ServerIds,
        attestors: Mapping[str, NodeAttestor],
        settings: NodeSettings,
        limiters: Limiters,
        clock: Clock,
        metrics: Metrics,
        executor: Executor,
        jwt_executor: Executor | None = None,
        jwt_workers: JwtWorkers | None = None,
        hooks: NodeHooks | None = None,
    ) -> None:
        self._state = state
        self._ca = ca
        self._ids = ids
        self._attestors = dict(attestors)
        self._settings = settings
        self._limits = limiters
        self._clock = clock
        self._metrics = metrics
        self._executor = executor
        # Workload JWT batches: a thread per mint worker (ServerConfig.jwt_mint_processes).
        self._jwt_executor = jwt_executor or executor
        self._jwt_workers = jwt_workers or JwtWorkers(0, clock)
        # The task layer: audit, issuance records, task JWT decisions, the CRL.
        self._hooks = hooks
        self._peers = PeerCache(ids)
        # Label lookups cost as much as the rest of a JWT's bookkeeping: bind them once.
        self._x509_seconds = metrics.signing_seconds.labels(kind="x509")
        self._jwt_seconds = metrics.signing_seconds.labels(kind="jwt")
        self._x509_issued = metrics.svids_issued.labels(kind="x509")
        self._jwt_issued = metrics.svids_issued.labels(kind="jwt")
        self._server_id = str(ids.server)
        self._entitled_cache: dict[tuple[str, tuple[object, ...], int], Entitlement] = {}
        self._entitled_index: object = None

    def on_error(self, code: grpc.StatusCode) -> None:
        self._metrics.record_error(code)

    async def _run(
        self, executor: Executor, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs
    ) -> _R:
        """Run CPU-bound signing in a pool: Sync streams stay responsive meanwhile."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    def _bundle_proto(self) -> common_pb2.Bundle:
        return bundle_to_proto(self._state.bundle, self._state.jwt_expiry)

    def _sign_agent_svid(self, csr: x509.CertificateSigningRequest, agent_id: SpiffeId) -> Chain:
        started = time.perf_counter()
        chain = tuple(
            self._ca.x509_signer().sign_svid(csr, agent_id, self._settings.agent_svid_ttl)
        )
        self._metrics.signing_seconds.labels(kind="agent").observe(time.perf_counter() - started)
        self._metrics.svids_issued.labels(kind="agent").inc()
        return chain

    def _agent_svid(self, agent_id: SpiffeId, chain: Chain) -> node_pb2.AgentSVID:
        return node_pb2.AgentSVID(
            spiffe_id=str(agent_id),
            cert_chain=der_concat(chain),
            expires_at=_expires(chain),
            bundle=self._bundle_proto(),
        )

    # -- Attest -------------------------------------------------------------------------------

    @status.unary
    async def Attest(  # type: ignore[override]
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        within_budget = self._limits.attest.try_take(peer_host(context))
        first = await _read_step(context, self._settings.attest_timeout)
        if first is grpc.aio.EOF or first.WhichOneof("step") != "params":
            raise InvalidRequestError("attest: the first message must carry params")
        params = first.params
        kind = params.data.type
        attestor = self._attestors.get(kind)
        if attestor is None:
            enabled = ", ".join(sorted(self._attestors)) or "none"
            raise InvalidRequestError(
                f"attest: attestation type {kind!r} is not enabled (enabled: {enabled})"
            )
        # A host over its budget is refused before any work, unless the attestor checks as
        # cheaply as it refuses (join_token): then a genuine attempt from a host that others
        # flood with guesses (the same node, a NAT) still succeeds, and only the failures are
        # answered as over the limit.
        if not within_budget and not attestor.checks_cheaply:
            raise RateLimitedError(_ATTEST_LIMITED)
        csr = verify_csr(params.csr)

        async def challenge(nonce: bytes) -> bytes:
            await context.write(node_pb2.AttestResponse(challenge=nonce))
            answer = await _read_step(context, self._settings.attest_timeout)
            if answer is grpc.aio.EOF or answer.WhichOneof("step") != "challenge_response":
                raise InvalidRequestError("attest: expected a challenge_response")
            return bytes(answer.challenge_response)

        try:
            result = await attestor.attest(bytes(params.data.payload), challenge)
            previous = self._admit(result)
        except Exception as exc:
            self._metrics.attestations.labels(type=kind, result="refused").inc()
            if self._hooks is not None:
                self._hooks.attestation_refused(kind, str(exc)[:500])
            if not within_budget:
                raise RateLimitedError(_ATTEST_LIMITED) from None
            raise
        chain = await self._run(self._executor, self._sign_agent_svid, csr, result.agent_id)
        agent = AttestedAgent(
            spiffe_id=str(result.agent_id),
            attestation_type=result.attestation_type,
            serial=_serial_hex(chain),
            expires_at=_expires(chain),
            banned=False,
            attested_at=int(self._clock.now()),
            selectors=result.selectors,
        )
        await self._state.save_agent(agent, previous)
        if self._hooks is not None:
            self._hooks.attested(agent.spiffe_id, kind, agent.serial)
        self._metrics.attestations.labels(type=kind, result="ok").inc()
        _log.info("agent attested", extra={"agent_id": agent.spiffe_id, "type": kind})
        await context.write(
            node_pb2.AttestResponse(result=self._agent_svid(result.agent_id, chain))
        )

    def _admit(self, result: AttestationResult) -> AttestedAgent | None:
        existing = self._state.agents.get(str(result.agent_id))
        if existing is None:
            return None
        if existing.banned:
            raise PermissionDeniedError(f"agent {result.agent_id} is banned")
        if not result.can_reattest:
            raise PermissionDeniedError(
                f"agent {result.agent_id} is already attested; evict it before attesting again"
            )
        return existing

    # -- RenewAgent ---------------------------------------------------------------------------

    @status.unary
    async def RenewAgent(  # type: ignore[override]
        self, request: node_pb2.RenewAgentRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.RenewAgentResponse:
        peer = self._peers.agent_peer(context)
        agent = self._state.authorize_agent(peer.spiffe_id, peer.serial)
        if not self._limits.x509.try_take(peer.spiffe_id):
            raise RateLimitedError(f"X.509 signing rate limit exceeded for {peer.spiffe_id}")
        csr = verify_csr(request.csr)
        agent_id = SpiffeId.parse(agent.spiffe_id)
        chain = await self._run(self._executor, self._sign_agent_svid, csr, agent_id)
        renewed = AttestedAgent(
            spiffe_id=agent.spiffe_id,
            attestation_type=agent.attestation_type,
            serial=_serial_hex(chain),
            expires_at=_expires(chain),
            banned=False,
            attested_at=agent.attested_at,
            selectors=agent.selectors,
        )
        await self._state.save_agent(renewed, agent)
        _log.info("agent SVID renewed", extra={"agent_id": agent.spiffe_id})
        return node_pb2.RenewAgentResponse(svid=self._agent_svid(agent_id, chain))

    # -- Sync ---------------------------------------------------------------------------------

    def _entitled(self, agent: AttestedAgent) -> Entitlement:
        # Memoised per entry snapshot (replaced on every write) and per second (expiry).
        index = self._state.entries
        if index is not self._entitled_index:
            self._entitled_cache = {}
            self._entitled_index = index
        now = int(self._clock.now())
        key = (agent.spiffe_id, agent.selectors, now)
        found = self._entitled_cache.get(key)
        if found is None:
            if len(self._entitled_cache) > 10_000:
                self._entitled_cache = {}
            found = Entitlement.of(
                entitled_entries(index, agent.spiffe_id, agent.selectors, self._server_id, now)
            )
            self._entitled_cache[key] = found
        return found

    async def _next_change(self, notifier: ChangeNotifier, seen: int, entitled: Entitlement) -> int:
        """Wait for a committed change, or for the next entry of this agent to expire."""
        expiries = [e.expires_at for e in entitled.entries if e.expires_at]
        if not expiries:
            return await notifier.wait_beyond(seen)
        delay = max(0.05, min(expiries) - self._clock.now())
        try:
            return await asyncio.wait_for(notifier.wait_beyond(seen), timeout=delay)
        except TimeoutError:
            return seen

    def _sync_update(self, entitled: Entitlement) -> node_pb2.SyncUpdate:
        return node_pb2.SyncUpdate(
            entries=[entry_to_proto(e) for e in entitled.entries],
            bundle=self._bundle_proto(),
            revocations=[revocation_to_proto(r) for r in self._state.revocations],
            crl=self._hooks.crl() if self._hooks is not None else [],
        )

    @status.stream
    async def Sync(  # type: ignore[override]
        self, request: node_pb2.SyncRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.SyncUpdate]:
        peer = self._peers.agent_peer(context)
        notifier = self._state.notifier
        seen = notifier.version
        last: node_pb2.SyncUpdate | None = None
        self._metrics.sync_streams.inc()
        try:
            while True:
                if self._state.shutting_down:
                    raise UnavailableError("server is shutting down; reconnect")
                # Eviction and bans end the stream with PERMISSION_DENIED right here.
                agent = self._state.authorize_agent(peer.spiffe_id, peer.serial)
                entitled = self._entitled(agent)
                update = self._sync_update(entitled)
                if update != last:
                    last = update
                    sent = node_pb2.SyncUpdate()
                    sent.CopyFrom(update)
                    sent.revision = self._state.revision
                    yield sent
                seen = await self._next_change(notifier, seen, entitled)
        finally:
            self._metrics.sync_streams.dec()

    # -- BatchNewX509SVID ---------------------------------------------------------------------

    def _entitled_entry(self, agent_id: str, entitled: Entitlement, entry_id: str) -> Entry:
        entry = entitled.by_id.get(entry_id)
        if entry is not None:
            return entry
        if entry_id in self._state.entries.by_id:
            raise PermissionDeniedError(f"entry {entry_id} is not entitled to agent {agent_id}")
        raise NotFoundError(f"entry {entry_id[:80]!r} not found")

    def _sign_x509(
        self, signer: X509Signer, entitled: Entitlement, entry: Entry, csr: bytes
    ) -> IssuedSvid:
        started = time.perf_counter()
        issued = signer.issue(
            csr_public_key(csr),
            entitled.parsed_ids[entry.id],
            entry.x509_svid_ttl or self._settings.default_x509_svid_ttl,
            entry.dns_names,
        )
        self._x509_seconds.observe(time.perf_counter() - started)
        return issued

    def _sign_x509_batch(
        self, params: list[node_pb2.X509SVIDParams], entitled: Entitlement, agent_id: str
    ) -> node_pb2.BatchNewX509SVIDResponse:
        signer = self._ca.x509_signer()
        # The reply is built here, in the pool, field by field: building result messages and
        # then the response copied each one twice, on the event loop for the second copy.
        response = node_pb2.BatchNewX509SVIDResponse()
        results = response.results
        records = []
        for item in params:
            try:
                entry = self._entitled_entry(agent_id, entitled, item.entry_id)
                svid = self._sign_x509(signer, entitled, entry, item.csr)
            except SvidError as exc:  # the server's own errors are SvidErrors too
                results.add(entry_id=item.entry_id, error=_item_status(exc))
                continue
            records.append((entry.spiffe_id, svid.serial_hex, svid.expires_at))
            results.add(
                entry_id=entry.id,
                spiffe_id=entry.spiffe_id,
                cert_chain=svid.chain_der,
                expires_at=svid.expires_at,
            )
        if records and self._hooks is not None:
            # Recorded once per batch, before any of it is sent: if recording fails, the call
            # fails and none of these SVIDs leaves the server.
            self._hooks.x509_issued(agent_id, records)
        self._x509_issued.inc(len(records))
        return response

    @status.unary
    async def BatchNewX509SVID(  # type: ignore[override]
        self, request: node_pb2.BatchNewX509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.BatchNewX509SVIDResponse:
        peer = self._peers.agent_peer(context)
        agent = self._state.authorize_agent(peer.spiffe_id, peer.serial)
        params = list(request.params)
        _check_batch_size("params", len(params))
        if not self._limits.x509.try_take(agent.spiffe_id, len(params)):
            raise RateLimitedError(f"X.509 signing rate limit exceeded for {agent.spiffe_id}")
        return await self._run(
            self._executor, self._sign_x509_batch, params, self._entitled(agent), agent.spiffe_id
        )

    # -- NewJWTSVID ---------------------------------------------------------------------------

    def _jwt_entry(
        self, agent_id: str, entitled: Entitlement, request: node_pb2.NewJWTSVIDRequest
    ) -> tuple[Entry, list[str]]:
        audience = list(request.audience)
        if not audience or any(not a for a in audience):
            raise InvalidRequestError("audience: at least one non-empty audience is required")
        too_big = audience_problem(audience)
        if too_big:
            raise InvalidRequestError(too_big)
        if request.entry_id:
            return self._entitled_entry(agent_id, entitled, request.entry_id), audience
        if not request.spiffe_id:
            raise InvalidRequestError("spiffe_id: required (or entry_id)")
        entry = entitled.by_spiffe_id.get(request.spiffe_id)
        if entry is None:
            wanted = SpiffeId.parse(request.spiffe_id)  # a malformed ID is INVALID_ARGUMENT
            raise PermissionDeniedError(f"{wanted} is not an identity agent {agent_id} may serve")
        return entry, audience

    def _is_task(self, entry: Entry) -> bool:
        return self._hooks is not None and self._hooks.is_task(entry)

    def _workload_request(
        self, entitled: Entitlement, entry: Entry, audience: list[str]
    ) -> MintRequest:
        ttl = entry.jwt_svid_ttl or self._settings.default_jwt_svid_ttl
        sub, audiences = check_jwt_request(entitled.parsed_ids[entry.id], audience, ttl)
        return sub, audiences, ttl

    def _mint_jwt(
        self, entitled: Entitlement, entry: Entry, audience: list[str], agent_id: str
    ) -> IssuedJwt:
        hooks = self._hooks
        if hooks is not None and hooks.is_task(entry):
            # A task identity: policy decides this mint again and adds the task claims.
            started = time.perf_counter()
            issued = hooks.mint_task_jwt(agent_id, entry, audience)
            self._jwt_seconds.observe(time.perf_counter() - started)
            return issued
        # One JWT is below JwtWorkers.MIN_BATCH: minted in this thread, never a round trip.
        (outcome,) = self._mint_workload([self._workload_request(entitled, entry, audience)])
        if isinstance(outcome, SvidError):
            raise outcome
        if hooks is not None:
            hooks.jwts_issued(agent_id, [(entry.spiffe_id, outcome, audience)])
        return outcome

    def _sign_jwt(
        self, entitled: Entitlement, entry: Entry, audience: list[str], agent_id: str
    ) -> node_pb2.NewJWTSVIDResponse:
        issued = self._mint_jwt(entitled, entry, audience, agent_id)
        return node_pb2.NewJWTSVIDResponse(
            token=issued.token, issued_at=int(issued.issued_at), expires_at=int(issued.expires_at)
        )

    @status.unary
    async def NewJWTSVID(  # type: ignore[override]
        self, request: node_pb2.NewJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.NewJWTSVIDResponse:
        peer = self._peers.agent_peer(context)
        agent = self._state.authorize_agent(peer.spiffe_id, peer.serial)
        entitled = self._entitled(agent)
        entry, audience = self._jwt_entry(agent.spiffe_id, entitled, request)
        if not self._limits.jwt.try_take(agent.spiffe_id):
            raise RateLimitedError(f"JWT signing rate limit exceeded for {agent.spiffe_id}")
        if self._is_task(entry):
            # A policy decision and a durable record: off the event loop.
            reply = await self._run(
                self._executor, self._sign_jwt, entitled, entry, audience, agent.spiffe_id
            )
        else:
            # One ES256 signature is cheaper than a hop to the thread pool: sign on the loop.
            reply = self._sign_jwt(entitled, entry, audience, agent.spiffe_id)
        self._jwt_issued.inc()
        return reply

    def _sign_jwt_batch(
        self, requests: list[node_pb2.NewJWTSVIDRequest], entitled: Entitlement, agent_id: str
    ) -> node_pb2.BatchNewJWTSVIDResponse:
        # Every item is checked here first; task JWTs are minted here too (policy decides each
        # one and records its own decision), workload JWTs all at once (_mint_workload). They
        # are handed to the recorder once per batch, like X.509-SVIDs, before any is sent.
        outcomes: list[IssuedJwt | SvidError | int] = []
        wanted: list[MintRequest] = []
        owners: list[tuple[str, list[str]]] = []
        for item in requests:
            try:
                entry, audience = self._jwt_entry(agent_id, entitled, item)
                if self._is_task(entry):
                    outcomes.append(self._mint_jwt(entitled, entry, audience, agent_id))
                    continue
                request = self._workload_request(entitled, entry, audience)
            except SvidError as exc:  # the server's own errors are SvidErrors too
                outcomes.append(exc)
                continue
            outcomes.append(len(wanted))  # filled in from the workload mint below
            wanted.append(request)
            owners.append((entry.spiffe_id, audience))
        workload = self._mint_workload(wanted) if wanted else []
        response = node_pb2.BatchNewJWTSVIDResponse()
        results = response.results
        minted: list[tuple[str, IssuedJwt, list[str]]] = []
        issued = 0
        for planned in outcomes:
            outcome: IssuedJwt | SvidError
            if isinstance(planned, int):
                outcome = workload[planned]
                if isinstance(outcome, IssuedJwt):
                    spiffe_id, audience = owners[planned]
                    minted.append((spiffe_id, outcome, audience))
            else:
                outcome = planned
            if isinstance(outcome, IssuedJwt):
                svid = results.add().svid
                svid.token = outcome.token
                svid.issued_at = int(outcome.issued_at)
                svid.expires_at = int(outcome.expires_at)
                issued += 1
            else:
                results.add(error=_item_status(outcome))
        if minted and self._hooks is not None:
            self._hooks.jwts_issued(agent_id, minted)
        self._jwt_issued.inc(issued)
        return response

    def _mint_workload(self, wanted: list[MintRequest]) -> list[IssuedJwt | SvidError]:
        """Workload JWTs for checked requests: in a worker process when the batch is big."""
        signer = self._ca.jwt_signer()
        started = time.perf_counter()
        out = self._jwt_workers.mint(signer, wanted)
        # One batch is one timing: each of its SVIDs took the mean of it.
        each = (time.perf_counter() - started) / len(wanted)
        observe = self._jwt_seconds.observe
        for _ in wanted:
            observe(each)
        return out

    @status.unary
    async def BatchNewJWTSVID(  # type: ignore[override]
        self, request: node_pb2.BatchNewJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.BatchNewJWTSVIDResponse:
        peer = self._peers.agent_peer(context)
        agent = self._state.authorize_agent(peer.spiffe_id, peer.serial)
        requests = list(request.requests)
        _check_batch_size("requests", len(requests))
        if not self._limits.jwt.try_take(agent.spiffe_id, len(requests)):
            raise RateLimitedError(f"JWT signing rate limit exceeded for {agent.spiffe_id}")
        return await self._run(
            self._jwt_executor,
            self._sign_jwt_batch,
            requests,
            self._entitled(agent),
            agent.spiffe_id,
        )


async def _read_step(context: grpc.aio.ServicerContext, timeout: float) -> node_pb2.AttestRequest:
    """The agent's next Attest message; a silent peer does not hold the handler forever."""
    try:
        return await asyncio.wait_for(context.read(), timeout=timeout)
    except TimeoutError:
        raise InvalidRequestError(
            f"attest: no message from the agent within {timeout:g} s"
        ) from None


def _check_batch_size(field: str, size: int) -> None:
    if not size:
        raise InvalidRequestError(f"{field}: at least one item is required")
    if size > MAX_BATCH:
        raise InvalidRequestError(f"{field}: {size} items, at most {MAX_BATCH} per batch")


def _item_status(exc: BaseException) -> common_pb2.Status:
    """A refused batch item: same code and message a unary call would have got."""
    code, message = status.status_for(exc)
    return common_pb2.Status(code=code.value[0], message=message)

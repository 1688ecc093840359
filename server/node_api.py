"""The node API servicer: attestation, agent SVID renewal, the Sync push stream, SVID signing.

Transport only: authenticate (server.peer, ServerState), rate-limit, decode, call the issuance
spine (server.issuance: Issuer for workload SVIDs, with entitlement, task decisions, signing
and the ledger; AgentAdmission for agent SVIDs), encode. Errors become status codes in
server.status. This module knows nothing of tasks.
"""

# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass

import grpc
from cryptography import x509

from server import status
from server.agent_authority import AgentAuthority
from server.attestation.base import NodeAttestor
from server.ca.signer import verify_csr
from server.changelog import Change
from server.convert import bundle_to_proto
from server.datastore.records import REVOKED_X509_SERIAL, AttestedAgent, Entry, Revocation
from server.entitlement import agent_parents, entitled_entries
from server.errors import (
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    UnavailableError,
)
from server.ids import ServerIds
from server.issuance import AgentAdmission, Issuer, JwtRequest
from server.metrics import Metrics
from server.peer import AgentPeer, PeerCache, peer_key
from server.propagation import Propagator
from server.state import ServerState
from server.sync_delta import entry_delta, outweighs
from server.sync_messages import DELTA, Shared, delta_messages, snapshot_messages
from server.sync_pace import SyncPace
from server.view_freshness import CurrentView, ViewFreshness
from svid._clock import Clock
from svid._der import der_concat
from svid._errors import SvidError
from svid._proto import common_pb2, node_pb2, node_pb2_grpc
from svid._ratelimit import KeyedLimiter
from svid._spiffe_id import SpiffeId

MAX_BATCH = 1000
_ATTEST_LIMITED = "attestation rate limit exceeded for this host; retry later"


@dataclass(frozen=True)
class NodeSettings:
    attest_timeout: float = 30.0
    # What HEARTBEAT messages tell the agent (Propagator.run_heartbeats sends them this often).
    heartbeat_interval: float = 3.0


# Sync streams one agent may open: each costs a snapshot or a catch-up, and the per-agent cap
# on open streams (the Propagator's) does not bound an agent that opens and cancels in a loop.
# An agent opens one per connection, renewal or failover; a few dozen in a burst is already far
# past that.
SYNC_OPENS_PER_SECOND = 2.0
SYNC_OPENS_BURST = 20


@dataclass(frozen=True)
class Limiters:
    x509: KeyedLimiter
    jwt: KeyedLimiter
    attest: KeyedLimiter
    sync: KeyedLimiter


Chain = tuple[x509.Certificate, ...]


def _expires(chain: Chain) -> int:
    return int(chain[0].not_valid_after_utc.timestamp())


class NodeServicer(node_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        state: ServerState,
        issuer: Issuer,
        agents: AgentAdmission,
        ids: ServerIds,
        attestors: Mapping[str, NodeAttestor],
        settings: NodeSettings,
        limiters: Limiters,
        clock: Clock,
        metrics: Metrics,
        propagator: Propagator,
        peers: PeerCache,
        authority: AgentAuthority,
        crl: Callable[[], Sequence[bytes]] = list,
        view: CurrentView | None = None,
    ) -> None:
        self._state = state
        self._issuer = issuer
        self._agents = agents
        self._attestors = dict(attestors)
        self._settings = settings
        # One message for every stream (never changed): a heartbeat is sent often, by many.
        self._heartbeat = node_pb2.SyncUpdate(
            kind=node_pb2.SyncUpdate.HEARTBEAT,
            heartbeat_interval_ms=max(1, round(settings.heartbeat_interval * 1000)),
        )
        self._limits = limiters
        self._clock = clock
        self._metrics = metrics
        # The CA-signed CRL(s) of revoked X.509-SVIDs, sent on Sync.
        self._crl = crl
        self._peers = peers
        # Who may call as an agent: memory, and the datastore when memory is behind.
        self._authority = authority
        self._propagator = propagator
        self._server_id = str(ids.server)
        # The view Sync serves (servers sharing a datastore): refused when stale, and caught
        # up with the datastore before a snapshot is made of it.
        self._view = view or CurrentView(ViewFreshness(clock, None))

    def on_error(self, code: grpc.StatusCode) -> None:
        self._metrics.record_error(code)

    def _bundle_proto(self) -> common_pb2.Bundle:
        return bundle_to_proto(self._state.bundle, self._state.jwt_expiry)

    def _agent_svid(self, agent_id: SpiffeId, chain: Chain) -> node_pb2.AgentSVID:
        return node_pb2.AgentSVID(
            spiffe_id=str(agent_id),
            cert_chain=der_concat(chain),
            expires_at=_expires(chain),
            bundle=self._bundle_proto(),
        )

    def _still_authorized(self, peer: AgentPeer, agent: AttestedAgent) -> None:
        """Checked again once an issuance is recorded, before anything is sent: a ban or an
        eviction meanwhile revoked the agent's credentials as the ledger held them then,
        perhaps without these. Refused now, they stay on record and never leave; a ban after
        this check finds them in the ledger and revokes them. `agent`: the record the call was
        authorized on. The certificate the agent renewed with, dropped meanwhile as the agent
        called with its newest (AgentAuthority), is no such refusal: the call was the agent's
        own, begun before its renewal's answer moved it on, and refused it told the workload
        it had no identity."""
        try:
            self._state.authorize_agent(peer.spiffe_id, peer.serial)
        except PermissionDeniedError:
            current = self._state.agents.get(peer.spiffe_id)
            # Nothing else moved: not banned, evicted, attested again or renewed again since.
            if not (peer.serial == agent.previous_serial and current == agent.without_previous()):
                raise

    # -- Attest -------------------------------------------------------------------------------

    @status.unary
    async def Attest(  # type: ignore[override]
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        within_budget = self._limits.attest.try_take(peer_key(context))
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

        # The agent's ID once the attestor proved it: the checks after it (a ban, a join
        # token's agent attested already, a removal still being finished) name the agent on
        # their deny event, as the admission's later refusals do.
        proven = ""
        try:
            result = await attestor.attest(bytes(params.data.payload), challenge)
            proven = str(result.agent_id)
            previous = self._agents.check(result)
            if previous is None:
                await self._agents.not_being_removed(result)
        except Exception as exc:
            # Past the budget a refusal is counted, not written: the budget's worth of this
            # host's refusals is on record, and a flood of guesses costs no write each.
            await self._agents.refused(kind, str(exc), on_record=within_budget, agent_id=proven)
            if not within_budget:
                raise RateLimitedError(_ATTEST_LIMITED) from None
            raise
        chain = await self._agents.admit(result, previous, csr)
        await context.write(
            node_pb2.AttestResponse(result=self._agent_svid(result.agent_id, chain))
        )

    # -- RenewAgent ---------------------------------------------------------------------------

    @status.unary
    async def RenewAgent(  # type: ignore[override]
        self, request: node_pb2.RenewAgentRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.RenewAgentResponse:
        peer = self._peers.agent_peer(context)
        agent = await self._authority.authorize(peer)
        if not self._limits.x509.try_take(peer.spiffe_id):
            raise RateLimitedError(f"X.509 signing rate limit exceeded for {peer.spiffe_id}")
        chain = await self._agents.renew(agent, peer.serial, verify_csr(request.csr))
        agent_id = SpiffeId.parse(agent.spiffe_id)
        return node_pb2.RenewAgentResponse(svid=self._agent_svid(agent_id, chain))

    # -- Sync ---------------------------------------------------------------------------------

    def _shared(
        self,
        bundle: bool,
        crl: bool,
        checkpoint: bool,
        federates_with: Iterable[str] = (),
    ) -> Shared:
        """What every agent gets alike; with the bundle, the foreign bundles its entries
        federate with (`federates_with`), as one full set."""
        wanted = set(federates_with)
        return Shared(
            bundle=self._bundle_proto() if bundle else None,
            federated={
                f"spiffe://{td}": bundle_to_proto(b, {})
                for td, b in self._state.foreign_bundles.items()
                if td in wanted
            }
            if bundle
            else None,
            crl=list(self._crl()) if crl else None,
            audit_checkpoints=self._checkpoint_protos() if checkpoint else None,
        )

    def _checkpoint_protos(self) -> list[node_pb2.AuditCheckpoint]:
        """The newest audit checkpoint and prune record, each with the key that signed it (the
        server's own: the agent trusts it for arriving over this mTLS stream)."""
        return [
            node_pb2.AuditCheckpoint(line=record.to_line(), public_key=record.public_key_der())
            for record in self._state.audit_checkpoints
        ]

    def _snapshot(self, agent: AttestedAgent, revision: int) -> Iterator[node_pb2.SyncUpdate]:
        entries = entitled_entries(
            self._state.entries, agent.spiffe_id, agent.selectors, self._server_id, self._now()
        )
        return snapshot_messages(
            entries,
            self._state.revocations,
            self._shared(
                bundle=True,
                crl=True,
                checkpoint=True,
                federates_with={td for e in entries for td in e.federates_with},
            ),
            revision=revision,
            epoch=self._state.changes.epoch,
        )

    def _delta(self, agent: AttestedAgent, window: list[Change]) -> Iterable[node_pb2.SyncUpdate]:
        """What `window` changed for this agent; [] when nothing."""
        entries = entry_delta(
            window,
            self._state.entries,
            agent_id=agent.spiffe_id,
            selectors=agent.selectors,
            server_id=self._server_id,
            now=self._now(),
        )
        added: dict[tuple[str, str], Revocation] = {}
        removed: dict[tuple[str, str], Revocation] = {}
        bundle = checkpoint = crl = False
        for change in window:
            bundle = bundle or change.bundle or _federation_touched(change)
            checkpoint = checkpoint or change.audit_checkpoint
            crl = crl or change.crl
            for item in change.revocations_added:
                added[item.kind, item.value] = item
                removed.pop((item.kind, item.value), None)
            for item in change.revocations_removed:
                removed[item.kind, item.value] = item
                added.pop((item.kind, item.value), None)
        bundle = bundle or self._reach_federates(entries.upserts, entries.removed_ids)
        # The CRL is signed by the CA and lists the revoked serials: it follows both (not a
        # JWT-SVID's revocation or a task's end, which it does not list), and is signed again
        # before its nextUpdate passes (TaskService.refresh_crl).
        crl = crl or bundle or any(kind == REVOKED_X509_SERIAL for kind, _ in (*added, *removed))
        if not (entries.upserts or entries.removed_ids or added or removed or crl or checkpoint):
            return []
        return delta_messages(
            entries.upserts,
            entries.removed_ids,
            added.values(),
            removed.values(),
            self._shared(
                bundle=bundle,
                crl=crl,
                checkpoint=checkpoint,
                federates_with=self._federates_with(agent) if bundle else (),
            ),
            revision=self._state.changes.head,
            epoch=self._state.changes.epoch,
        )

    def _reach_federates(self, upserts: Iterable[Entry], removed_ids: Iterable[str]) -> bool:
        """Whether an entry federating came into or went out of the agent's reach: moved to or
        from it, or under a node alias it now matches or no longer does. Its foreign trust
        domains may join or leave the agent's set though no entry's federates_with changed."""
        if any(e.federates_with for e in upserts):
            return True
        by_id = self._state.entries.by_id
        return any((e := by_id.get(i)) is not None and e.federates_with for i in removed_ids)

    def _federates_with(self, agent: AttestedAgent) -> set[str]:
        """The foreign trust domains the agent's entries federate with (a bundle change, or
        an entry's federation changed: rare, so the agent's entries are read again)."""
        entries = entitled_entries(
            self._state.entries, agent.spiffe_id, agent.selectors, self._server_id, self._now()
        )
        return {td for e in entries for td in e.federates_with}

    def _now(self) -> int:
        return int(self._clock.now())

    def _snapshot_size(self, agent: AttestedAgent) -> int:
        """The entries and revocations a snapshot for the agent holds, or a few more: the
        entries under its parents are counted whole (expired ones too), visiting none."""
        index = self._state.entries
        parents = agent_parents(
            index, agent.spiffe_id, agent.selectors, self._server_id, self._now()
        )
        entries = sum(len(index.by_parent.get(parent, ())) for parent in parents)
        return entries + len(self._state.revocations)

    def _window(self, agent: AttestedAgent, request: node_pb2.SyncRequest) -> list[Change] | None:
        """The changes a new stream sends first, after the agent's revision, when the log still
        holds what came after it; None: it sends a snapshot."""
        window = self._state.changes.since(request.since_revision, request.epoch)
        if (
            not request.since_revision
            or window is None
            # A long window (an agent long away, or one asking for the oldest revision on
            # purpose) costs more on the event loop than the snapshot it may as well have.
            # Asked first: it stops counting at the snapshot's size, and below it the window is
            # short, so the scan after it is too.
            or outweighs(window, self._snapshot_size(agent))
            # Attested again with other selectors since (a live stream starts again from a
            # snapshot too): the node aliases it reached then may all differ, and entries
            # under one it no longer matches are in no change of the window.
            or any(agent.spiffe_id in change.selectors_changed for change in window)
        ):
            return None
        return window

    def _first_messages(
        self, agent: AttestedAgent, window: list[Change] | None
    ) -> Iterable[node_pb2.SyncUpdate]:
        """A snapshot (`window` None), or the delta of the window."""
        log = self._state.changes
        if window is None:
            return self._snapshot(agent, log.head)
        return self._delta(agent, window) or [
            node_pb2.SyncUpdate(kind=DELTA, revision=log.head, epoch=log.epoch)
        ]

    async def _current(self, peer: AgentPeer) -> AttestedAgent:
        """Before a snapshot: the view caught up with the datastore as of now. A snapshot
        replaces what the agent holds: one made of a view a feed poll behind would take back
        a revocation the agent took from the server it leaves (failing over, or a since_revision
        of another server's log). The agent is authorized again after the wait."""
        await self._view.current()
        return self._state.authorize_agent(peer.spiffe_id, peer.serial)

    def _woken(self, peer: AgentPeer) -> AttestedAgent:
        """A Sync stream woken: the agent's record, or why the stream ends."""
        if self._state.shutting_down:
            raise UnavailableError("server is shutting down; reconnect")
        # Woken when the view turned stale: the agent moves to a server that reads. A
        # heartbeat too says the view is current, so none goes out before this.
        self._view.check()
        # Eviction and bans end the stream with PERMISSION_DENIED right here.
        return self._state.authorize_agent(peer.spiffe_id, peer.serial)

    def _still_served(self, peer: AgentPeer, held: float) -> None:
        """Before a heartbeat while a stream catches up: as any heartbeat, of a view that is
        not stale, to an agent still served; and what the agent holds (the view as of `held`,
        without what the backlog dropped) within the bound too."""
        self._view.check(held)
        self._state.authorize_agent(peer.spiffe_id, peer.serial)

    @status.stream
    async def Sync(  # type: ignore[override]
        self, request: node_pb2.SyncRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.SyncUpdate]:
        peer = self._peers.agent_peer(context)
        # A stale view first: it is served to no one, and the agent's check would otherwise
        # wait on the datastore the view cannot be read from (AgentAuthority, an old view).
        self._view.check()
        agent = await self._authority.authorize(peer)
        if not self._limits.sync.try_take(peer.spiffe_id):
            raise RateLimitedError(
                f"Sync stream rate limit exceeded for {peer.spiffe_id}: at most "
                f"{SYNC_OPENS_BURST} at once, then {SYNC_OPENS_PER_SECOND:g} a second"
            )
        # Held from here to the stream's end: a stream waiting for its snapshot's catch-up
        # counts against the agent's cap as one subscribed does.
        place = self._propagator.take_place(peer.spiffe_id)
        try:
            # Closed with the stream, not when collected: its subscription ends at once.
            async with contextlib.aclosing(self._stream(peer, agent, request)) as messages:
                async for message in messages:
                    yield message
        finally:
            self._propagator.give_back(place)

    async def _stream(
        self, peer: AgentPeer, agent: AttestedAgent, request: node_pb2.SyncRequest
    ) -> AsyncGenerator[node_pb2.SyncUpdate, None]:
        log = self._state.changes
        window = self._window(agent, request)
        if window is None:
            agent = await self._current(peer)
        # Subscribed and the log read with no await between: every change after the revision
        # read here reaches this stream's inbox.
        sub = self._propagator.subscribe(agent, request.heartbeats)
        self._metrics.sync_streams.inc()
        try:
            messages = self._first_messages(agent, window)
            # The first heartbeat right after the first messages: the agent learns this server
            # sends them (an older one never does) and times its silence from there.
            beat = sub.heartbeats
            pace = SyncPace(
                self._view.freshness,
                self._heartbeat,
                self._settings.heartbeat_interval,
                beats=request.heartbeats,
            )
            while True:
                for message in pace.sending(messages, beat):
                    yield message
                window = await sub.next()
                beat, sub.beat = sub.beat, False
                current = self._woken(peer)
                if current.selectors != agent.selectors or sub.overflowed:
                    # Attested again with other selectors (its node aliases may all differ),
                    # or too far behind to keep its backlog: start again from a snapshot,
                    # beating while the view catches up (server.sync_pace).
                    self._propagator.unsubscribe(sub)
                    catch_up = asyncio.ensure_future(self._current(peer))
                    beats = pace.during(catch_up, lambda held: self._still_served(peer, held))
                    try:
                        async with contextlib.aclosing(beats):
                            async for heartbeat in beats:
                                yield heartbeat
                        agent = await catch_up
                    finally:
                        catch_up.cancel()  # the stream ended while the view caught up
                    sub = self._propagator.subscribe(agent, request.heartbeats)
                    messages = self._snapshot(agent, log.head)
                    continue
                # Woken for a heartbeat alone, every few seconds on every stream: the agent's
                # reach (its node aliases) is not worked out again for nothing.
                messages = self._delta(agent, window) if window else []
        finally:
            self._propagator.unsubscribe(sub)
            self._metrics.sync_streams.dec()

    # -- BatchNewX509SVID ---------------------------------------------------------------------

    @status.unary
    async def BatchNewX509SVID(  # type: ignore[override]
        self, request: node_pb2.BatchNewX509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.BatchNewX509SVIDResponse:
        peer = self._peers.agent_peer(context)
        agent = await self._authority.authorize(peer)
        params = request.params
        _check_batch_size("params", len(params))
        asked = [(item.entry_id, item.csr) for item in params]
        # SVIDs with many long DNS names: a batch the reply could not carry under gRPC's
        # message limit is answered in part, the agent asking again for the rest.
        wanted = asked[: self._issuer.x509_answerable(asked)]
        if not self._limits.x509.try_take(agent.spiffe_id, len(wanted)):
            raise RateLimitedError(f"X.509 signing rate limit exceeded for {agent.spiffe_id}")
        outcomes = await self._issuer.issue_x509(agent, wanted)
        self._still_authorized(peer, agent)
        response = node_pb2.BatchNewX509SVIDResponse(deferred=len(asked) - len(wanted))
        add = response.results.add
        for outcome in outcomes:
            if outcome.error is None:
                add(
                    entry_id=outcome.entry_id,
                    spiffe_id=outcome.spiffe_id,
                    cert_chain=outcome.chain_der,
                    expires_at=outcome.expires_at,
                )
            else:
                add(entry_id=outcome.entry_id, error=_item_status(outcome.error))
        return response

    # -- NewJWTSVID, BatchNewJWTSVID ----------------------------------------------------------

    @status.unary
    async def NewJWTSVID(  # type: ignore[override]
        self, request: node_pb2.NewJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.NewJWTSVIDResponse:
        peer = self._peers.agent_peer(context)
        agent = await self._authority.authorize(peer)
        wanted = _jwt_request(request)
        # A refused request is answered before it costs the agent a token of its budget.
        entry = self._issuer.jwt_entry(agent, wanted)
        if not self._limits.jwt.try_take(agent.spiffe_id):
            raise RateLimitedError(f"JWT signing rate limit exceeded for {agent.spiffe_id}")
        issued = await self._issuer.issue_jwt(agent, entry, wanted.audience)
        self._still_authorized(peer, agent)
        return node_pb2.NewJWTSVIDResponse(
            token=issued.token, issued_at=int(issued.issued_at), expires_at=int(issued.expires_at)
        )

    @status.unary
    async def BatchNewJWTSVID(  # type: ignore[override]
        self, request: node_pb2.BatchNewJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.BatchNewJWTSVIDResponse:
        peer = self._peers.agent_peer(context)
        agent = await self._authority.authorize(peer)
        requests = request.requests
        _check_batch_size("requests", len(requests))
        if not self._limits.jwt.try_take(agent.spiffe_id, len(requests)):
            raise RateLimitedError(f"JWT signing rate limit exceeded for {agent.spiffe_id}")
        outcomes = await self._issuer.issue_jwts(agent, requests)
        self._still_authorized(peer, agent)
        response = node_pb2.BatchNewJWTSVIDResponse()
        add = response.results.add
        for outcome in outcomes:
            if isinstance(outcome, SvidError):
                add(error=_item_status(outcome))
                continue
            svid = add().svid
            svid.token = outcome.token
            svid.issued_at = int(outcome.issued_at)
            svid.expires_at = int(outcome.expires_at)
        return response


def _jwt_request(request: node_pb2.NewJWTSVIDRequest) -> JwtRequest:
    return JwtRequest(request.entry_id, request.spiffe_id, tuple(request.audience))


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


def _federation_touched(change: Change) -> bool:
    """An entry's foreign trust domains changed: the agent's set of foreign bundles may too."""
    return any(
        (t.old.federates_with if t.old else ()) != (t.new.federates_with if t.new else ())
        for t in change.entries
    )

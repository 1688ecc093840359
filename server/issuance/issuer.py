"""The issuer: an authenticated agent's requests in, outcomes out.

Per request: entitlement (is this entry the agent's to serve?), the task decision (through
TaskDecisions, for task identities), the CA signers (big batches in signing worker processes:
X.509 through SigningWorkers.issue_x509 from a thread, workload JWTs through
LoopSigningWorkers.mint from the event loop, or SigningWorkers.mint when those cannot take the
batch; small ones in the server), and then the ledger. Nothing is returned before the ledger
committed every credential of the call and its audit event (server.issuance.ledger states the
contract); if it cannot, the call raises LedgerUnavailableError and its credentials are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import NamedTuple, ParamSpec, Protocol, TypeVar, cast

from server.agent_turns import AgentTurns
from server.audit.errors import SecretInAuditError
from server.audit.event import check_no_secret
from server.ca.loop_workers import LoopSigningWorkers
from server.ca.manager import CaManager
from server.ca.signer import IssuedJwt, IssuedSvid, X509Request, X509Signer, check_jwt_request
from server.ca.workers import MintRequest, SigningWorkers
from server.datastore.errors import TaskEndedMeanwhileError
from server.datastore.records import AttestedAgent, Entry
from server.entitlement import Entitlement, SpiffeIdCache, agent_parents
from server.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from server.ids import ServerIds
from server.input_text import refuse_nul
from server.issuance.ledger import Credential, EventTuple, Ledger
from server.issuance.records import (
    task_jwt_record,
    workload_jwt_record,
    x509_record,
)
from server.issuance.reply_budget import answerable
from server.issuance.task_port import TaskDecisions, TaskGrant, TaskJwtGrant
from server.metrics import Metrics, observe_times
from server.state import ServerState
from svid._clock import Clock
from svid._errors import SvidError
from svid._held import run_held
from svid._limits import (
    MAX_AUDIENCE_BYTES,
    MAX_AUDIENCE_TOTAL_BYTES,
    MAX_AUDIENCES,
    audience_problem,
)
from svid._spiffe_id import SpiffeId

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True)
class IssuerSettings:
    default_x509_svid_ttl: int = 300
    default_jwt_svid_ttl: int = 300
    # Threads of the JWT batch pool one agent's batches may hold at once (0: all of them).
    jwt_threads_per_agent: int = 0


class X509Outcome(NamedTuple):
    """One item of a batch: issued (chain_der set) or refused (error set)."""

    entry_id: str
    spiffe_id: str
    chain_der: bytes
    expires_at: int
    error: SvidError | None


class JwtRequest(NamedTuple):
    entry_id: str
    spiffe_id: str
    audience: tuple[str, ...]


class JwtAsk(Protocol):
    """What a batch item names: a JwtRequest, or the node API's NewJWTSVIDRequest as it came
    off the wire (a batch's items are read where they are: copying each into a JwtRequest
    cost the event loop about 1.3 us per JWT)."""

    @property
    def entry_id(self) -> str: ...

    @property
    def spiffe_id(self) -> str: ...

    @property
    def audience(self) -> Sequence[str]: ...


JwtOutcome = IssuedJwt | SvidError


class Issuer:
    def __init__(
        self,
        *,
        state: ServerState,
        ca: CaManager,
        ids: ServerIds,
        ledger: Ledger,
        tasks: TaskDecisions,
        clock: Clock,
        metrics: Metrics,
        executor: Executor,
        jwt_executor: Executor | None = None,
        workers: SigningWorkers | None = None,
        loop_workers: LoopSigningWorkers | None = None,
        settings: IssuerSettings | None = None,
    ) -> None:
        self._state = state
        self._ca = ca
        self._ledger = ledger
        self._tasks = tasks
        self._clock = clock
        self._metrics = metrics
        self._executor = executor
        # Workload JWT batches: two threads per signing worker (ServerConfig.signing_processes).
        self._jwt_executor = jwt_executor or executor
        # Big batches of either kind are signed in worker processes (none: in this one).
        self._workers = workers or SigningWorkers(0, clock)
        # Big workload JWT batches: in worker processes the event loop drives (none: as above).
        self._loop_workers = loop_workers
        self._settings = settings or IssuerSettings()
        # A task JWT batch holds its thread for a policy decision per item: one agent's
        # batches must leave the pool's other threads to the rest.
        self._jwt_share = AgentTurns("task JWT batches", self._settings.jwt_threads_per_agent)
        self._server_id = str(ids.server)
        # Label lookups cost as much as the rest of a JWT's bookkeeping: bind them once.
        self._x509_seconds = metrics.signing_seconds.labels(kind="x509")
        self._jwt_seconds = metrics.signing_seconds.labels(kind="jwt")
        self._x509_issued = metrics.svids_issued.labels(kind="x509")
        self._jwt_issued = metrics.svids_issued.labels(kind="jwt")
        self._x509_withheld = metrics.svids_withheld.labels(kind="x509")
        self._jwt_withheld = metrics.svids_withheld.labels(kind="jwt")
        self._entitled_cache: dict[tuple[str, tuple[object, ...], int], Entitlement] = {}
        self._entitled_index: object = None
        self._entitled_second = 0
        self._spiffe_ids = SpiffeIdCache()

    async def _run(
        self, executor: Executor, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs
    ) -> _R:
        """Run CPU-bound signing in a pool: Sync streams stay responsive meanwhile."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    # -- entitlement --------------------------------------------------------------------------

    def entitled(self, agent: AttestedAgent) -> Entitlement:
        """The entries `agent` may serve now."""
        # Memoised per entry snapshot (replaced on every write) and per second (expiry). A
        # past second's is never asked for again: kept, each with its map of the agent's IDs
        # (by_spiffe_id), they grew the server every second until an entry write.
        index = self._state.entries
        now = int(self._clock.now())
        if index is not self._entitled_index or now != self._entitled_second:
            self._entitled_cache = {}
            self._entitled_index = index
            self._entitled_second = now
        key = (agent.spiffe_id, agent.selectors, now)
        found = self._entitled_cache.get(key)
        if found is None:
            if len(self._entitled_cache) > 10_000:
                self._entitled_cache = {}
            parents = agent_parents(index, agent.spiffe_id, agent.selectors, self._server_id, now)
            found = Entitlement(index, parents, now, self._spiffe_ids)
            self._entitled_cache[key] = found
        return found

    def _entitled_entry(self, agent_id: str, entitled: Entitlement, entry_id: str) -> Entry:
        entry = entitled.get(entry_id)
        if entry is not None:
            return entry
        if entry_id in self._state.entries.by_id:
            raise PermissionDeniedError(f"entry {entry_id} is not entitled to agent {agent_id}")
        raise NotFoundError(f"entry {entry_id[:80]!r} not found")

    # -- X.509-SVIDs --------------------------------------------------------------------------

    async def issue_x509(
        self, agent: AttestedAgent, requests: Sequence[tuple[str, bytes]]
    ) -> list[X509Outcome]:
        """(entry id, CSR DER) each; an outcome per request, in order, once all are recorded."""
        entitled = self.entitled(agent)
        outcomes, credentials, events = await self._run(
            self._executor, self._sign_x509_batch, requests, entitled, agent.spiffe_id
        )
        if credentials:
            ended, committed = await self._commit_live(credentials, events)
            if any(c.task_id for c in credentials):
                outcomes = [self._unless_ended(o, ended) for o in outcomes]
                # Counted once the answer is decided: a committed SVID whose task ended
                # meanwhile is on the ledger but never leaves the server.
                sent = sum(1 for o in outcomes if o.error is None)
                self._x509_withheld.inc(max(0, committed - sent))
                committed = sent
            self._x509_issued.inc(committed)
        return outcomes

    def x509_answerable(self, requests: Sequence[tuple[str, bytes]]) -> int:
        """How many of `requests`, from the first, one reply can carry (reply_budget)."""
        chain_bytes = self._ca.x509_signer().chain_bytes
        return answerable(requests, self._state.entries.by_id.get, chain_bytes)

    def _unless_ended(self, outcome: X509Outcome, ended: frozenset[str]) -> X509Outcome:
        if outcome.error is None and (
            outcome.spiffe_id in ended or self._tasks.ended(outcome.spiffe_id)
        ):
            return X509Outcome(outcome.entry_id, "", b"", 0, _ended_meanwhile(outcome.spiffe_id))
        return outcome

    async def _commit_live(
        self,
        credentials: Sequence[Credential],
        events: Sequence[EventTuple],
        recorded: Future[None] | None = None,
    ) -> tuple[frozenset[str], int]:
        """Commit `credentials` and their `events` (the same index: one event per credential),
        or await `recorded`, their commit under way. The ledger refuses, whole, a commit
        holding credentials of a task whose end (through any server) was claimed before it
        (TaskEndedMeanwhileError: that end may have read what to revoke already); then the
        rest are committed again without them, so one task ending costs no other item of a
        batch. Returns the SPIFFE IDs of the task identities left out, and how many were
        committed."""
        left_out: set[str] = set()
        while credentials:
            try:
                if recorded is not None:
                    first, recorded = recorded, None
                    await asyncio.wrap_future(first)
                else:
                    await self._ledger.commit(credentials, events)
                break
            except TaskEndedMeanwhileError as refused:
                kept = [i for i, c in enumerate(credentials) if c.task_id not in refused.tasks]
                if len(kept) == len(credentials):  # none of ours: committing again would loop
                    raise
                left_out.update(c.spiffe_id for c in credentials if c.task_id in refused.tasks)
                credentials = [credentials[i] for i in kept]
                events = [events[i] for i in kept]
        return frozenset(left_out), len(credentials)

    def _sign_x509_batch(
        self, requests: Sequence[tuple[str, bytes]], entitled: Entitlement, agent_id: str
    ) -> tuple[list[X509Outcome], list[Credential], list[EventTuple]]:
        # Every item is checked and its task decided here first (before signing: a task
        # identity is issued only while its task is active); then all are signed at once
        # (SigningWorkers.issue_x509: in worker processes when the batch is big).
        signer = self._ca.x509_signer()
        tasks = self._tasks
        default_ttl = self._settings.default_x509_svid_ttl
        parsed_id = entitled.parsed_id
        planned: list[tuple[Entry, TaskGrant | None] | SvidError] = []
        wanted: list[X509Request] = []
        asked_at = int(self._clock.now())
        for entry_id, csr in requests:
            try:
                entry = self._entitled_entry(agent_id, entitled, entry_id)
                task = tasks.x509_grant(agent_id, entry) if tasks.owns(entry) else None
            except SvidError as exc:  # the server's own errors are SvidErrors too
                planned.append(exc)
                continue
            planned.append((entry, task))
            ttl = _within_entry(entry, entry.x509_svid_ttl or default_ttl, asked_at)
            if task is not None:
                # The entry's TTL is the whole task's: an SVID renewed late in the task would
                # outlive it (by up to that TTL) for any peer that reads no CRL.
                ttl = max(1, min(ttl, task.expires_at - asked_at))
            wanted.append((csr, parsed_id(entry), ttl, tuple(entry.dns_names)))
        signed = self._sign_x509(signer, wanted) if wanted else []
        now = int(self._clock.now())
        outcomes: list[X509Outcome] = []
        credentials: list[Credential] = []
        events: list[EventTuple] = []
        at = 0
        for (entry_id, _), plan in zip(requests, planned, strict=True):
            if isinstance(plan, SvidError):
                outcomes.append(X509Outcome(entry_id, "", b"", 0, plan))
                continue
            entry, task = plan
            svid = signed[at]
            at += 1
            if isinstance(svid, SvidError):
                outcomes.append(X509Outcome(entry_id, "", b"", 0, svid))
                continue
            credential, event = x509_record(
                agent_id,
                entry.spiffe_id,
                serial_hex=svid.serial_hex,
                expires_at=svid.expires_at,
                now=now,
                task=task,
                issuer=signer.key_id,
            )
            credentials.append(credential)
            events.append(event)
            outcomes.append(
                X509Outcome(entry.id, entry.spiffe_id, svid.chain_der, svid.expires_at, None)
            )
        return outcomes, credentials, events

    def _sign_x509(
        self, signer: X509Signer, wanted: list[X509Request]
    ) -> list[IssuedSvid | SvidError]:
        started = time.perf_counter()
        out = self._workers.issue_x509(signer, wanted)
        # One batch is one timing: each of its SVIDs took the mean of it.
        each = (time.perf_counter() - started) / len(wanted)
        observe_times(self._x509_seconds, each, len(wanted))
        return out

    # -- JWT-SVIDs ----------------------------------------------------------------------------

    def _jwt_entry(self, agent_id: str, entitled: Entitlement, request: JwtAsk) -> Entry:
        _check_audience(request.audience)
        if request.entry_id:
            named = self._entitled_entry(agent_id, entitled, request.entry_id)
            if request.spiffe_id and request.spiffe_id != named.spiffe_id:
                # Renamed since the agent looked: its workload asked for the old ID, and a token
                # for the new one would be handed out as that.
                raise PermissionDeniedError(
                    f"entry {named.id} names {named.spiffe_id} now, not {request.spiffe_id[:2048]}"
                )
            return named
        if not request.spiffe_id:
            raise InvalidRequestError("spiffe_id: required (or entry_id)")
        entry = entitled.by_spiffe_id(request.spiffe_id)
        if entry is None:
            wanted = SpiffeId.parse(request.spiffe_id)  # a malformed ID is INVALID_ARGUMENT
            raise PermissionDeniedError(f"{wanted} is not an identity agent {agent_id} may serve")
        return entry

    def _workload_request(
        self, entitled: Entitlement, entry: Entry, audience: Sequence[str]
    ) -> MintRequest:
        ttl = entry.jwt_svid_ttl or self._settings.default_jwt_svid_ttl
        ttl = _within_entry(entry, ttl, int(self._clock.now()))
        sub, audiences = check_jwt_request(entitled.parsed_id(entry), list(audience), ttl)
        return sub, audiences, ttl

    def _mint_task(
        self, agent_id: str, entry: Entry, audience: Sequence[str], grant: TaskJwtGrant
    ) -> tuple[IssuedJwt, Credential, EventTuple]:
        started = time.perf_counter()
        issued = self._ca.jwt_signer().sign(
            SpiffeId.parse(entry.spiffe_id), list(audience), grant.ttl, dict(grant.claims)
        )
        self._jwt_seconds.observe(time.perf_counter() - started)
        credential, event = task_jwt_record(
            agent_id,
            entry.spiffe_id,
            jti=issued.jti,
            expires_at=issued.expires_at,
            audience=audience,
            grant=grant,
        )
        return issued, credential, event

    def _mint_workload(self, wanted: list[MintRequest]) -> list[IssuedJwt | SvidError]:
        """Workload JWTs for checked requests: in a worker process when the batch is big."""
        signer = self._ca.jwt_signer()
        started = time.perf_counter()
        out = self._workers.mint(signer, wanted)
        # One batch is one timing: each of its SVIDs took the mean of it.
        each = (time.perf_counter() - started) / len(wanted)
        observe_times(self._jwt_seconds, each, len(wanted))
        return out

    def _task_jwt(
        self, agent_id: str, entry: Entry, audience: Sequence[str]
    ) -> tuple[IssuedJwt, Credential, EventTuple]:
        grant = self._tasks.jwt_grant(agent_id, entry, audience)
        return self._mint_task(agent_id, entry, audience, grant)

    def jwt_entry(self, agent: AttestedAgent, request: JwtRequest) -> Entry:
        """The entry a JWT request names, if `agent` may serve it; refusals raise."""
        return self._jwt_entry(agent.spiffe_id, self.entitled(agent), request)

    async def issue_jwt(
        self, agent: AttestedAgent, entry: Entry, audience: Sequence[str]
    ) -> IssuedJwt:
        """One JWT-SVID for an entry from `jwt_entry`, returned once recorded; refusals raise."""
        entitled = self.entitled(agent)
        agent_id = agent.spiffe_id
        if entry.id not in entitled:  # changed since jwt_entry looked
            raise PermissionDeniedError(f"entry {entry.id} is not entitled to agent {agent_id}")
        minted: tuple[IssuedJwt, Credential, EventTuple]
        if self._tasks.owns(entry):
            # A policy decision, which may write its own denial: off the event loop.
            minted = await self._run(self._executor, self._task_jwt, agent_id, entry, audience)
        else:
            # One ES256 signature is cheaper than a hop to the thread pool: sign on the loop
            # (below workers.MIN_BATCH, so never a round trip to a worker).
            (outcome,) = self._mint_workload([self._workload_request(entitled, entry, audience)])
            if isinstance(outcome, SvidError):
                raise outcome
            credential, event = workload_jwt_record(
                agent_id,
                entry.spiffe_id,
                jti=outcome.jti,
                issued_at=outcome.issued_at,
                expires_at=outcome.expires_at,
                audience=",".join(audience),
            )
            minted = outcome, credential, event
        issued, credential, event = minted
        ended, _ = await self._commit_live((credential,), (event,))
        if ended:
            raise _ended_meanwhile(entry.spiffe_id)
        if credential.task_id and self._tasks.ended(entry.spiffe_id):
            self._jwt_withheld.inc()  # on the ledger, never sent
            raise _ended_meanwhile(entry.spiffe_id)
        self._jwt_issued.inc()
        return issued

    async def issue_jwts(
        self, agent: AttestedAgent, requests: Sequence[JwtAsk]
    ) -> list[JwtOutcome]:
        """An outcome per request, in order, once every minted JWT is recorded."""
        agent_id = agent.spiffe_id
        plan = self._plan_jwts(requests, self.entitled(agent), agent_id)
        if not plan.tasks and plan.wanted:
            # Workload JWTs only: signed by workers the loop drives and recorded from here, no
            # thread in between (LoopSigningWorkers says why). None: they could not take it.
            minted = await self._mint_on_loop(plan, agent_id)
            if minted is not None:
                workload, bodies = minted
                outcomes, credentials, events, drafted = self._finish_jwts(
                    plan, workload, agent_id, bodies
                )
                if credentials:
                    # The worker drafted the events' audit bodies: the loop only chains them.
                    commit = self._ledger.record_later(credentials, events, drafted)
                    await asyncio.wrap_future(commit)
                    self._jwt_issued.inc(len(credentials))
                return outcomes
        # Only batches with task items wait for the agent's share: a workload JWT costs one
        # signature, which jwt_rate_per_agent already bounds.
        # Held to the thread's end even if the caller gives up: else an agent cancelling its
        # batches at will leaves its share while their decisions run on, holding every thread.
        async with self._jwt_share.hold(agent_id) if plan.tasks else contextlib.nullcontext():
            outcomes, recorded, credentials, events = await run_held(
                self._jwt_executor, self._issue_jwt_batch, plan, agent_id
            )
        if recorded is not None:
            # Nothing goes back before the commit holding this batch's records is done.
            ended, count = await self._commit_live(credentials, events, recorded)
            for at, item in enumerate(plan.items):
                if not isinstance(item, _TaskItem) or not isinstance(outcomes[at], IssuedJwt):
                    continue
                spiffe_id = item.entry.spiffe_id
                if spiffe_id in ended or self._tasks.ended(spiffe_id):
                    outcomes[at] = _ended_meanwhile(spiffe_id)
            if plan.tasks:
                # As for X.509: only what is sent counts as issued.
                sent = sum(1 for o in outcomes if isinstance(o, IssuedJwt))
                self._jwt_withheld.inc(max(0, count - sent))
                count = sent
            self._jwt_issued.inc(count)
        return outcomes

    async def _mint_on_loop(
        self, plan: _JwtPlan, agent_id: str
    ) -> tuple[list[IssuedJwt | SvidError], list[str | None]] | None:
        if self._loop_workers is None:
            return None
        signer = self._ca.jwt_signer()
        started = time.perf_counter()
        wanted = plan.wanted
        out = await self._loop_workers.mint(signer, wanted, agent_id, plan.owners)
        if out is not None:  # one batch is one timing, as in _mint_workload
            each = (time.perf_counter() - started) / len(wanted)
            observe_times(self._jwt_seconds, each, len(wanted))
        return out

    def _issue_jwt_batch(
        self, plan: _JwtPlan, agent_id: str
    ) -> tuple[list[JwtOutcome], Future[None] | None, list[Credential], list[EventTuple]]:
        # Recorded from the thread that signed (handing the records to the loop first cost the
        # main process ~2 us per JWT), but not waited for here: the commit runs on the ledger's
        # writer while this thread signs the next batch, and the loop awaits it.
        workload = self._mint_workload(plan.wanted) if plan.wanted else []
        outcomes, credentials, events, _ = self._finish_jwts(plan, workload, agent_id)
        if not credentials:
            return outcomes, None, [], []
        return outcomes, self._ledger.record_later(credentials, events), credentials, events

    def _plan_jwts(
        self, requests: Sequence[JwtAsk], entitled: Entitlement, agent_id: str
    ) -> _JwtPlan:
        """Every item checked: its error, or what it asks to be minted.

        A batch names few entries (agents batch a workload's requests): each workload entry is
        looked up and its subject and TTL checked once, then each request only for what is its
        own, the audience. Task items are decided later, one by one (_finish_jwts).
        """
        plan = _JwtPlan([], [], [], 0)
        items, wanted, owners = plan.items, plan.wanted, plan.owners
        workloads: dict[tuple[str, str], tuple[str, str, int]] = {}
        for item in requests:
            # Read off the wire once: each pass over the repeated field (check, copy, join)
            # made every value again (~0.8 us per JWT for the three).
            audience = list(item.audience)
            try:
                known = workloads.get((item.entry_id, item.spiffe_id))
                if known is not None:
                    _check_audience(audience)  # all _jwt_entry would check of this request
                    spiffe_id, sub, ttl = known
                    request: MintRequest = (sub, audience, ttl)
                else:
                    entry = self._jwt_entry(agent_id, entitled, item)
                    if self._tasks.owns(entry):
                        items.append(_TaskItem(entry, tuple(audience)))
                        plan.tasks += 1
                        continue
                    request = self._workload_request(entitled, entry, audience)
                    spiffe_id = entry.spiffe_id
                    workloads[item.entry_id, item.spiffe_id] = (spiffe_id, request[0], request[2])
            except SvidError as exc:  # the server's own errors are SvidErrors too
                items.append(exc)
                continue
            items.append(len(wanted))  # filled in from the workload mint
            wanted.append(request)
            owners.append((spiffe_id, ",".join(audience)))
        return plan

    def _finish_jwts(
        self,
        plan: _JwtPlan,
        workload: Sequence[IssuedJwt | SvidError],
        agent_id: str,
        bodies: Sequence[str | None] = (),
    ) -> tuple[list[JwtOutcome], list[Credential], list[EventTuple], list[str | None]]:
        """Outcomes in request order, with the record and event of each JWT minted; task items
        are decided and minted here, one by one. Last, per event, its audit body from `bodies`
        (per workload request, as a worker drafted it), or None."""
        outcomes: list[JwtOutcome] = []
        credentials: list[Credential] = []
        events: list[EventTuple] = []
        drafted: list[str | None] = []
        for item in plan.items:
            if type(item) is int:
                outcome = workload[item]
                if isinstance(outcome, IssuedJwt):
                    spiffe_id, joined = plan.owners[item]
                    credential, event = workload_jwt_record(
                        agent_id,
                        spiffe_id,
                        jti=outcome.jti,
                        issued_at=outcome.issued_at,
                        expires_at=outcome.expires_at,
                        audience=joined,
                    )
                    credentials.append(credential)
                    events.append(event)
                    drafted.append(bodies[item] if bodies else None)
                outcomes.append(outcome)
            elif isinstance(item, _TaskItem):
                try:
                    issued, credential, event = self._task_jwt(agent_id, item.entry, item.audience)
                except SvidError as exc:
                    outcomes.append(exc)
                    continue
                outcomes.append(issued)
                credentials.append(credential)
                events.append(event)
                drafted.append(None)
            else:
                outcomes.append(cast(SvidError, item))
        return outcomes, credentials, events, drafted


def _within_entry(entry: Entry, ttl: int, now: int) -> int:
    """`ttl`, cut to end when the entry does: an SVID outliving its entry kept the identity
    for its whole TTL after the entry left the agent (and the admin meant it gone)."""
    if entry.expires_at:
        return max(1, min(ttl, entry.expires_at - now))
    return ttl


def _ended_meanwhile(spiffe_id: str) -> PermissionDeniedError:
    """A task credential on record but not sent: its task ended while it was issued."""
    return PermissionDeniedError(f"task identity {spiffe_id} ended while it was issued")


class _TaskItem(NamedTuple):
    entry: Entry
    audience: tuple[str, ...]


@dataclass(slots=True)
class _JwtPlan:
    """A JWT batch after its checks: per item its error, the index of its request in `wanted`
    (whose subject and joined audience are in `owners` at that index), or a task item."""

    items: list[SvidError | int | _TaskItem]
    wanted: list[MintRequest]
    owners: list[tuple[str, str]]
    tasks: int


def _check_audience(audience: Sequence[str]) -> None:
    """What a JWT request's audience must be, before anything else of it is looked at."""
    if not _plain_audience(audience):
        _check_audience_values(audience)


def _check_audience_values(audience: Sequence[str]) -> None:
    """_check_audience's checks one by one, each naming what it refuses."""
    if not audience or any(not a for a in audience):
        raise InvalidRequestError("audience: at least one non-empty audience is required")
    too_big = audience_problem(audience)
    if too_big:
        raise InvalidRequestError(too_big)
    for index, value in enumerate(audience):
        refuse_nul(f"audience[{index}]", value)
        # The audit log refuses to record what looks like a credential: refused here, such an
        # audience fails its own request, not the batch it came in (after its JWTs were signed).
        try:
            check_no_secret("audience", value)
        except SecretInAuditError:
            raise InvalidRequestError(
                f"audience[{index}]: looks like a JWT or a PEM block, not a relying party"
            ) from None


def _plain_audience(audience: Sequence[str]) -> bool:
    """True only for an audience _check_audience lets through: a few short ASCII values, none
    holding a comma, a NUL or the start of a JWT or PEM block. Why: the checks one by one (four
    calls and two generators per value) made half the cost of planning a batch on the event
    loop (in-process, 3.3 to 1.6 us per JWT); here they are a few substring scans, and anything
    else takes them one by one."""
    if not audience or len(audience) > MAX_AUDIENCES:
        return False
    total = 0
    for value in audience:
        if (
            type(value) is not str
            or not value
            or not value.isascii()
            or len(value) > MAX_AUDIENCE_BYTES
            or "," in value
            or "\x00" in value
            or "eyJ" in value
            or "-----BEGIN" in value
        ):
            return False
        total += len(value)
    return total <= MAX_AUDIENCE_TOTAL_BYTES

"""gRPC transport of the task layer: NodeTasks (agents, mTLS port) and TaskAdmin (admin socket).

Task lists page as the admin API's lists do (server.listing): keyset tokens on (created_at,
task_id), bound to the filters they were issued for, pages bounded in items and bytes.
"""

# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc

from server import listing, status
from server.agent_authority import AgentAuthority
from server.agent_turns import AgentTurns
from server.datastore.records import AttestedAgent, TaskCursor
from server.errors import InvalidRequestError, PermissionDeniedError, RateLimitedError
from server.input_text import refuse_nul
from server.peer import PeerCache
from server.policy.fleet import PolicyFleet
from server.refusal_budget import RefusalBudget
from server.registration import is_entry_id
from server.state import ServerState
from server.tasks.model import Task, TaskState, is_task_key
from server.tasks.service import BeginRequest, TaskService
from svid._errors import SpiffeIdError
from svid._held import run_held
from svid._proto import task_pb2, task_pb2_grpc
from svid._ratelimit import KeyedLimiter
from svid._spiffe_id import MAX_ID_BYTES, SpiffeId

_log = logging.getLogger("svid.server.tasks")
MAX_RUNTIME_IDS = 256
MAX_VALIDATIONS = 1000
_STATES = tuple(s.value for s in TaskState)
# A cursor's created_at is bound as a SQL BIGINT.
_MAX_CURSOR_DIGITS = 18
# Calls of one agent run at once (a listing reads up to 5000 rows; an end revokes and
# records), and wait for a turn: an agent serves all its node's workloads, so a few at once
# are normal. Past those waiting, its calls are refused, so that one agent cannot keep the
# threads every agent's begins, ends and mints run on busy.
LISTINGS_PER_AGENT = (2, 16)  # (running, waiting)
ENDS_PER_AGENT = (8, 64)
# Listings running at once across all agents: the others wait their turn, so listings never
# hold more than these of the default executor's threads.
MAX_LISTINGS = 2


def task_to_proto(task: Task, credentials: int = 0) -> task_pb2.Task:
    return task_pb2.Task(
        task_id=task.task_id,
        spiffe_id=task.spiffe_id,
        runtime_id=task.runtime_id,
        actions=list(task.actions),
        resources=list(task.resources),
        expires_at=task.expires_at,
        decision=task.decision,
        reason=task.reason,
        parent_task_id=task.parent_task_id,
        state=task.state.value,
        agent_id=task.agent_id,
        classification=task.classification,
        environment=task.environment,
        on_behalf_of=task.on_behalf_of,
        goal_sha256=task.goal_sha256,
        created_at=task.created_at,
        ended_at=task.ended_at,
        end_reason=task.end_reason,
        policy_ids=list(task.policy_ids),
        policy_set_hash=task.policy_set_hash,
        ttl=task.ttl,
        depth=task.depth,
        credentials=credentials,
        tools=list(task.tools),
        elevated=task.elevated,
    )


# The IDs a request names are checked for their shape before anything is looked up or keyed
# by them (the store's queries, the begin limiter), and a refusal names the field only: the
# value may be megabytes.


def _runtime_id(name: str, value: str) -> str:
    """`value`, unless it is longer than any SPIFFE ID may be (it is parsed later)."""
    if len(value) > MAX_ID_BYTES or len(value.encode()) > MAX_ID_BYTES:
        raise InvalidRequestError(f"{name}: longer than a SPIFFE ID may be ({MAX_ID_BYTES} bytes)")
    return value


def _runtime_ids(values: list[str]) -> list[str]:
    if len(values) > MAX_RUNTIME_IDS:
        raise InvalidRequestError(f"runtime_ids: at most {MAX_RUNTIME_IDS}")
    refuse_nul("runtime_ids", *values)
    for value in values:
        _runtime_id("runtime_ids", value)
    return values


def _entry_ids(values: list[str]) -> list[str]:
    if len(values) > MAX_RUNTIME_IDS:
        raise InvalidRequestError(f"runtime_entry_ids: at most {MAX_RUNTIME_IDS}")
    if not all(is_entry_id(value) for value in values):
        raise InvalidRequestError(
            "runtime_entry_ids: each must be an entry ID (1-64 of A-Z a-z 0-9 _ -)"
        )
    return values


def _entry_id(value: str) -> str:
    """A BeginTask's runtime_entry_id ("" = none named)."""
    if value and not is_entry_id(value):
        raise InvalidRequestError("runtime_entry_id: not an entry ID (1-64 of A-Z a-z 0-9 _ -)")
    return value


def _task_id(name: str, value: str, *, required: bool = True) -> str:
    if not value:
        if required:
            raise InvalidRequestError(f"{name}: required")
        return value
    if not is_task_key(value):
        raise InvalidRequestError(f"{name}: not a task ID (16 lowercase hex digits)")
    return value


def _state(value: str) -> str:
    if value and value not in _STATES:
        raise InvalidRequestError(f"state: {value[:40]!r} is not one of {', '.join(_STATES)}")
    return value


def _spiffe_id(name: str, value: str) -> str:
    """The checked SPIFFE ID of a filter ("" for none)."""
    if not value:
        return ""
    try:
        return str(SpiffeId.parse(value))
    except SpiffeIdError as exc:
        raise InvalidRequestError(f"{name}: {exc}") from None


def _key(at: Task | TaskCursor) -> str:
    return f"{at.created_at}:{at.task_id}"


def _cursor(after: str) -> TaskCursor | None:
    """The cursor a page token carries (`_key` of the last task served)."""
    if not after:
        return None
    created_at, _, task_id = after.partition(":")
    if (
        not (created_at.isascii() and created_at.isdigit())
        or len(created_at) > _MAX_CURSOR_DIGITS
        or not task_id
        or "\x00" in task_id
    ):
        raise InvalidRequestError("page_token: not a token this server issued")
    return TaskCursor(int(created_at), task_id)


class _Page:
    """One task list call: its checked paging fields and filters, and the page it reads."""

    def __init__(
        self,
        request: task_pb2.AdminListTasksRequest | task_pb2.NodeListTasksRequest,
        query: Sequence[object],
    ) -> None:
        self.limit = listing.page_size(request.page_size)
        self.query = query
        self.after = _cursor(listing.decode_token(request.page_token, query))

    def read(
        self,
        service: TaskService,
        *,
        agent_id: str,
        state: str,
        runtime_ids: Sequence[str] | None,
        runtime_entry_ids: Sequence[str] = (),
    ) -> task_pb2.ListTasksResponse:
        """Blocking (SQLite): run it off the event loop. One task past the limit says whether
        a later page exists. Every view of a task (list, show, revoke) counts its credentials
        the same way, so `task list` and `task show` never disagree."""
        found = service.list(
            agent_id=agent_id,
            state=state,
            runtime_ids=runtime_ids,
            runtime_entry_ids=runtime_entry_ids,
            after=self.after,
            limit=self.limit + 1,
        )
        # One grouped query for the page, not one a task: a page of 5000 made 5000 queries.
        counts = service.store.count_credentials_of([t.task_id for t in found.tasks[: self.limit]])
        page, last = listing.take_page(
            ((_key(t), t) for t in found.tasks),
            self.limit,
            lambda t: task_to_proto(t, counts.get(t.task_id, 0)),
        )
        if not last and found.read_to is not None:
            # Every task found is on the page, and the read stopped at its bound on rows: the
            # next page reads on from the last row read (this page may be short, even empty;
            # callers follow tokens until there is none).
            last = _key(found.read_to)
        token = listing.encode_token(last, self.query) if last else ""
        return task_pb2.ListTasksResponse(tasks=page, next_page_token=token)


class NodeTasksServicer(task_pb2_grpc.NodeTasksServicer):  # type: ignore[misc]
    """What an attested agent may ask on behalf of the workloads it attested."""

    def __init__(
        self,
        service: TaskService,
        state: ServerState,
        peers: PeerCache,
        authority: AgentAuthority,
        *,
        refused_validations: RefusalBudget,
        accepted_validations: RefusalBudget,
        begins: KeyedLimiter,
    ) -> None:
        """`refused_validations`, `accepted_validations`: which of an agent's reports of a
        refused token, of an accepted one, are written. `begins`: the task begins allowed to
        each runtime of each agent."""
        self._service = service
        self._state = state
        self._peers = peers
        self._authority = authority
        self._refused_validations = refused_validations
        self._accepted_validations = accepted_validations
        self._begins = begins
        self._listings = AgentTurns("task listings", *LISTINGS_PER_AGENT)
        self._ends = AgentTurns("task ends", *ENDS_PER_AGENT)
        self._listing_threads = asyncio.Semaphore(MAX_LISTINGS)

    async def _agent(self, context: grpc.aio.ServicerContext) -> AttestedAgent:
        return await self._authority.authorize(self._peers.agent_peer(context))

    async def drain(self) -> None:
        """Wait for the ends under way, those whose callers left included (AgentTurns.run):
        the server calls it once its gRPC servers stopped, before it closes the datastore."""
        await self._ends.drain()

    @status.unary
    async def BeginTask(
        self, request: task_pb2.NodeBeginTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.BeginTaskResponse:
        agent = await self._agent(context)
        if request.intent.goal:
            raise InvalidRequestError("intent.goal: send only goal_sha256, never the goal text")
        runtime_id = _runtime_id("runtime_id", request.runtime_id)
        parent_task_id = _task_id("parent_task_id", request.parent_task_id, required=False)
        runtime_entry_id = _entry_id(request.runtime_entry_id)
        # Before anything is decided or written: a refusal here costs the server nothing.
        if not self._begins.try_take(f"{agent.spiffe_id} {runtime_id}"):
            raise RateLimitedError(
                f"runtime {runtime_id[:300]!r} begins tasks faster than "
                "task_begin_rate_per_runtime allows: retry later"
            )
        task = await self._service.begin(
            agent,
            BeginRequest(
                runtime_id=runtime_id,
                actions=tuple(request.intent.actions),
                resources=tuple(request.intent.resources),
                classification=request.intent.classification,
                environment=request.intent.environment,
                on_behalf_of=request.intent.on_behalf_of,
                ttl=request.ttl,
                parent_task_id=parent_task_id,
                goal_sha256=request.goal_sha256,
                tools=tuple(request.intent.tools),
                elevate=request.elevate,
                runtime_entry_id=runtime_entry_id,
            ),
        )
        await self._still_authorized(context, task)
        return task_pb2.BeginTaskResponse(task=task_to_proto(task))

    async def _still_authorized(self, context: grpc.aio.ServicerContext, task: Task) -> None:
        """A ban or an eviction while the task began revoked the agent's tasks as stored then,
        perhaps before this one: it is revoked here instead of outliving its agent (an x509pop
        node attesting again would hold it). A removal after this check finds it stored."""
        peer = self._peers.agent_peer(context)
        try:
            # Memory's word: it accepted the agent as the task began, so a refusal now is news.
            self._state.authorize_agent(peer.spiffe_id, peer.serial)
        except PermissionDeniedError:
            await self._service.revoke(task.task_id, "its agent was removed while it began")
            raise

    @status.unary
    async def EndTask(
        self, request: task_pb2.NodeEndTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.EndTaskResponse:
        agent = await self._agent(context)
        task_id = _task_id("task_id", request.task_id)
        runtime_ids = _runtime_ids(list(request.runtime_ids))
        entry_ids = _entry_ids(list(request.runtime_entry_ids))

        async def end() -> tuple[Task, int]:
            task = await self._service.end(
                agent, task_id, runtime_ids, request.reason, runtime_entry_ids=entry_ids
            )
            # What the end revoked, as the admin views count it (`svid-agent task end` prints it).
            count = await asyncio.to_thread(self._service.store.count_credentials, task.task_id)
            return task, count

        # Held to the end's end even if the caller hangs up: else a caller that hangs up and
        # calls again runs any number of ends at once past its turns.
        task, count = await self._ends.run(agent.spiffe_id, end)
        return task_pb2.EndTaskResponse(task=task_to_proto(task, count))

    @status.unary
    async def ListTasks(
        self, request: task_pb2.NodeListTasksRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        agent = await self._agent(context)
        runtime_ids = sorted(set(_runtime_ids(list(request.runtime_ids))))
        entry_ids = sorted(set(_entry_ids(list(request.runtime_entry_ids))))
        state = _state(request.state)
        # Bound to the caller too: a token is refused when the agent, or the workload's set of
        # identities or entries it lists for, changed since it was issued (entries only when
        # sent, so that an older agent's tokens stay good).
        query: list[object] = ["node-tasks", agent.spiffe_id, runtime_ids, state]
        page = _Page(request, [*query, entry_ids] if entry_ids else query)
        # Held to the thread's end even if the caller gives up: else a caller cancelling at
        # will frees its turns while its listings run on, holding every thread of the pool.
        async with self._listings.hold(agent.spiffe_id), self._listing_threads:
            return await run_held(
                None,
                page.read,
                self._service,
                agent_id=agent.spiffe_id,
                state=state,
                runtime_ids=runtime_ids,
                runtime_entry_ids=entry_ids,
            )

    @status.unary
    async def ReportValidations(
        self, request: task_pb2.ReportValidationsRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ReportValidationsResponse:
        agent = await self._agent(context)
        if len(request.validations) > MAX_VALIDATIONS:
            raise InvalidRequestError(f"validations: at most {MAX_VALIDATIONS} per report")
        # Any local process may have any token validated, a forged one as well as a real one:
        # refusals are written up to the agent's budget, and only counted past it. Accepted
        # ones have a budget of their own: the agent could forge those reports just as fast.
        refused, accepted = self._refused_validations, self._accepted_validations
        kept = [
            v
            for v in request.validations
            if (accepted if v.ok else refused).on_record(agent.spiffe_id)
        ]
        if kept:
            await asyncio.to_thread(self._service.record_validations, agent.spiffe_id, kept)
        return task_pb2.ReportValidationsResponse()


class TaskAdminServicer(task_pb2_grpc.TaskAdminServicer):  # type: ignore[misc]
    def __init__(self, service: TaskService, fleet: PolicyFleet) -> None:
        self._service = service
        self._fleet = fleet

    @status.unary
    async def ListTasks(
        self, request: task_pb2.AdminListTasksRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        agent_id = _spiffe_id("agent_id", request.agent_id)
        runtime_id = _spiffe_id("runtime_id", request.runtime_id)
        state = _state(request.state)
        page = _Page(request, ["tasks", agent_id, state, runtime_id])
        return await asyncio.to_thread(
            page.read,
            self._service,
            agent_id=agent_id,
            state=state,
            runtime_ids=[runtime_id] if runtime_id else None,
        )

    @status.unary
    async def ShowTask(
        self, request: task_pb2.AdminTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Task:
        task = await asyncio.to_thread(self._service.get, _task_id("task_id", request.task_id))
        count = await asyncio.to_thread(self._service.store.count_credentials, task.task_id)
        return task_to_proto(task, count)

    @status.unary
    async def RevokeTask(
        self, request: task_pb2.AdminTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Task:
        task = await self._service.revoke(
            _task_id("task_id", request.task_id), request.reason or "revoked by an operator"
        )
        count = await asyncio.to_thread(self._service.store.count_credentials, task.task_id)
        return task_to_proto(task, count)

    @status.unary
    async def ReloadPolicy(
        self, request: task_pb2.ReloadPolicyRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.PolicySet:

        # Loaded, recorded, then announced: every server sharing the datastore reloads too.
        info = await asyncio.to_thread(self._fleet.reload_here)
        _log.info("policy reloaded", extra={"hash": info.hash})
        return task_pb2.PolicySet(
            hash=info.hash,
            source=info.source,
            files=list(info.files),
            policy_ids=list(info.policy_ids),
            loaded_at=info.loaded_at,
        )

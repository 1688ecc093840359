"""The Tasks service on the Workload API socket: a workload begins, ends and lists its tasks,
and has a task JWT-SVID minted anew (MintTaskJWT).

The caller is identified exactly as for the Workload API (the relay's registry) and may begin a
task only under an identity it holds now. The agent forwards the request to the server, which
decides; the goal text is hashed here and never leaves the node. The caller's entries go with
each request: several workloads may hold one SPIFFE ID through several entries, and each ends,
lists and begins sub-tasks of only the tasks it began itself.
"""

# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc

from agent_attestor.cache import Cache
from agent_attestor.caller_check import checked_caller, not_serving
from agent_attestor.errors import NotReadyError
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.mint_budget import MintBudget
from agent_attestor.mint_calls import (
    MINT_FAILURE_LOG_INTERVAL,
    abort_mint_failure,
    checked_audience,
)
from agent_attestor.model import TASK_PATH, Entry
from agent_attestor.peer import CallerRegistry
from agent_attestor.tasks.client import TaskClient
from svid._clock import Clock, SystemClock
from svid._limits import intent_problem, principal_problem
from svid._log_throttle import KeyedThrottles
from svid._proto import task_pb2, task_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
# Time kept back from the caller's deadline to send it the agent's own answer.
_ANSWER_MARGIN = 0.25
# How long BeginTask waits for the task's entry to reach this agent over Sync (milliseconds,
# usually) so that the workload can fetch its SVIDs as soon as it has the answer.
ENTRY_WAIT = 5.0
MAX_GOAL = 64 * 1024  # bytes, UTF-8
# Seconds between lines of one kind of failure to reach the server: each workload's task call
# while the server was away wrote its own, as fast as any local workload called (nothing
# budgets a call the server never answers).
SERVER_FAILURE_LOG_INTERVAL = 30.0
# Server answers a workload may see as they are; anything else is the agent's problem.
_PASS_THROUGH = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def goal_hash(goal: str) -> str:
    return hashlib.sha256(goal.encode("utf-8")).hexdigest() if goal else ""


def _ids(entries: list[Entry]) -> list[str]:
    """The SPIFFE IDs of `entries`, each once, in their order (the default first)."""
    return list(dict.fromkeys(e.spiffe_id for e in entries))


def _runtime_entry(mine: list[Entry]) -> Entry:
    """Of the caller's entries with the task's runtime ID, the one the task's entry takes its
    selectors from: the most specific, so that no more workloads than need be are given the
    task (several entries may give one ID to different workloads)."""
    return max(mine, key=lambda e: len(e.selectors))


class TasksApi(task_pb2_grpc.TasksServicer):  # type: ignore[misc]
    def __init__(
        self,
        cache: Cache,
        registry: CallerRegistry,
        client: TaskClient,
        jwts: JwtCache,
        *,
        entry_wait: float = ENTRY_WAIT,
        clock: Clock | None = None,
        mints: MintBudget | None = None,
    ) -> None:
        clock = clock or SystemClock()
        self._server_failures = KeyedThrottles(SERVER_FAILURE_LOG_INTERVAL, clock)
        self._mint_failures = KeyedThrottles(MINT_FAILURE_LOG_INTERVAL, clock)
        # The Workload API's (app.py passes the one both use): a uid's fresh task tokens and
        # its cache misses count together.
        self._mints = mints or MintBudget(clock)
        self._cache = cache
        self._registry = registry
        self._client = client
        self._jwts = jwts
        self._entry_wait = entry_wait

    async def _until_served(self, context: grpc.aio.ServicerContext, spiffe_id: str) -> bool:
        """Wait (bounded) until this agent serves `spiffe_id`: the server creates a task's entry
        before it answers, and Sync brings it here a moment later. False when it did not come in
        time; the workload then gets the task anyway and may retry its first fetch."""
        remaining = context.time_remaining()
        budget = self._entry_wait
        if remaining is not None:
            budget = min(budget, remaining - _ANSWER_MARGIN)

        async def arrived() -> None:
            while True:
                seen = self._cache.entries_version
                if any(e.spiffe_id == spiffe_id for e in self._cache.snapshot().entries):
                    return
                await self._cache.wait_entries_change(seen)

        try:
            await asyncio.wait_for(arrived(), max(budget, 0.0))
        except TimeoutError:
            log.info("task entry not here yet", extra={"spiffe_id": spiffe_id, "after": budget})
            return False
        return True

    async def _held_entries(self, context: grpc.aio.ServicerContext) -> list[Entry]:
        """The caller's own entries (not task entries), default first; aborts if none."""
        caller = await checked_caller(context, self._registry)
        snap = self._cache.snapshot()
        problem = not_serving(snap)
        if problem is not None:
            await context.abort(*problem)
        held = [e for e in snap.entries_for(caller.selectors) if not e.is_task]
        if not held:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        return held

    async def _forward(self, context: grpc.aio.ServicerContext, call: Coroutine[Any, Any, T]) -> T:
        """The server's answer to `call`, within the caller's deadline.

        A hung server must not run out the workload's own deadline: then the workload (or the
        CLI) hears only DEADLINE_EXCEEDED and cannot tell a stuck agent from an unreachable server.
        """
        remaining = context.time_remaining()
        budget = None if remaining is None else max(remaining - _ANSWER_MARGIN, 0.05)
        try:
            return await asyncio.wait_for(call, budget)
        except TimeoutError:
            times = self._server_failures.due("timed out")
            if times:
                log.warning(
                    "task request to the server timed out", extra={"after": budget, "times": times}
                )
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "svid-server did not answer the agent in time; retry, and if it persists check "
                "the agent's log and its server_address",
            )
        except NotReadyError:
            # No channel yet (the agent has no SVID, or has not checked the server it is to
            # reach): nothing was sent, and a retry may find it connected.
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the agent is not connected to svid-server yet; retry, and if it persists check "
                "the agent's log and its server_address",
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _PASS_THROUGH:
                await context.abort(exc.code(), exc.details() or "refused by the server")
            times = self._server_failures.due(exc.code())
            if times:
                log.warning(
                    "task request to the server failed",
                    extra={"code": exc.code().name, "times": times},
                )
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                why = "svid-server did not answer the agent in time"
            else:
                why = f"the agent cannot reach svid-server ({exc.code().name})"
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{why}; retry, and if it persists check the agent's log and its server_address",
            )
        raise AssertionError("unreachable")  # pragma: no cover - abort() raises

    async def BeginTask(
        self, request: task_pb2.BeginTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.BeginTaskResponse:
        entries = await self._held_entries(context)
        runtime_id = request.spiffe_id or entries[0].spiffe_id
        mine = [e for e in entries if e.spiffe_id == runtime_id]
        if not mine:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller does not hold {runtime_id[:200]!r}; a task runs under one of its own "
                "identities (a task identity begins sub-tasks with parent_task_id)",
            )
        if len(request.intent.goal.encode()) > MAX_GOAL:  # bytes: what endpoint.MAX_MESSAGE fits
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "intent.goal: too long")
        # The server's own limits, checked here so that an intent it would refuse for its size
        # never leaves the node (nor costs the agent's connection to the server a large call).
        too_big = intent_problem(
            request.intent.actions,
            request.intent.resources,
            request.intent.tools,
            classification=request.intent.classification,
            environment=request.intent.environment,
            on_behalf_of=request.intent.on_behalf_of,
        )
        if too_big:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, too_big)
        if not request.parent_task_id:
            # A task with no parent has no chain to prove a SPIFFE ID as its principal but its
            # runtime's; a sub-task's chain only the server holds.
            unproven = principal_problem(request.intent.on_behalf_of, runtime_id)
            if unproven:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, unproven)
        intent = task_pb2.Intent()
        intent.CopyFrom(request.intent)
        intent.goal = ""
        runtime_entry = _runtime_entry(mine)
        task = await self._forward(
            context,
            self._client.begin(
                task_pb2.NodeBeginTaskRequest(
                    runtime_id=runtime_id,
                    intent=intent,
                    ttl=request.ttl,
                    parent_task_id=request.parent_task_id,
                    goal_sha256=goal_hash(request.intent.goal),
                    elevate=request.elevate,
                    runtime_entry_id=runtime_entry.id,
                )
            ),
        )
        try:
            await self._until_served(context, task.spiffe_id)
        except asyncio.CancelledError:
            # The workload hung up (or ran out its deadline) after the server granted: it never
            # learns this task's ID, so nobody else would end the task before its TTL.
            await asyncio.shield(self._end_unheard(task, runtime_entry.id))
            raise
        return task_pb2.BeginTaskResponse(task=task)

    async def _end_unheard(self, task: task_pb2.Task, runtime_entry_id: str) -> None:
        try:
            await self._client.end(
                task_pb2.NodeEndTaskRequest(
                    task_id=task.task_id,
                    runtime_ids=[task.runtime_id],
                    runtime_entry_ids=[runtime_entry_id],
                    reason="its workload hung up before the answer",
                )
            )
        except Exception as exc:  # the task still ends at its TTL
            log.warning(
                "could not end a task its caller never heard of",
                extra={"task_id": task.task_id, "error": str(exc)},
            )

    async def EndTask(
        self, request: task_pb2.EndTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.EndTaskResponse:
        entries = await self._held_entries(context)
        if not request.task_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "task_id: required")
        # Its entries as well as its identities: another workload holding one of them through
        # another entry began its own tasks, and the server keeps those from this caller.
        task = await self._forward(
            context,
            self._client.end(
                task_pb2.NodeEndTaskRequest(
                    task_id=request.task_id,
                    runtime_ids=_ids(entries),
                    runtime_entry_ids=[e.id for e in entries],
                    reason=request.reason,
                )
            ),
        )
        # Do not wait for the server's revocation push: no cached token of it is served again.
        self._forget_tokens(task)
        return task_pb2.EndTaskResponse(task=task)

    def _forget_tokens(self, task: task_pb2.Task) -> None:
        """Drop the cached JWTs of an ended task and of its sub-tasks: the server ended those
        with it, and their entries leave this agent only with a later Sync message. Which tasks
        are its sub-tasks is not known here, so the tokens of every task of its runtime identity
        go; the others' are minted again when next asked for."""
        if task.runtime_id:
            self._jwts.forget_under(f"{task.runtime_id}{TASK_PATH}")
        self._jwts.forget({task.spiffe_id})

    async def MintTaskJWT(
        self, request: task_pb2.MintTaskJWTRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.MintTaskJWTResponse:
        """A JWT-SVID of one of the caller's task identities minted anew (task.proto says why),
        within its uid's minting rate: a runtime asking in a loop is refused RESOURCE_EXHAUSTED
        past it, as for new audiences, and spends no more of the server's per-agent rate."""
        caller = await checked_caller(context, self._registry)
        audience = await checked_audience(context, request.audience)
        if not request.spiffe_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spiffe_id: required")
        snap = self._cache.snapshot()
        problem = not_serving(snap)
        if problem is not None:
            await context.abort(*problem)
        # Only a task identity: a workload's own JWT-SVID is not traded once per resource, and
        # FetchJWTSVID's cache is what serves it.
        held = [
            e
            for e in snap.index.match(caller.selectors)
            if e.is_task and e.spiffe_id == request.spiffe_id
        ]
        if not held:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller holds no task identity {request.spiffe_id[:200]!r}",
            )
        try:
            jwt = await self._jwts.fresh(
                request.spiffe_id, audience, held[0].id, lambda: self._mints.take(caller.uid)
            )
        except Exception as exc:
            await abort_mint_failure(context, exc, self._mint_failures)
        return task_pb2.MintTaskJWTResponse(svid=jwt.token)

    async def ListTasks(
        self, request: task_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        """One page of the caller's tasks; the server pages, checks the filters and the token
        (bound to the identities listed for: a token of another workload is refused)."""
        entries = await self._held_entries(context)
        if request.spiffe_id:
            if request.spiffe_id not in _ids(entries):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"caller does not hold {request.spiffe_id[:200]!r}; list the tasks of one "
                    "of its own identities, or of all of them with no spiffe_id",
                )
            entries = [e for e in entries if e.spiffe_id == request.spiffe_id]
        return await self._forward(
            context,
            self._client.list(
                task_pb2.NodeListTasksRequest(
                    runtime_ids=_ids(entries),
                    runtime_entry_ids=[e.id for e in entries],
                    page_size=request.page_size,
                    page_token=request.page_token,
                    state=request.state,
                )
            ),
        )

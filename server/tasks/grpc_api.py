"""gRPC transport of the task layer: NodeTasks (agents, mTLS port) and TaskAdmin (admin socket)."""

# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import asyncio
import logging

import grpc

from server import status
from server.datastore.records import AttestedAgent
from server.errors import InvalidRequestError
from server.peer import PeerCache
from server.policy import PolicyEngine
from server.state import ServerState
from server.tasks.model import Task
from server.tasks.service import BeginRequest, TaskService
from svid._proto import task_pb2, task_pb2_grpc

_log = logging.getLogger("svid.server.tasks")
MAX_RUNTIME_IDS = 256
MAX_VALIDATIONS = 1000


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


def _counted(service: TaskService, tasks: list[Task]) -> list[task_pb2.Task]:
    """Tasks with their credential counts: every view of a task (list, show, revoke) counts the
    same rows, so `task list` and `task show` never disagree. Runs off the event loop."""
    return [task_to_proto(t, service.store.count_credentials(t.task_id)) for t in tasks]


def _runtime_ids(values: list[str]) -> list[str]:
    if len(values) > MAX_RUNTIME_IDS:
        raise InvalidRequestError(f"runtime_ids: at most {MAX_RUNTIME_IDS}")
    return values


class NodeTasksServicer(task_pb2_grpc.NodeTasksServicer):  # type: ignore[misc]
    """What an attested agent may ask on behalf of the workloads it attested."""

    def __init__(self, service: TaskService, state: ServerState, peers: PeerCache) -> None:
        self._service = service
        self._state = state
        self._peers = peers

    def _agent(self, context: grpc.aio.ServicerContext) -> AttestedAgent:
        peer = self._peers.agent_peer(context)
        return self._state.authorize_agent(peer.spiffe_id, peer.serial)

    @status.unary
    async def BeginTask(
        self, request: task_pb2.NodeBeginTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.BeginTaskResponse:
        agent = self._agent(context)
        if request.intent.goal:
            raise InvalidRequestError("intent.goal: send only goal_sha256, never the goal text")
        task = await self._service.begin(
            agent,
            BeginRequest(
                runtime_id=request.runtime_id,
                actions=tuple(request.intent.actions),
                resources=tuple(request.intent.resources),
                classification=request.intent.classification,
                environment=request.intent.environment,
                on_behalf_of=request.intent.on_behalf_of,
                ttl=request.ttl,
                parent_task_id=request.parent_task_id,
                goal_sha256=request.goal_sha256,
                tools=tuple(request.intent.tools),
                elevate=request.elevate,
            ),
        )
        return task_pb2.BeginTaskResponse(task=task_to_proto(task))

    @status.unary
    async def EndTask(
        self, request: task_pb2.NodeEndTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.EndTaskResponse:
        agent = self._agent(context)
        runtime_ids = _runtime_ids(list(request.runtime_ids))
        task = await self._service.end(agent, request.task_id, runtime_ids)
        return task_pb2.EndTaskResponse(task=task_to_proto(task))

    @status.unary
    async def ListTasks(
        self, request: task_pb2.NodeListTasksRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        agent = self._agent(context)
        runtime_ids = _runtime_ids(list(request.runtime_ids))
        tasks = await asyncio.to_thread(
            self._service.list, agent_id=agent.spiffe_id, runtime_ids=runtime_ids
        )
        counted = await asyncio.to_thread(_counted, self._service, tasks)
        return task_pb2.ListTasksResponse(tasks=counted)

    @status.unary
    async def ReportValidations(
        self, request: task_pb2.ReportValidationsRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ReportValidationsResponse:
        agent = self._agent(context)
        if len(request.validations) > MAX_VALIDATIONS:
            raise InvalidRequestError(f"validations: at most {MAX_VALIDATIONS} per report")
        await asyncio.to_thread(
            self._service.record_validations, agent.spiffe_id, list(request.validations)
        )
        return task_pb2.ReportValidationsResponse()


class TaskAdminServicer(task_pb2_grpc.TaskAdminServicer):  # type: ignore[misc]
    def __init__(self, service: TaskService, policy: PolicyEngine) -> None:
        self._service = service
        self._policy = policy

    @status.unary
    async def ListTasks(
        self, request: task_pb2.AdminListTasksRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        tasks = await asyncio.to_thread(
            self._service.list, agent_id=request.agent_id, state=request.state
        )
        counted = await asyncio.to_thread(_counted, self._service, tasks)
        return task_pb2.ListTasksResponse(tasks=counted)

    @status.unary
    async def ShowTask(
        self, request: task_pb2.AdminTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Task:
        task = await asyncio.to_thread(self._service.get, request.task_id)
        count = await asyncio.to_thread(self._service.store.count_credentials, task.task_id)
        return task_to_proto(task, count)

    @status.unary
    async def RevokeTask(
        self, request: task_pb2.AdminTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Task:
        task = await self._service.revoke(
            request.task_id, request.reason or "revoked by an operator"
        )
        count = await asyncio.to_thread(self._service.store.count_credentials, task.task_id)
        return task_to_proto(task, count)

    @status.unary
    async def ReloadPolicy(
        self, request: task_pb2.ReloadPolicyRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.PolicySet:
        before = self._policy.policy_set_hash
        try:
            info = await asyncio.to_thread(self._policy.reload)
        except Exception as exc:
            await asyncio.to_thread(
                self._service.audit.append,
                "policy_reload",
                decision="deny",
                reason=str(exc)[:1000],
                policy_set_hash=before,
            )
            raise
        await asyncio.to_thread(
            self._service.audit.append,
            "policy_reload",
            decision="allow",
            policy_ids=info.policy_ids,
            policy_set_hash=info.hash,
            extra={"previous_hash": before, "files": list(info.files)},
        )
        _log.info("policy reloaded", extra={"hash": info.hash})
        return task_pb2.PolicySet(
            hash=info.hash,
            source=info.source,
            files=list(info.files),
            policy_ids=list(info.policy_ids),
            loaded_at=info.loaded_at,
        )

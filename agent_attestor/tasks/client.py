"""The agent's side of the server's NodeTasks service (mTLS, the agent SVID)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import grpc

from svid._proto import task_pb2, task_pb2_grpc

TIMEOUT = 10.0


class TaskClient(Protocol):
    async def begin(self, request: task_pb2.NodeBeginTaskRequest) -> task_pb2.Task: ...

    async def end(self, request: task_pb2.NodeEndTaskRequest) -> task_pb2.Task: ...

    async def list(self, request: task_pb2.NodeListTasksRequest) -> task_pb2.ListTasksResponse: ...


class GrpcTaskClient:
    """Calls NodeTasks on whatever channel `channel()` returns now (the current agent SVID's)."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel]) -> None:
        self._channel = channel

    def _stub(self) -> task_pb2_grpc.NodeTasksStub:
        return task_pb2_grpc.NodeTasksStub(self._channel())

    async def begin(self, request: task_pb2.NodeBeginTaskRequest) -> task_pb2.Task:
        reply = await self._stub().BeginTask(request, timeout=TIMEOUT)
        task: task_pb2.Task = reply.task
        return task

    async def end(self, request: task_pb2.NodeEndTaskRequest) -> task_pb2.Task:
        reply = await self._stub().EndTask(request, timeout=TIMEOUT)
        task: task_pb2.Task = reply.task
        return task

    async def list(self, request: task_pb2.NodeListTasksRequest) -> task_pb2.ListTasksResponse:
        """One page of the caller's tasks, and the token for the next ("" on the last)."""
        reply: task_pb2.ListTasksResponse = await self._stub().ListTasks(request, timeout=TIMEOUT)
        return reply

    async def report(self, request: task_pb2.ReportValidationsRequest) -> None:
        await self._stub().ReportValidations(request, timeout=TIMEOUT)

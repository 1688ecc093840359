"""The task SDK refuses an intent past the limits the agent and the server enforce
(svid._limits.intent_problem) before calling the agent, in the same words, as a TaskRequestError
(a ValueError): a runtime passing 5,000 resources learns it at once, not after a round trip,
and nothing leaves the process."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from svid._limits import MAX_INTENT_RESOURCES, MAX_ON_BEHALF_OF_BYTES
from svid._proto import task_pb2, task_pb2_grpc
from svid.tasks import AsyncTaskClient, TaskClient, TaskRequestError
from tests.tmpdirs import short_tmpdir

RUNTIME = "spiffe://example.org/runtime"
# Each intent with the first limit it passes, in the words of the agent and the server.
OVERSIZED: dict[str, tuple[dict[str, Any], str]] = {
    "resources": (
        {"actions": ["read"], "resources": [f"docs/{i}" for i in range(5000)]},
        "intent.resources: 5000 values, at most 64 allowed",
    ),
    "tools": (
        {
            "actions": ["read"],
            "resources": ["docs"],
            "tools": {"mcp": [f"t{i}" for i in range(65)]},
        },
        "intent.tools: 65 values, at most 64 allowed",
    ),
    "on_behalf_of": (
        {"actions": ["read"], "resources": ["docs"], "on_behalf_of": "u" * 513},
        f"intent.on_behalf_of: 513 bytes, at most {MAX_ON_BEHALF_OF_BYTES} bytes (UTF-8) allowed",
    ),
}
# What a sub-task or an elevated step may name (no principal: it comes from the parent task).
CHILD = OVERSIZED["resources"]


class _CountingTasks(task_pb2_grpc.TasksServicer):  # type: ignore[misc]
    """An agent's Tasks API that counts the begins it is asked, and grants each."""

    def __init__(self) -> None:
        self.begins = 0
        self._lock = threading.Lock()

    @staticmethod
    def _task(task_id: str, state: str) -> task_pb2.Task:
        return task_pb2.Task(
            task_id=task_id,
            spiffe_id=f"{RUNTIME}/task/{task_id}",
            runtime_id=RUNTIME,
            actions=["read"],
            resources=["docs"],
            ttl=60,
            decision="allow",
            state=state,
        )

    def BeginTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.begins += 1
            task_id = f"t{self.begins}"
        return task_pb2.BeginTaskResponse(task=self._task(task_id, "active"))

    def EndTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        return task_pb2.EndTaskResponse(task=self._task(request.task_id, "ended"))


@dataclass
class _Agent:
    tasks: _CountingTasks
    address: str


@pytest.fixture
def agent() -> Iterator[_Agent]:
    root = short_tmpdir("til")
    tasks = _CountingTasks()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    task_pb2_grpc.add_TasksServicer_to_server(tasks, server)
    address = f"unix://{root / 'api.sock'}"
    server.add_insecure_port(address)
    server.start()
    try:
        yield _Agent(tasks, address)
    finally:
        server.stop(grace=None).wait()
        shutil.rmtree(root, ignore_errors=True)


def _assert_refused(refused: pytest.ExceptionInfo[TaskRequestError], problem: str) -> None:
    assert str(refused.value) == problem
    assert refused.value.code == "INVALID_ARGUMENT"
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize("name", list(OVERSIZED))
def test_the_sync_client_refuses_an_oversized_intent_without_calling_the_agent(
    agent: _Agent, name: str
) -> None:
    intent, problem = OVERSIZED[name]
    with TaskClient(agent.address, watch_revocations=False) as client:
        with pytest.raises(TaskRequestError) as refused:
            client.begin(**intent)
        _assert_refused(refused, problem)
        assert agent.tasks.begins == 0


@pytest.mark.parametrize("name", list(OVERSIZED))
def test_the_async_client_refuses_an_oversized_intent_without_calling_the_agent(
    agent: _Agent, name: str
) -> None:
    intent, problem = OVERSIZED[name]

    async def scenario() -> None:
        async with AsyncTaskClient(agent.address, watch_revocations=False) as client:
            with pytest.raises(TaskRequestError) as refused:
                await client.begin(**intent)
            _assert_refused(refused, problem)
            assert agent.tasks.begins == 0

    asyncio.run(scenario())


def test_sync_sub_tasks_and_elevated_steps_are_held_to_the_same_limits(agent: _Agent) -> None:
    intent, problem = CHILD
    at_limit = [f"docs/{i}" for i in range(MAX_INTENT_RESOURCES)]
    with (
        TaskClient(agent.address, watch_revocations=False) as client,
        client.begin(actions=["read"], resources=at_limit) as task,
    ):
        assert agent.tasks.begins == 1  # at the limit: the agent is asked
        for child in (task.subtask, task.elevate):
            with pytest.raises(TaskRequestError) as refused:
                child(**intent)
            _assert_refused(refused, problem)
        assert agent.tasks.begins == 1


def test_async_sub_tasks_and_elevated_steps_are_held_to_the_same_limits(agent: _Agent) -> None:
    intent, problem = CHILD
    at_limit = [f"docs/{i}" for i in range(MAX_INTENT_RESOURCES)]

    async def scenario() -> None:
        async with (
            AsyncTaskClient(agent.address, watch_revocations=False) as client,
            client.begin(actions=["read"], resources=at_limit) as task,
        ):
            assert agent.tasks.begins == 1
            for child in (task.subtask, task.elevate):
                with pytest.raises(TaskRequestError) as refused:
                    await child(**intent)
                _assert_refused(refused, problem)
            assert agent.tasks.begins == 1

    asyncio.run(scenario())

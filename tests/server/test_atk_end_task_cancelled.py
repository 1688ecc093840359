"""Attack repro: task ends whose callers hang up keep their turns until the end is done.

EndTask runs `service.end` within the agent's turns for ends (grpc_api.ENDS_PER_AGENT). A call
cancelled while its end runs (its client gone, its deadline passed) left the `async with` at
once, while the end's thread work ran on: an agent hanging up and calling again ran any number
of ends at once past its turns, and each end cut short was left claimed, not yet revoked."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from server.agent_turns import AgentTurns
from server.tasks import grpc_api
from server.tasks.model import Task, TaskState
from server.tasks.store import TaskStore
from svid._proto import task_pb2, task_pb2_grpc
from tests.server.fixtures import managed_server


def test_an_end_whose_caller_hangs_up_holds_its_turn_until_it_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One end at a time, none waiting: a second while one runs is refused.
    monkeypatch.setattr(grpc_api, "ENDS_PER_AGENT", (1, 0))
    entered, release, answered = (threading.Event() for _ in range(3))
    finish = TaskStore.finish
    slow: list[str] = []

    def slow_finish(self: TaskStore, task: Task, *args: Any) -> Task | None:
        # The first end's claim waits, as on a slow datastore, until the test lets it go.
        if task.task_id in slow:
            entered.set()
            assert release.wait(10)
        return finish(self, task, *args)

    monkeypatch.setattr(TaskStore, "finish", slow_finish)
    end_task = grpc_api.NodeTasksServicer.EndTask

    async def watched(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # When the call has let go of everything (its turn too), its caller gone or not.
        try:
            return await end_task(self, request, context)
        finally:
            if request.task_id in slow:
                answered.set()

    monkeypatch.setattr(grpc_api.NodeTasksServicer, "EndTask", watched)
    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/ender", agent.spiffe_id).spiffe_id
        stub = task_pb2_grpc.NodeTasksStub(server.node_channel(agent))

        def begin() -> task_pb2.Task:
            reply = stub.BeginTask(
                task_pb2.NodeBeginTaskRequest(
                    runtime_id=runtime,
                    intent=task_pb2.Intent(actions=["read"], resources=["docs"]),
                ),
                timeout=10,
            )
            return reply.task

        first, second = begin(), begin()
        slow.append(first.task_id)
        call = stub.EndTask.future(
            task_pb2.NodeEndTaskRequest(task_id=first.task_id, runtime_ids=[runtime]), timeout=30
        )
        assert entered.wait(10)
        call.cancel()  # the caller hangs up while its end runs
        # A round trip on the same connection after the hang-up: the server has seen it (its
        # RST_STREAM came first) and cancelled the call by the time this is answered.
        stub.ListTasks(task_pb2.NodeListTasksRequest(runtime_ids=[runtime]), timeout=10)
        end_second = task_pb2.NodeEndTaskRequest(task_id=second.task_id, runtime_ids=[runtime])
        with pytest.raises(grpc.RpcError) as refused:
            stub.EndTask(end_second, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "task ends under way or waiting" in refused.value.details()  # type: ignore[attr-defined]
        release.set()
        # The end its caller left is carried out in full, and then the turn is free again.
        assert answered.wait(10)
        ended = server.server.tasks.service.store.get_task(first.task_id)
        assert ended is not None
        assert ended.state == TaskState.ENDED  # settled, not left ENDING
        assert stub.EndTask(end_second, timeout=10).task.state == TaskState.ENDED.value


def test_a_server_stop_closes_the_datastore_only_once_an_end_whose_caller_left_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The end of a caller that hung up ran on past the stop, which no call held up: the
    # datastore was closed under it, and the end failed half done, unheard.
    entered, release, finished = (threading.Event() for _ in range(3))
    finish = TaskStore.finish
    slow: list[str] = []
    ended: list[Task | None] = []

    def slow_finish(self: TaskStore, task: Task, *args: Any) -> Task | None:
        if task.task_id not in slow:
            return finish(self, task, *args)
        entered.set()
        assert release.wait(10)
        try:
            ended.append(finish(self, task, *args))
            return ended[-1]
        finally:
            finished.set()

    monkeypatch.setattr(TaskStore, "finish", slow_finish)
    drain = getattr(AgentTurns, "drain", None)

    async def draining(self: AgentTurns) -> None:
        # The stop waits for the ends under way: this one may go on now.
        release.set()
        if drain is not None:
            await drain(self)

    monkeypatch.setattr(AgentTurns, "drain", draining, raising=False)
    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/ender", agent.spiffe_id).spiffe_id
        stub = task_pb2_grpc.NodeTasksStub(server.node_channel(agent))
        task = stub.BeginTask(
            task_pb2.NodeBeginTaskRequest(
                runtime_id=runtime, intent=task_pb2.Intent(actions=["read"], resources=["docs"])
            ),
            timeout=10,
        ).task
        slow.append(task.task_id)
        call = stub.EndTask.future(
            task_pb2.NodeEndTaskRequest(task_id=task.task_id, runtime_ids=[runtime]), timeout=30
        )
        assert entered.wait(10)
        call.cancel()
        stub.ListTasks(task_pb2.NodeListTasksRequest(runtime_ids=[runtime]), timeout=10)
        datastore = server.server.datastore
        close = datastore.close
        end_done_at_close: list[bool] = []

        def closing() -> None:
            end_done_at_close.append(finished.is_set())
            release.set()  # without a wait for it, the end goes on against a closed store
            close()

        monkeypatch.setattr(datastore, "close", closing)
        server.call(server.server.stop())
        assert end_done_at_close == [True]
        assert [t.state if t else None for t in ended] == [TaskState.ENDED]

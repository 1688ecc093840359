"""How many tasks a runtime may begin, and hold, on a running server: one workload beginning
tasks through its agent must neither flood the server (a task row, an entry pushed to the
agent and audit events each) nor crowd out the node's other workloads."""

from __future__ import annotations

import grpc
import pytest

from svid._proto import task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, Agent, RunningServer, managed_server


def _begin(server: RunningServer, agent: Agent, runtime_id: str) -> task_pb2.Task:
    with grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    ) as channel:
        reply = task_pb2_grpc.NodeTasksStub(channel).BeginTask(
            task_pb2.NodeBeginTaskRequest(
                runtime_id=runtime_id,
                intent=task_pb2.Intent(actions=["read"], resources=["docs"]),
                ttl=300,
            ),
            timeout=10,
        )
    task: task_pb2.Task = reply.task
    return task


def _refused(server: RunningServer, agent: Agent, runtime_id: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _begin(server, agent, runtime_id)
    return caught.value


def test_a_runtime_begins_tasks_up_to_its_rate_and_others_keep_theirs() -> None:
    with managed_server(task_begin_rate_per_runtime=1, task_begin_burst_per_runtime=3) as server:
        agent = server.attest()
        busy = server.create_entry("/agents/busy", agent.spiffe_id).spiffe_id
        quiet = server.create_entry("/agents/quiet", agent.spiffe_id).spiffe_id
        for _ in range(3):
            _begin(server, agent, busy)
        refused = _refused(server, agent, busy)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "task_begin_rate_per_runtime" in refused.details()  # type: ignore[attr-defined]
        assert busy in refused.details()  # type: ignore[attr-defined]
        # Refused before anything was written.
        assert len(server.server.tasks.store.list_tasks(runtime_ids=[busy])) == 3
        # Another workload of the same node is not held back by this one.
        _begin(server, agent, quiet)
        server.clock.advance(1)
        _begin(server, agent, busy)


def test_a_runtime_holds_at_most_its_cap_of_active_tasks() -> None:
    with managed_server(max_active_tasks_per_runtime=2) as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/holder", agent.spiffe_id).spiffe_id
        other = server.create_entry("/agents/other", agent.spiffe_id).spiffe_id
        first = _begin(server, agent, runtime)
        _begin(server, agent, runtime)
        refused = _refused(server, agent, runtime)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "2 active tasks" in refused.details()  # type: ignore[attr-defined]
        assert "max_active_tasks_per_runtime" in refused.details()  # type: ignore[attr-defined]
        _begin(server, agent, other)  # its own count
        # Ending one makes room again.
        with grpc.secure_channel(
            server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
        ) as channel:
            task_pb2_grpc.NodeTasksStub(channel).EndTask(
                task_pb2.NodeEndTaskRequest(task_id=first.task_id, runtime_ids=[runtime]),
                timeout=10,
            )
        _begin(server, agent, runtime)
        # So does a task running out.
        server.clock.advance(301)
        server.call(server.server.tasks.service.expire_due())
        _begin(server, agent, runtime)

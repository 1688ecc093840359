"""Attack repro: one node's workload fills the active-task cap of every node's instances of it.

max_active_tasks_per_runtime counts a runtime's active tasks by SPIFFE ID across the trust
domain (TaskService._held), while the begin rate is per agent and runtime. One SPIFFE ID commonly
runs on many nodes (one entry per node, or an entry under a node alias): a hostile instance, or a
compromised agent serving it, begins tasks up to the cap and the same service on every other node
is refused RESOURCE_EXHAUSTED until those tasks end (their TTL, up to the maximum)."""

from __future__ import annotations

import grpc

from svid._proto import task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, Agent, RunningServer, managed_server

# Lowered from the default 1000 to keep the test short: what is wrong is whose tasks it counts.
CAP = 5
_READ_DOCS = task_pb2.Intent(actions=["read"], resources=["docs"])


def _begin(server: RunningServer, agent: Agent, runtime_id: str) -> task_pb2.Task:
    with grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    ) as channel:
        reply = task_pb2_grpc.NodeTasksStub(channel).BeginTask(
            task_pb2.NodeBeginTaskRequest(runtime_id=runtime_id, intent=_READ_DOCS, ttl=300),
            timeout=10,
        )
    task: task_pb2.Task = reply.task
    return task


def test_one_nodes_tasks_do_not_use_up_the_cap_of_the_same_runtime_on_another_node() -> None:
    with managed_server(max_active_tasks_per_runtime=CAP) as server:
        hostile, honest = server.attest(), server.attest()
        # The same service on two nodes: one entry each, one SPIFFE ID.
        runtime = server.create_entry("/agents/research-bot", hostile.spiffe_id).spiffe_id
        assert server.create_entry("/agents/research-bot", honest.spiffe_id).spiffe_id == runtime
        for _ in range(CAP):
            _begin(server, hostile, runtime)
        try:
            task = _begin(server, honest, runtime)
        except grpc.RpcError as exc:
            raise AssertionError(
                f"the honest node's first task was refused: {exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
            ) from None
        assert task.agent_id == honest.spiffe_id

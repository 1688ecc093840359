"""Attack repro: one node's out-of-intent requests stop the same runtime on every other node.

A task mint for an audience outside the task's resources is a flagged violation, counted by
runtime SPIFFE ID across the trust domain (TaskService.violations), and the shipped policy
forbids everything to a runtime with 3 in the last hour (`stop_risky_agents`). One SPIFFE ID
commonly runs on many nodes: three requests from one compromised agent (or one hostile instance)
freeze that service's tasks on every node for an hour, its honest instances included."""

from __future__ import annotations

import grpc
import pytest

from svid._proto import node_pb2, node_pb2_grpc, task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, Agent, RunningServer, managed_server

_READ_DOCS = task_pb2.Intent(actions=["read"], resources=["docs"])


def _channel(server: RunningServer, agent: Agent) -> grpc.Channel:
    return grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    )


def _begin(server: RunningServer, agent: Agent, runtime_id: str) -> task_pb2.Task:
    with _channel(server, agent) as channel:
        reply = task_pb2_grpc.NodeTasksStub(channel).BeginTask(
            task_pb2.NodeBeginTaskRequest(runtime_id=runtime_id, intent=_READ_DOCS, ttl=300),
            timeout=10,
        )
    task: task_pb2.Task = reply.task
    return task


def test_one_nodes_violations_do_not_stop_the_same_runtime_on_another_node() -> None:
    with managed_server() as server:
        hostile, honest = server.attest(), server.attest()
        # The same service on two nodes: one entry each, one SPIFFE ID.
        runtime = server.create_entry("/agents/research-bot", hostile.spiffe_id).spiffe_id
        assert server.create_entry("/agents/research-bot", honest.spiffe_id).spiffe_id == runtime
        task = _begin(server, hostile, runtime)
        with _channel(server, hostile) as channel:
            node = node_pb2_grpc.NodeStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as caught:
                    node.NewJWTSVID(
                        node_pb2.NewJWTSVIDRequest(spiffe_id=task.spiffe_id, audience=["payroll"]),
                        timeout=10,
                    )
                code = caught.value.code()  # type: ignore[attr-defined]
                assert code == grpc.StatusCode.PERMISSION_DENIED
        try:
            granted = _begin(server, honest, runtime)
        except grpc.RpcError as exc:
            raise AssertionError(
                f"the honest node's task was refused: {exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
            ) from None
        assert granted.agent_id == honest.spiffe_id

"""What the agent's log says when workloads' task calls cannot reach svid-server, however many
calls they make: over the real Workload API socket, the server answering UNAVAILABLE."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from agent_attestor.endpoint import WorkloadEndpoint
from agent_attestor.tasks.api import SERVER_FAILURE_LOG_INTERVAL, TasksApi
from agent_attestor.workload_attestor import UnixAttestor
from svid._proto import task_pb2, task_pb2_grpc
from tests.agent_attestor.harness import HEADER, Harness
from tests.log_lines import LogLines, log_lines
from tests.rpc_errors import rpc_error

CALLS = 30
MESSAGE = "task request to the server failed"


class GoneServer:
    """A NodeTasks client whose server is down: every call fails as the real client's does."""

    async def list(self, request: task_pb2.NodeListTasksRequest) -> task_pb2.ListTasksResponse:
        raise rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")


@pytest.fixture
def said() -> Iterator[LogLines]:
    with log_lines("agent_attestor.tasks.api", MESSAGE) as lines:
        yield lines


def test_calls_that_cannot_reach_the_server_are_logged_once_an_interval(said: LogLines) -> None:
    """Fails on main: each call wrote its own warning, as fast as any local workload called."""
    h = Harness()
    tasks = TasksApi(h.cache, h.registry, GoneServer(), h.jwts, clock=h.clock)
    endpoint = WorkloadEndpoint(
        socket_path=h.root / "public" / "tasks.sock",
        private_dir=h.root / "private2",
        servicer=h.api,
        registry=h.registry,
        attestors=[UnixAttestor()],
        extra_servicers=[lambda server: task_pb2_grpc.add_TasksServicer_to_server(tasks, server)],
    )
    h.lt.run(endpoint.start())
    h.add_entry("/bot")
    channel = grpc.insecure_channel(f"unix:{endpoint.socket_path}")
    stub = task_pb2_grpc.TasksStub(channel)

    def call() -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            stub.ListTasks(task_pb2.ListTasksRequest(), metadata=HEADER, timeout=5)
        return info.value.code()  # type: ignore[attr-defined, no-any-return]

    try:
        assert {call() for _ in range(CALLS)} == {grpc.StatusCode.UNAVAILABLE}
        assert [getattr(r, "times", None) for r in said.records] == [1]
        h.clock.advance(SERVER_FAILURE_LOG_INTERVAL)
        assert call() is grpc.StatusCode.UNAVAILABLE
        assert [getattr(r, "times", None) for r in said.records] == [1, CALLS]
        assert said.records[-1].code == "UNAVAILABLE"  # type: ignore[attr-defined]
    finally:
        channel.close()
        h.lt.run(endpoint.stop(0))
        h.close()

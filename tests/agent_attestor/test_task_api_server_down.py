"""A workload's task call when the agent cannot reach svid-server, or the server hangs: the agent
answers UNAVAILABLE, saying so, inside the workload's own deadline (the CLI then prints that)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from agent_attestor.endpoint import WorkloadEndpoint
from agent_attestor.tasks.api import TasksApi
from agent_attestor.workload_attestor import UnixAttestor
from svid._proto import task_pb2, task_pb2_grpc
from tests.agent_attestor.harness import HEADER, Harness


class HungServer:
    """A NodeTasks client whose server never answers (the real client gives up after 10 s)."""

    async def _hang(self) -> task_pb2.Task:
        await asyncio.sleep(10)
        raise AssertionError("the agent waited on the server past its caller's deadline")

    async def begin(self, request: task_pb2.NodeBeginTaskRequest) -> task_pb2.Task:
        return await self._hang()

    async def end(self, request: task_pb2.NodeEndTaskRequest) -> task_pb2.Task:
        return await self._hang()

    async def list(self, request: task_pb2.NodeListTasksRequest) -> task_pb2.ListTasksResponse:
        return task_pb2.ListTasksResponse(tasks=[await self._hang()])


@pytest.fixture
def stub() -> Iterator[task_pb2_grpc.TasksStub]:
    h = Harness()
    tasks = TasksApi(h.cache, h.registry, HungServer(), h.jwts)
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
    try:
        yield task_pb2_grpc.TasksStub(channel)
    finally:
        channel.close()
        h.lt.run(endpoint.stop(0))
        h.close()


@pytest.mark.parametrize("call", ["begin", "end", "list"])
def test_a_hung_server_is_reported_inside_the_callers_deadline(
    stub: task_pb2_grpc.TasksStub, call: str
) -> None:
    calls = {
        "begin": lambda: stub.BeginTask(
            task_pb2.BeginTaskRequest(intent=task_pb2.Intent(actions=["read"], resources=["d"])),
            metadata=HEADER,
            timeout=2,
        ),
        "end": lambda: stub.EndTask(
            task_pb2.EndTaskRequest(task_id="t1"), metadata=HEADER, timeout=2
        ),
        "list": lambda: stub.ListTasks(task_pb2.ListTasksRequest(), metadata=HEADER, timeout=2),
    }
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        calls[call]()
    assert time.monotonic() - started < 2.5
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    details = info.value.details()  # type: ignore[attr-defined]
    assert "svid-server" in details
    assert "did not answer" in details

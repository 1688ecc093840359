"""The agent's gRPC health service, on its real Workload API socket."""

from __future__ import annotations

import asyncio
import os
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from agent_attestor.app import HEALTH_SERVICE, AgentApp
from agent_attestor.config import build_config
from tests.agent_attestor.harness import short_tmpdir

Status = health_pb2.HealthCheckResponse


def test_check_and_watch_follow_set_without_a_security_header() -> None:
    """As a kubelet or grpc_health_probe asks: no header. A Watch sees each change, an unknown
    service is NOT_FOUND to Check and SERVICE_UNKNOWN to Watch, and after the graceful
    shutdown everything is NOT_SERVING and stays so."""
    root = short_tmpdir()

    async def scenario() -> None:
        socket_path = root / "public" / "api.sock"
        app = AgentApp(
            build_config({"data_dir": str(root / "agent"), "socket_path": str(socket_path)}, {})
        )
        await app.health.set(HEALTH_SERVICE, Status.NOT_SERVING)
        await app.endpoint.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)

                async def check(service: str) -> int:
                    request = health_pb2.HealthCheckRequest(service=service)
                    return int((await stub.Check(request, timeout=5)).status)

                assert await check(HEALTH_SERVICE) == Status.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await check("other")
                assert exc.value.code() == grpc.StatusCode.NOT_FOUND

                watch = stub.Watch(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE))
                unknown = stub.Watch(health_pb2.HealthCheckRequest(service="other"))
                assert (await unknown.read()).status == Status.SERVICE_UNKNOWN
                assert (await watch.read()).status == Status.NOT_SERVING
                await app.health.set(HEALTH_SERVICE, Status.SERVING)
                assert (await asyncio.wait_for(watch.read(), 5)).status == Status.SERVING
                assert await check(HEALTH_SERVICE) == Status.SERVING
                await app.health.enter_graceful_shutdown()
                assert (await asyncio.wait_for(watch.read(), 5)).status == Status.NOT_SERVING
                await app.health.set(HEALTH_SERVICE, Status.SERVING)  # ignored now
                assert await check(HEALTH_SERVICE) == Status.NOT_SERVING
                watch.cancel()
                unknown.cancel()
        finally:
            await app.endpoint.stop(0)

    try:
        asyncio.run(scenario())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_watch_gives_its_stream_back_when_it_ends() -> None:
    """A Watch counts against its uid's budget while open, and only then."""
    root = short_tmpdir()

    async def scenario() -> None:
        socket_path = root / "public" / "api.sock"
        app = AgentApp(
            build_config(
                {
                    "data_dir": str(root / "agent"),
                    "socket_path": str(socket_path),
                    "max_streams_per_uid": 1,
                },
                {},
            )
        )
        await app.health.set("", Status.SERVING)
        await app.endpoint.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(3):  # each one ended before the next: the budget of 1 is enough
                    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                    assert (await watch.read()).status == Status.SERVING
                    second = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await second.read()  # past the budget
                    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    watch.cancel()
                    for _ in range(100):  # the handler's end runs after the cancel arrives
                        if app.api.streams.held_by(os.geteuid()) == 0:
                            break
                        await asyncio.sleep(0.01)
        finally:
            await app.endpoint.stop(0)

    try:
        asyncio.run(scenario())
    finally:
        shutil.rmtree(root, ignore_errors=True)

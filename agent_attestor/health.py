"""The gRPC health service on the Workload API socket (grpc.health.v1.Health).

Ours rather than grpcio's asyncio HealthServicer: that one writes each Watch answer while
holding the lock its `set` takes too, so one local user's Watch that grants no HTTP/2 window
froze the agent's health and its stop. Here `set` only records the status and wakes the
Watches; each Watch writes on its own, and a write that cannot go out holds that stream alone.

Check needs nothing of its caller: probes (kubelet, grpc_health_probe) send no security header.
A Watch is a stream held open, so it counts against its uid's max_streams_per_uid like every
other stream on the socket (stream_budget.py); it needs no header, only a connection the relay
identified (any relayed one: the uid is what is counted).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from agent_attestor.caller_check import open_stream
from agent_attestor.peer import CallerRegistry
from agent_attestor.stream_budget import StreamBudget

_Status = health_pb2.HealthCheckResponse


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, registry: CallerRegistry, streams: StreamBudget) -> None:
        self._registry = registry
        self._streams = streams
        self._status: dict[str, Any] = {}
        self._changed = asyncio.Event()  # set, and replaced, at every change
        self._shutting_down = False

    async def set(self, service: str, status: Any) -> None:
        """Record `service`'s status and wake its Watches; never waits on any of them. After
        enter_graceful_shutdown, ignored (as grpcio's): the agent is going."""
        if self._shutting_down or self._status.get(service) == status:
            return
        self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        for service in self._status:
            self._status[service] = _Status.NOT_SERVING
        self._shutting_down = True
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        caller = self._registry.lookup(context.peer())
        if caller is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "caller could not be identified")
        assert caller is not None  # abort() raises
        await open_stream(context, self._streams, caller)
        try:
            sent = None
            while True:
                changed = self._changed  # taken before reading: a change meanwhile wakes us
                status = self._status.get(request.service, _Status.SERVICE_UNKNOWN)
                if status != sent:
                    sent = status
                    yield health_pb2.HealthCheckResponse(status=status)
                    continue  # it may have changed while the write waited
                await changed.wait()
        finally:
            self._streams.give_back(caller.uid)

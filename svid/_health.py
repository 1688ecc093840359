"""The gRPC health service of svidd's daemons (grpc.health.v1.Health), the server's node ports
and admin socket and the agent's Workload API socket alike.

Ours rather than grpcio's asyncio HealthServicer: that one writes each Watch answer while
holding the lock its `set` takes too, so one Watch that grants no HTTP/2 window (any local user
on the agent's socket; anyone who reaches the server's attest port, where no client certificate
is asked) froze the daemon's health and its stop. Here `set` only records the status and wakes
the Watches; each Watch writes on its own, and a write that cannot go out holds that stream
alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

_Status = health_pb2.HealthCheckResponse


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self._status: dict[str, Any] = {}
        self._changed = asyncio.Event()  # set, and replaced, at every change
        self._shutting_down = False

    async def set(self, service: str, status: Any) -> None:
        """Record `service`'s status and wake its Watches; never waits on any of them. After
        enter_graceful_shutdown, ignored (as grpcio's): the daemon is going."""
        if self._shutting_down or self._status.get(service) == status:
            return
        self._status[service] = status
        self._wake()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        for service in self._status:
            self._status[service] = _Status.NOT_SERVING
        self._shutting_down = True
        self._wake()

    def _wake(self) -> None:
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
        async for answer in self.answers(request.service):
            yield answer

    async def answers(self, service: str) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """A Watch's answers for `service`: its status now, then each change, for ever."""
        sent = None
        while True:
            changed = self._changed  # taken before reading: a change meanwhile wakes us
            status = self._status.get(service, _Status.SERVICE_UNKNOWN)
            if status != sent:
                sent = status
                yield health_pb2.HealthCheckResponse(status=status)
                continue  # it may have changed while the write waited
            await changed.wait()

"""The gRPC health service on the Workload API socket (grpc.health.v1.Health): svid's, whose
`set` never waits on a Watch (svid/_health.py), with each Watch counted.

Check needs nothing of its caller: probes (kubelet, grpc_health_probe) send no security header.
A Watch is a stream held open, so it counts against its uid's max_streams_per_uid like every
other stream on the socket (stream_budget.py); it needs no header, only a connection the relay
identified (any relayed one: the uid is what is counted).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2  # type: ignore[import-untyped]

from agent_attestor.caller_check import open_stream
from agent_attestor.peer import CallerRegistry
from agent_attestor.stream_budget import StreamBudget
from svid._health import HealthServicer as _Health


class HealthServicer(_Health):
    def __init__(self, registry: CallerRegistry, streams: StreamBudget) -> None:
        super().__init__()
        self._registry = registry
        self._streams = streams

    async def Watch(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        caller = self._registry.lookup(context.peer())
        if caller is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "caller could not be identified")
        assert caller is not None  # abort() raises
        await open_stream(context, self._streams, caller)
        try:
            async for answer in self.answers(request.service):
                yield answer
        finally:
            self._streams.give_back(caller.uid)

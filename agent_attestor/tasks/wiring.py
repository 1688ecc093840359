"""Attach the task layer to the agent: the Tasks and Revocations services on the Workload API
socket, the validation reporter and the JWT cache pruning. app.py calls `build_task_layer` and
passes `extra_servicers` to WorkloadEndpoint and `background()` to its task list."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from agent_attestor.cache import Cache
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.mint_budget import MintBudget
from agent_attestor.peer import CallerRegistry
from agent_attestor.server_link import ServerLink
from agent_attestor.stream_budget import StreamBudget
from agent_attestor.tasks.api import TasksApi
from agent_attestor.tasks.client import GrpcTaskClient
from agent_attestor.tasks.forget import forget_removed_identities
from agent_attestor.tasks.reporter import ValidationReporter
from agent_attestor.tasks.revocations import Expiries, RevocationsApi
from svid._clock import Clock
from svid._proto import revocation_pb2_grpc, task_pb2_grpc


@dataclass
class AgentTaskLayer:
    tasks: TasksApi
    revocations: RevocationsApi
    reporter: ValidationReporter
    cache: Cache
    jwts: JwtCache

    @property
    def extra_servicers(self) -> list[Callable[[grpc.aio.Server], None]]:
        return [
            lambda server: task_pb2_grpc.add_TasksServicer_to_server(self.tasks, server),
            lambda server: revocation_pb2_grpc.add_RevocationsServicer_to_server(
                self.revocations, server
            ),
        ]

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self.reporter.run(), forget_removed_identities(self.cache, self.jwts)]


def build_task_layer(
    *,
    cache: Cache,
    registry: CallerRegistry,
    jwts: JwtCache,
    clock: Clock,
    channel: Callable[[], grpc.aio.Channel],
    streams: StreamBudget,
    expiries: Expiries | None = None,
    link: ServerLink | None = None,
    mints: MintBudget | None = None,
) -> AgentTaskLayer:
    """`channel()` returns the current mTLS channel to the server (the agent SVID's);
    `streams` is the Workload API's, as a uid's streams count together across services;
    `link`, the agent's link to the server, whose loss the revocation stream tells verifiers
    of; `mints`, the Workload API's minting budget, which MintTaskJWT's tokens count against."""
    client = GrpcTaskClient(channel)
    return AgentTaskLayer(
        tasks=TasksApi(cache, registry, client, jwts, clock=clock, mints=mints),
        revocations=RevocationsApi(cache, registry, streams, expiries, link),
        reporter=ValidationReporter(client.report, clock),
        cache=cache,
        jwts=jwts,
    )

"""Builds the task layer for the server.

app.py: `layer = build_task_layer(...)`, hand `layer.decisions` (the issuer's TaskDecisions
port) to the issuance spine, register `layer.node_handlers(...)` on the node server and
`layer.admin_handlers()` on the admin server, run `layer.run(stop)`. The node API never calls
the task layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.agent_authority import AgentAuthority
from server.audit import AuditLog
from server.audit.outage import LedgerOutage
from server.ca.manager import CaManager
from server.datastore.records import PolicyAnnouncement, Removal
from server.issuance import TaskDecisions
from server.peer import PeerCache
from server.policy import PolicyEngine
from server.policy.fleet import PolicyFleet
from server.refusal_budget import RefusalBudget
from server.state import ServerState
from server.tasks.grpc_api import NodeTasksServicer, TaskAdminServicer
from server.tasks.removals import AgentRemovals
from server.tasks.service import TaskService, TaskSettings
from server.tasks.store import TaskRows, TaskStore
from svid._clock import Clock
from svid._proto import task_pb2_grpc
from svid._ratelimit import KeyedLimiter
from svid._waits import set_within

_log = logging.getLogger("svid.server.tasks")
HOUSEKEEPING_INTERVAL = 60.0
# Expiry is checked at least this often (and exactly at the next known expiry).
MAX_EXPIRY_WAIT = 1.0


def _handlers(add: Callable[[Any, Any], None], servicer: Any) -> list[Any]:
    class _Collector:
        def __init__(self) -> None:
            self.handlers: list[Any] = []

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.handlers.extend(handlers)

        def add_registered_method_handlers(self, *_args: Any) -> None:
            pass  # a lookup optimisation; the generic handler serves the same methods

    collector = _Collector()
    add(servicer, collector)
    return collector.handlers


@dataclass
class TaskLayer:
    policy: PolicyEngine
    audit: AuditLog
    store: TaskStore
    service: TaskService
    removals: AgentRemovals
    fleet: PolicyFleet
    # The node servicers node_handlers made: `drain` waits for their ends under way.
    node_servicers: list[NodeTasksServicer] = field(default_factory=list)

    @property
    def decisions(self) -> TaskDecisions:
        return self.service

    def crl(self) -> tuple[bytes, ...]:
        """The CA-signed CRLs for Sync (none while no valid X.509-SVID is revoked)."""
        return self.service.crl()

    async def agent_removed(self, removal: Removal) -> None:
        """An eviction or ban just stored (admin_api): see AgentRemovals.carry_out."""
        await self.removals.carry_out(removal)

    async def removal_finished(self, agent_id: str, why: str) -> bool:
        """An eviction retried after one cut short: see AgentRemovals.retried."""
        return await self.removals.retried(agent_id, why)

    def node_handlers(
        self,
        state: ServerState,
        peers: PeerCache,
        refused_validations: RefusalBudget,
        accepted_validations: RefusalBudget,
        begins: KeyedLimiter,
        *,
        authority: AgentAuthority,
    ) -> list[Any]:
        servicer = NodeTasksServicer(
            self.service,
            state,
            peers,
            authority,
            refused_validations=refused_validations,
            accepted_validations=accepted_validations,
            begins=begins,
        )
        self.node_servicers.append(servicer)
        return _handlers(task_pb2_grpc.add_NodeTasksServicer_to_server, servicer)

    async def drain(self) -> None:
        """Wait for the task ends under way, their callers gone or not: a stopping server's
        calls are cancelled, and an end whose caller left runs on to its end (AgentTurns.run),
        which must come before the datastore closes."""
        for servicer in self.node_servicers:
            await servicer.drain()

    def admin_handlers(self) -> list[Any]:
        servicer = TaskAdminServicer(self.service, self.fleet)
        return _handlers(task_pb2_grpc.add_TaskAdminServicer_to_server, servicer)

    async def run(
        self, stop: asyncio.Event, clock: Clock, *, settles: Callable[[], bool] = lambda: True
    ) -> None:
        """Expire tasks on time; prune old records now and then, and then also finish the task
        ends and agent removals servers left half done while `settles()` (one server of those
        sharing the datastore: app.py asks the housekeeping lease)."""
        last_prune = clock.monotonic()
        while not stop.is_set():
            try:
                await self.service.expire_due()
                await self.service.end_unentitled()
                self.service.refresh_crl()
            except Exception:
                _log.exception("task housekeeping failed; retrying")
            if clock.monotonic() - last_prune >= HOUSEKEEPING_INTERVAL:
                last_prune = clock.monotonic()
                jobs: list[Callable[[], Awaitable[object]]] = [self.service.housekeeping]
                if settles():
                    jobs += [self.service.settle_ends, self.removals.finish_cut_short]
                # Each on its own: one failing run after run holds up no other (a removal left
                # stored keeps its agent from being admitted again).
                for job in jobs:
                    try:
                        await job()
                    except Exception:
                        _log.exception("task housekeeping failed; retrying")
            wait = min(MAX_EXPIRY_WAIT, max(0.05, self.service.next_expiry() - clock.now()))
            await set_within(stop, wait)


def build_task_layer(
    *,
    datastore: TaskRows,
    policy_dir: Path | None,
    trust_domain: str,
    state: ServerState,
    ca: CaManager,
    server_id: str,
    clock: Clock,
    settings: TaskSettings | None = None,
    denials: RefusalBudget | None = None,
    outage: LedgerOutage | None = None,
    announce_policy: Callable[[str], None] = lambda _hash: None,
    announced_policy: Callable[[], PolicyAnnouncement | None] = lambda: None,
) -> TaskLayer:
    """Raises PolicyError (an invalid policy set) or AuditError before anything is served.
    `outage`: told of every commit of the audit log (server/audit/outage.py).
    `announce_policy`: tells the servers sharing the datastore of a `policy reload`
    (DataStore.announce_policy; server/policy/fleet.py); `announced_policy` reads the newest
    announcement back (DataStore.announced_policy)."""
    policy = PolicyEngine(policy_dir, clock, trust_domain=trust_domain)
    audit = AuditLog(datastore, clock, outage)
    store = TaskStore(datastore, outage)
    service = TaskService(
        state=state,
        store=store,
        policy=policy,
        audit=audit,
        ca=ca,
        server_id=server_id,
        clock=clock,
        settings=settings,
        denials=denials,
    )
    service.load()
    removals = AgentRemovals(state, service, clock)
    fleet = PolicyFleet(policy, audit, announce_policy, announced_policy)
    return TaskLayer(policy, audit, store, service, removals, fleet)

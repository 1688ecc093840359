"""The admin API servicer (Unix socket, server's user only): tokens, entries, agents, bundle,
audit checkpoints."""

# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc

from server import status
from server.attestation.join_token import TYPE_NAME as JOIN_TOKEN
from server.attestation.join_token import new_join_token
from server.audit.checkpoint import Checkpoint
from server.convert import agent_to_proto, bundle_to_proto, entry_from_proto, entry_to_proto
from server.datastore.base import DataStore
from server.errors import InvalidRequestError, NotFoundError, UnavailableError
from server.ids import ServerIds
from server.metrics import Metrics
from server.registration import validate_entry
from server.state import ServerState
from svid._clock import Clock
from svid._errors import SpiffeIdError
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2
from svid._spiffe_id import SpiffeId

_log = logging.getLogger("svid.server.admin")
_ENTRY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOKEN_TTL = 30 * 86400


def _agent_id(text: str) -> str:
    if not text:
        raise InvalidRequestError("spiffe_id: required")
    try:
        return str(SpiffeId.parse(text))
    except SpiffeIdError as exc:
        raise InvalidRequestError(f"spiffe_id: {exc}") from None


def _entry_id(text: str) -> str:
    if not text:
        raise InvalidRequestError("id: required")
    if not _ENTRY_ID.match(text):
        raise InvalidRequestError(f"id: {text[:80]!r} is not an entry ID (1-64 of A-Z a-z 0-9 _ -)")
    return text


class AdminServicer(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        state: ServerState,
        datastore: DataStore,
        ids: ServerIds,
        clock: Clock,
        metrics: Metrics,
        join_token_ttl: int,
        on_agent_removed: Callable[[str, str], Awaitable[None]] | None = None,
        audit_checkpoint: Callable[[], Awaitable[Checkpoint]] | None = None,
    ) -> None:
        self._state = state
        self._datastore = datastore
        self._ids = ids
        self._clock = clock
        self._metrics = metrics
        self._join_token_ttl = join_token_ttl
        self._on_agent_removed = on_agent_removed
        self._audit_checkpoint = audit_checkpoint

    def on_error(self, code: grpc.StatusCode) -> None:
        self._metrics.record_error(code)

    @status.unary
    async def CreateJoinToken(  # type: ignore[override]
        self, request: admin_pb2.CreateJoinTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateJoinTokenResponse:
        ttl = request.ttl or self._join_token_ttl
        if not 0 < ttl <= MAX_TOKEN_TTL:
            raise InvalidRequestError(f"ttl: must be between 1 and {MAX_TOKEN_TTL} seconds")
        token, record = new_join_token(int(self._clock.now()), ttl, request.agent_id)
        await asyncio.to_thread(self._datastore.create_join_token, record)
        agent_id = self._ids.agent(JOIN_TOKEN, record.token_id)
        _log.info(
            "join token created", extra={"token_id": record.token_id, "agent_id": str(agent_id)}
        )
        return admin_pb2.CreateJoinTokenResponse(
            token=token, agent_spiffe_id=str(agent_id), expires_at=record.expires_at
        )

    @status.unary
    async def CreateEntry(  # type: ignore[override]
        self, request: admin_pb2.CreateEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateEntryResponse:
        entry = entry_from_proto(request.entry)
        if entry.id:
            _entry_id(entry.id)
        clean = validate_entry(
            replace(entry, revision=0, created_at=0), self._ids, self._state.entries
        )
        created = await self._state.create_entry(clean)
        _log.info(
            "entry created",
            extra={
                "entry_id": created.id,
                "spiffe_id": created.spiffe_id,
                "parent_id": created.parent_id,
            },
        )
        return admin_pb2.CreateEntryResponse(entry=entry_to_proto(created))

    @status.unary
    async def UpdateEntry(  # type: ignore[override]
        self, request: admin_pb2.UpdateEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UpdateEntryResponse:
        entry = entry_from_proto(request.entry)
        existing = self._state.entries.by_id.get(_entry_id(entry.id))
        if existing is None:
            raise NotFoundError(f"entry {entry.id} not found")
        index = self._state.entries.without(entry.id)
        clean = validate_entry(
            replace(entry, revision=existing.revision, created_at=existing.created_at),
            self._ids,
            index,
        )
        updated = await self._state.update_entry(clean)
        _log.info("entry updated", extra={"entry_id": updated.id, "spiffe_id": updated.spiffe_id})
        return admin_pb2.UpdateEntryResponse(entry=entry_to_proto(updated))

    @status.unary
    async def DeleteEntry(  # type: ignore[override]
        self, request: admin_pb2.DeleteEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteEntryResponse:
        entry_id = _entry_id(request.id)
        if entry_id not in self._state.entries.by_id:
            raise NotFoundError(f"entry {entry_id} not found")
        await self._state.delete_entry(entry_id)
        _log.info("entry deleted", extra={"entry_id": entry_id})
        return admin_pb2.DeleteEntryResponse()

    @status.unary
    async def GetEntry(  # type: ignore[override]
        self, request: admin_pb2.GetEntryRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Entry:
        entry = self._state.entries.by_id.get(_entry_id(request.id))
        if entry is None:
            raise NotFoundError(f"entry {request.id} not found")
        return entry_to_proto(entry)

    @status.unary
    async def ListEntries(  # type: ignore[override]
        self, request: admin_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListEntriesResponse:
        entries = sorted(
            (
                e
                for e in self._state.entries.by_id.values()
                if (not request.spiffe_id or e.spiffe_id == request.spiffe_id)
                and (not request.parent_id or e.parent_id == request.parent_id)
            ),
            key=lambda e: (e.spiffe_id, e.id),
        )
        return admin_pb2.ListEntriesResponse(entries=[entry_to_proto(e) for e in entries])

    @status.unary
    async def ListAgents(  # type: ignore[override]
        self, request: admin_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        agents = sorted(self._state.agents.values(), key=lambda a: a.spiffe_id)
        return admin_pb2.ListAgentsResponse(agents=[agent_to_proto(a) for a in agents])

    @status.unary
    async def GetAgent(  # type: ignore[override]
        self, request: admin_pb2.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Agent:
        spiffe_id = _agent_id(request.spiffe_id)
        agent = self._state.agents.get(spiffe_id)
        if agent is None:
            raise NotFoundError(f"agent {spiffe_id} not found")
        return agent_to_proto(agent)

    @status.unary
    async def EvictAgent(  # type: ignore[override]
        self, request: admin_pb2.EvictAgentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EvictAgentResponse:
        spiffe_id = _agent_id(request.spiffe_id)
        await self._state.evict_agent(spiffe_id)
        if self._on_agent_removed is not None:
            await self._on_agent_removed(spiffe_id, "agent evicted")
        _log.info("agent evicted", extra={"agent_id": spiffe_id})
        return admin_pb2.EvictAgentResponse()

    @status.unary
    async def BanAgent(  # type: ignore[override]
        self, request: admin_pb2.BanAgentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BanAgentResponse:
        spiffe_id = _agent_id(request.spiffe_id)
        await self._state.ban_agent(spiffe_id)
        if self._on_agent_removed is not None:
            await self._on_agent_removed(spiffe_id, "agent banned")
        _log.info("agent banned", extra={"agent_id": spiffe_id})
        return admin_pb2.BanAgentResponse()

    @status.unary
    async def GetBundle(  # type: ignore[override]
        self, request: admin_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Bundle:
        return bundle_to_proto(self._state.bundle, self._state.jwt_expiry)

    @status.unary
    async def AuditCheckpoint(  # type: ignore[override]
        self, request: admin_pb2.AuditCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuditCheckpointResponse:
        if self._audit_checkpoint is None:
            raise UnavailableError("this server writes no audit checkpoints")
        cp = await self._audit_checkpoint()
        _log.info("audit checkpoint written", extra={"seq": cp.seq, "hash": cp.hash})
        return admin_pb2.AuditCheckpointResponse(
            line=cp.to_line(),
            seq=cp.seq,
            hash=cp.hash,
            count=cp.count,
            time=cp.time,
            key_id=cp.key_id,
        )

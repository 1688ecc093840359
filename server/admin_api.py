"""The admin API servicer (Unix socket, server's user only): tokens, entries, agents, bundle,
audit checkpoints."""

# ruff: noqa: N802 - gRPC method names are fixed by the proto

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import grpc

from server import agent_listing, listing, status
from server.admin_federation import FederationAdmin
from server.attestation.join_token import MAX_TOKEN_TTL, new_join_token
from server.attestation.join_token import TYPE_NAME as JOIN_TOKEN
from server.audit.checkpoint import Checkpoint
from server.convert import agent_to_proto, bundle_to_proto, entry_from_proto, entry_to_proto
from server.datastore.base import DataStore
from server.datastore.errors import DataStoreError
from server.datastore.records import REMOVAL_EVICTED, AttestedAgent, Entry, Removal, Selector
from server.entitlement import EntryIndex
from server.entry_listing import EntryKeys
from server.errors import InvalidRequestError, NotFoundError, UnavailableError
from server.federation.service import FederationService
from server.ids import ServerIds
from server.metrics import Metrics
from server.registration import (
    MAX_BATCH,
    ItemError,
    check_creates,
    check_deletes,
    check_updates,
    validate_entry,
    validate_entry_id,
)
from server.state import ServerState
from svid._clock import Clock
from svid._errors import SpiffeIdError
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2
from svid._spiffe_id import SpiffeId

_log = logging.getLogger("svid.server.admin")


def _agent_id(text: str) -> str:
    if not text:
        raise InvalidRequestError("spiffe_id: required")
    try:
        return str(SpiffeId.parse(text))
    except SpiffeIdError as exc:
        raise InvalidRequestError(f"spiffe_id: {exc}") from None


_entry_id = validate_entry_id


def _check_batch(field_name: str, count: int) -> None:
    if count > MAX_BATCH:
        raise InvalidRequestError(
            f"{field_name}: {count} items; at most {MAX_BATCH} per call (split the batch)"
        )


def _item_result(outcome: Entry | ItemError | None, asked: str = "") -> admin_pb2.EntryResult:
    """One item's result; the code and message come from the one error mapping (server.status)."""
    if isinstance(outcome, Entry):
        return admin_pb2.EntryResult(
            status=common_pb2.Status(code=grpc.StatusCode.OK.value[0]),
            id=outcome.id,
            spiffe_id=outcome.spiffe_id,
            revision=outcome.revision,
            created_at=outcome.created_at,
        )
    if outcome is None:
        return admin_pb2.EntryResult(
            status=common_pb2.Status(code=grpc.StatusCode.OK.value[0]), id=asked
        )
    code, message = status.status_for(outcome)
    return admin_pb2.EntryResult(
        status=common_pb2.Status(code=code.value[0], message=message), id=asked
    )


def _checked(
    check: Callable[[Sequence[Entry], ServerIds, EntryIndex], list[Entry | ItemError]],
    messages: Sequence[common_pb2.Entry],
    ids: ServerIds,
    index: EntryIndex,
) -> tuple[list[Entry], list[Entry | ItemError]]:
    """Decode and check a batch, in a worker thread: a thousand entries take tens of
    milliseconds the event loop (Sync streams, the node API) should not wait out. The index
    is an immutable snapshot, so the thread reads it safely."""
    entries = [entry_from_proto(m) for m in messages]
    return entries, check(entries, ids, index)


def _selectors(messages: Sequence[common_pb2.Selector]) -> list[Selector]:
    return [Selector(s.type, s.value) for s in messages]


class AdminServicer(FederationAdmin, admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        state: ServerState,
        datastore: DataStore,
        ids: ServerIds,
        clock: Clock,
        metrics: Metrics,
        join_token_ttl: int,
        on_agent_removed: Callable[[Removal], Awaitable[None]] | None = None,
        finish_removal: Callable[[str, str], Awaitable[bool]] | None = None,
        audit_checkpoint: Callable[[], Awaitable[Checkpoint]] | None = None,
        federation: FederationService | None = None,
    ) -> None:
        self._federation = federation
        self._state = state
        self._datastore = datastore
        self._ids = ids
        self._clock = clock
        self._metrics = metrics
        self._join_token_ttl = join_token_ttl
        self._on_agent_removed = on_agent_removed
        self._finish_removal = finish_removal
        self._audit_checkpoint = audit_checkpoint
        # Sorted entry listing keys, per snapshot: paging through a snapshot sorts each once.
        self._entry_keys = EntryKeys()

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
        # The caller's revision, when given, is the one the datastore must find (a write made
        # since the caller read the entry is not overwritten); 0 means whatever is stored.
        clean = validate_entry(
            replace(
                entry,
                revision=entry.revision or existing.revision,
                created_at=existing.created_at,
            ),
            self._ids,
            self._state.entries,
            replaces=entry.id,
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

    async def _write_batch(
        self,
        messages: Sequence[common_pb2.Entry],
        check: Callable[[Sequence[Entry], ServerIds, EntryIndex], list[Entry | ItemError]],
        write: Callable[[Sequence[Entry]], Awaitable[list[Entry | DataStoreError]]],
        done: str,
    ) -> list[admin_pb2.EntryResult]:
        """Check a batch off the loop, write the clean items in one transaction, and answer
        each item in request order."""
        _check_batch("entries", len(messages))
        entries, checked = await asyncio.to_thread(
            _checked, check, messages, self._ids, self._state.entries
        )
        clean = [c for c in checked if isinstance(c, Entry)]
        stored = iter(await write(clean) if clean else [])
        outcomes = [next(stored) if isinstance(c, Entry) else c for c in checked]
        count = sum(isinstance(o, Entry) for o in outcomes)
        _log.info(f"entries {done}", extra={"count": count, "refused": len(outcomes) - count})
        return [_item_result(o, e.id) for o, e in zip(outcomes, entries, strict=True)]

    @status.unary
    async def BatchCreateEntry(  # type: ignore[override]
        self, request: admin_pb2.BatchCreateEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BatchCreateEntryResponse:
        results = await self._write_batch(
            request.entries, check_creates, self._state.create_entries, "created"
        )
        return admin_pb2.BatchCreateEntryResponse(results=results)

    @status.unary
    async def BatchUpdateEntry(  # type: ignore[override]
        self, request: admin_pb2.BatchUpdateEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BatchUpdateEntryResponse:
        results = await self._write_batch(
            request.entries, check_updates, self._state.update_entries, "updated"
        )
        return admin_pb2.BatchUpdateEntryResponse(results=results)

    @status.unary
    async def BatchDeleteEntry(  # type: ignore[override]
        self, request: admin_pb2.BatchDeleteEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BatchDeleteEntryResponse:
        _check_batch("ids", len(request.ids))
        asked = list(request.ids)
        checked = check_deletes(asked, self._state.entries)
        clean = [c for c in checked if isinstance(c, str)]
        done = iter(await self._state.delete_entries(clean) if clean else [])
        outcomes = [next(done) if isinstance(c, str) else c for c in checked]
        deleted = sum(o is None for o in outcomes)
        _log.info("entries deleted", extra={"count": deleted, "refused": len(outcomes) - deleted})
        return admin_pb2.BatchDeleteEntryResponse(
            results=[_item_result(o, i) for o, i in zip(outcomes, asked, strict=True)]
        )

    @status.unary
    async def ListEntries(  # type: ignore[override]
        self, request: admin_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListEntriesResponse:
        limit = listing.page_size(request.page_size)
        prefix = listing.spiffe_id_prefix(request.spiffe_id_prefix)
        selectors = listing.SelectorFilter.of(_selectors(request.selectors), request.selector_match)
        query = ["entries", request.spiffe_id, request.parent_id, prefix, *selectors.key()]
        after = listing.decode_token(request.page_token, query)
        index = self._state.entries
        spiffe_id, parent_id = request.spiffe_id, request.parent_id

        def keep(e: Entry) -> bool:
            return (
                (not spiffe_id or e.spiffe_id == spiffe_id)
                and (not parent_id or e.parent_id == parent_id)
                and listing.under_prefix(e.spiffe_id, prefix)
                and selectors.matches(e.selectors)
            )

        def page_of() -> tuple[list[common_pb2.Entry], str]:
            return listing.paginate(
                self._entry_keys.keys(index, spiffe_id, parent_id),
                after,
                limit,
                load=index.by_id.get,
                keep=keep,
                encode=entry_to_proto,
            )

        # A filter may walk many entries to fill a page (a prefix, selectors): in a thread,
        # so the event loop serves the node API meanwhile. The snapshot does not change.
        page, last = await asyncio.to_thread(page_of)
        return admin_pb2.ListEntriesResponse(
            entries=page, next_page_token=listing.encode_token(last, query) if last else ""
        )

    @status.unary
    async def ListAgents(  # type: ignore[override]
        self, request: admin_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        limit = listing.page_size(request.page_size)
        prefix = listing.spiffe_id_prefix(request.spiffe_id_prefix)
        selectors = listing.SelectorFilter.of(_selectors(request.selectors), request.selector_match)
        query = ["agents", prefix, *selectors.key()]
        after = listing.decode_token(request.page_token, query)
        agents = self._state.agents

        def keep(a: AttestedAgent) -> bool:
            return listing.under_prefix(a.spiffe_id, prefix) and selectors.matches(a.selectors)

        def page_of() -> tuple[list[admin_pb2.Agent], str]:
            walked = agent_listing.agent_ids(agents, selectors, prefix, after)
            kept = ((k, a) for k in walked if (a := agents.get(k)) is not None and keep(a))
            return listing.take_page(kept, limit, agent_to_proto)

        # A filter may test many agents before a page fills: in a thread, so the event loop
        # serves the node API meanwhile. The snapshot does not change.
        page, last = await asyncio.to_thread(page_of)
        return admin_pb2.ListAgentsResponse(
            agents=page, next_page_token=listing.encode_token(last, query) if last else ""
        )

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
        try:
            removal = await self._state.evict_agent(spiffe_id)
        except NotFoundError:
            # The row goes before the revocations: an eviction the server died in the middle
            # of left the agent gone and what it holds live. Housekeeping finishes it a minute
            # on (server/tasks/removals.py); the operator's retry finishes it now. An agent
            # with nothing left is not found.
            if self._finish_removal is None or not await self._finish_removal(
                spiffe_id, REMOVAL_EVICTED
            ):
                raise
            _log.warning("finished an agent eviction left half done", extra={"agent_id": spiffe_id})
            return admin_pb2.EvictAgentResponse()
        await self._carry_out(removal)
        _log.info("agent evicted", extra={"agent_id": spiffe_id})
        return admin_pb2.EvictAgentResponse()

    @status.unary
    async def BanAgent(  # type: ignore[override]
        self, request: admin_pb2.BanAgentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.BanAgentResponse:
        spiffe_id = _agent_id(request.spiffe_id)
        removal = await self._state.ban_agent(spiffe_id)
        await self._carry_out(removal)
        _log.info("agent banned", extra={"agent_id": spiffe_id})
        return admin_pb2.BanAgentResponse()

    async def _carry_out(self, removal: Removal) -> None:
        """The rest of a removal just stored: the task layer revokes what the agent holds and
        then forgets the removal; with no task layer there is nothing to revoke here."""
        if self._on_agent_removed is not None:
            await self._on_agent_removed(removal)
        else:
            await self._state.end_removal(removal)

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

"""The server's in-memory view of what agents care about, kept in step with the datastore.

Every write goes through here: datastore first (in a worker thread: SQLite fsyncs), then the
in-memory snapshot, then the change log (server.changelog), whose listener hands each change to
the Sync streams it concerns, then the change notifier. Readers (entitlement checks, Sync
streams) only touch the immutable snapshots, never the datastore. The newest signed audit
checkpoint is kept here too: every agent is sent a copy.

Writes made through other servers on the same datastore arrive through the change feed
(server.replication), which reloads the rows they touched and applies them here with
`apply_entries` / `apply_agents` / `add_revocations_seen`, as ordinary changes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import TypeVar

from server.agent_index import AgentIndex
from server.changelog import Change, ChangeLog, EntryTouch, touches
from server.datastore.base import DataStore
from server.datastore.errors import DataStoreError, RemovalUnderWayError, StorageError
from server.datastore.records import (
    FEED_AGENT,
    FEED_ENTRY,
    REMOVAL_BANNED,
    REMOVAL_EVICTED,
    REVOKED_JWT_ID,
    AttestedAgent,
    Entry,
    Removal,
    Revocation,
    TokenUse,
    expired_record_kept_from,
    revocation_needed_from,
)
from server.entitlement import EntryIndex
from server.errors import NotFoundError, PermissionDeniedError
from server.events import ChangeNotifier
from svid import AuditCheckpoint
from svid._bundle import SpiffeBundle
from svid._clock import Clock

_log = logging.getLogger("svid.server.state")
T = TypeVar("T")
R = TypeVar("R")


def agent_refusal(
    agent: AttestedAgent | None, spiffe_id: str, serial: str, now: float
) -> str | None:
    """Why `agent` (its record, None for none) may not call with the certificate `serial`, or
    None when it may: attested, unbanned, and the certificate its current one, or the one it
    renewed with while that is unexpired."""
    if agent is None:
        return f"agent {spiffe_id} is not attested (evicted or unknown): attest again"
    if agent.banned:
        return f"agent {spiffe_id} is banned"
    if serial == agent.serial:
        if 0 < agent.expires_at <= now:
            return f"agent {spiffe_id} has an expired SVID: attest again"
    elif not (agent.previous_serial == serial and agent.previous_expires_at > now):
        return (
            f"agent {spiffe_id} presented a superseded certificate (serial {serial}): "
            "reconnect with the latest agent SVID"
        )
    return None


class ServerState:
    def __init__(self, datastore: DataStore, clock: Clock, notifier: ChangeNotifier) -> None:
        self._datastore = datastore
        self._clock = clock
        self.notifier = notifier
        self._lock = threading.Lock()
        # Agent records are read, then written after an await (the datastore's thread): one
        # write at a time, so a ban or an eviction is never undone by a renewal or re-attestation
        # that read the record before it.
        self._agent_writes = asyncio.Lock()
        # Entry writes take turns across every server (on PostgreSQL, behind each other's
        # commits). This server's wait for their turn here, on the loop, and go to a thread one
        # at a time: each waiting on a thread of its own, a burst of them held every thread of
        # the loop's default executor, and the server's other calls there (the revision read
        # that answers each write, an agent's record) waited behind the whole burst.
        self._entry_writes = asyncio.Lock()
        self._entries = EntryIndex()
        self._agents = AgentIndex()
        self._revocations: tuple[Revocation, ...] = ()
        self._revoked_keys: tuple[tuple[Revocation, ...], frozenset[tuple[str, str]]] = (
            (),
            frozenset(),
        )
        self._bundle: SpiffeBundle | None = None
        # Foreign trust domain name -> its bundle (server/federation); rides with ours.
        self._foreign: Mapping[str, SpiffeBundle] = MappingProxyType({})
        self._jwt_expiry: Mapping[str, int] = MappingProxyType({})
        # The newest signed checkpoint and prune record, by kind.
        self._audit_records: Mapping[str, AuditCheckpoint] = MappingProxyType({})
        self._revision = 0
        self.changes = ChangeLog()
        self._listeners: list[Callable[[Change], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set on shutdown so Sync streams end promptly instead of waiting out the grace period.
        self.shutting_down = False
        # (feed kind, key) of the rows this server wrote since the change feed's follower last
        # marked (None until it does): what it reloaded before then may be older than memory.
        self._touched: set[tuple[str, str]] | None = None

    # -- loading ------------------------------------------------------------------------------

    def load(self) -> None:
        """Read everything from the datastore (start-up; synchronous)."""
        self._entries = EntryIndex.build(self._datastore.list_entries())
        self._agents = AgentIndex.build(self._datastore.list_agents())
        self._revocations = tuple(self._datastore.list_revocations())
        self._revision = self._datastore.revision()
        # Revisions start where the datastore's are, so they are positive once anything was
        # written; the log's epoch tells them apart from another process's.
        self.changes = ChangeLog(start_revision=self._revision)

    def on_change(self, listener: Callable[[Change], None]) -> None:
        """Call `listener(change)` on the event loop after each change is logged."""
        self._loop = asyncio.get_running_loop()
        self._listeners.append(listener)

    def _record(self, **parts: object) -> None:
        """Log a change and hand it to the listeners, on the event loop: one thread appends, so
        revisions reach the listeners in order (the bundle may change from a worker thread)."""
        loop = self._loop
        if loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(functools.partial(self._record, **parts))
                return
        change = self.changes.append(**parts)  # type: ignore[arg-type]
        for listener in self._listeners:
            listener(change)

    def record_expired(self, entries: Iterable[Entry]) -> None:
        """Entries past their expiry: still stored, no longer served (see EntryTouch)."""
        touches = [EntryTouch(e.id, e, e) for e in entries]
        if touches:
            self._record(entries=touches)

    def set_bundle(self, bundle: SpiffeBundle, jwt_expiry: Mapping[str, int]) -> None:
        with self._lock:
            changed = self._bundle != bundle
            self._bundle = bundle
            self._jwt_expiry = MappingProxyType(dict(jwt_expiry))
        if changed:
            self._record(bundle=True)
            self.notifier.notify()

    def set_foreign_bundles(self, bundles: Mapping[str, SpiffeBundle]) -> None:
        """Foreign bundles go to agents as ours does: logged as a bundle change."""
        if dict(bundles) != dict(self._foreign):
            self._foreign = MappingProxyType(dict(bundles))
            self._record(bundle=True)
            self.notifier.notify()

    def set_audit_checkpoint(self, record: AuditCheckpoint) -> None:
        """The newest signed checkpoint, or prune record, of the audit log, for every agent
        (safe from any thread: the checkpointer signs in a worker thread). One no newer than
        the one of its kind held (a later event, or the same one signed later) is ignored:
        records signed here and those other servers stored may arrive in any order."""
        with self._lock:
            held = self._audit_records.get(record.kind)
            if held is not None and (record.seq, record.time) <= (held.seq, held.time):
                return
            self._audit_records = MappingProxyType({**self._audit_records, record.kind: record})
        self._record(audit_checkpoint=True)

    def crl_refreshed(self) -> None:
        """The CRLs were signed again with nothing else changed: every agent takes them."""
        self._record(crl=True)

    # -- reads --------------------------------------------------------------------------------

    @property
    def entries(self) -> EntryIndex:
        return self._entries

    @property
    def agents(self) -> AgentIndex:
        return self._agents

    @property
    def revocations(self) -> tuple[Revocation, ...]:
        return self._revocations

    def is_jwt_revoked(self, jti: str) -> bool:
        """Whether a JWT's ``jti`` is among the revocations (from any thread)."""
        return self.is_revoked(REVOKED_JWT_ID, jti)

    def is_revoked(self, kind: str, value: str) -> bool:
        """Whether a credential (its kind and value) is among the revocations, from any
        thread: the set is made once per change of the revocations, not per question."""
        current = self._revocations
        memo = self._revoked_keys
        if memo[0] is not current:
            memo = self._revoked_keys = (current, frozenset((r.kind, r.value) for r in current))
        return (kind, value) in memo[1]

    @property
    def bundle(self) -> SpiffeBundle:
        if self._bundle is None:
            raise RuntimeError("bundle not loaded")
        return self._bundle

    @property
    def foreign_bundles(self) -> Mapping[str, SpiffeBundle]:
        return self._foreign

    @property
    def jwt_expiry(self) -> Mapping[str, int]:
        return self._jwt_expiry

    @property
    def audit_checkpoints(self) -> tuple[AuditCheckpoint, ...]:
        """The newest checkpoint and prune record (those there are), oldest first."""
        return tuple(sorted(self._audit_records.values(), key=lambda r: r.time))

    @property
    def revision(self) -> int:
        return self._revision

    def authorize_agent(self, spiffe_id: str, serial: str) -> AttestedAgent:
        """The attested, unbanned agent presenting a current certificate, or PermissionDenied."""
        agent = self._agents.get(spiffe_id)
        refused = agent_refusal(agent, spiffe_id, serial, self._clock.now())
        if refused is not None:
            raise PermissionDeniedError(refused)
        assert agent is not None  # agent_refusal refuses an agent with no record
        return agent

    # -- writes -------------------------------------------------------------------------------

    async def _after_write(self) -> None:
        # The write is committed and installed: a failed read of the revision after it (a
        # database connection cut in between) must not answer the write as failed, which would
        # send its client to retry a write that is there.
        try:
            await self.refresh_revision()
        except StorageError as exc:
            _log.warning("could not read the datastore revision after a write: %s", exc)
        self.notifier.notify()

    def _change_entries(self, put: Sequence[Entry] = (), removed: Sequence[str] = ()) -> None:
        """Install a new entry snapshot and log what it touched (old and new versions)."""
        self._touch(FEED_ENTRY, [e.id for e in put] + list(removed))
        self._install_entries(put, removed)

    def _install_entries(self, put: Sequence[Entry], removed: Sequence[str]) -> None:
        touched = touches(self._entries.by_id, put, removed)
        self._entries = self._entries.with_changes(put, removed)
        self._record(entries=touched)

    async def _entry_write(self, write: Callable[[T], R], arg: T) -> R:
        """`write(arg)` (a datastore entry write) on a thread, once this server's entry writes
        before it are done."""
        async with self._entry_writes:
            return await asyncio.to_thread(write, arg)

    async def create_entry(self, entry: Entry) -> Entry:
        created = await self._entry_write(self._datastore.create_entry, entry)
        self._change_entries(put=(created,))
        await self._after_write()
        return created

    async def update_entry(self, entry: Entry) -> Entry:
        updated = await self._entry_write(self._datastore.update_entry, entry)
        self._change_entries(put=(updated,))
        await self._after_write()
        return updated

    async def delete_entry(self, entry_id: str) -> None:
        await self._entry_write(self._datastore.delete_entry, entry_id)
        self._change_entries(removed=(entry_id,))
        await self._after_write()

    # Batches: one datastore transaction, one new snapshot and one change notification per
    # batch, so a thousand writes wake each Sync stream once, not a thousand times.

    async def create_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        results = await self._entry_write(self._datastore.create_entries, entries)
        await self._apply(put=[r for r in results if isinstance(r, Entry)])
        return results

    async def update_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        results = await self._entry_write(self._datastore.update_entries, entries)
        await self._apply(put=[r for r in results if isinstance(r, Entry)])
        return results

    async def delete_entries(self, entry_ids: Sequence[str]) -> list[DataStoreError | None]:
        results = await self._entry_write(self._datastore.delete_entries, entry_ids)
        await self._apply(removed=[i for i, r in zip(entry_ids, results, strict=True) if r is None])
        return results

    async def _apply(self, put: Sequence[Entry] = (), removed: Sequence[str] = ()) -> None:
        if put or removed:
            self._change_entries(put, removed)
            await self._after_write()

    async def save_agent(
        self, agent: AttestedAgent, previous: AttestedAgent | None, token: TokenUse | None = None
    ) -> bool:
        """Save the agent's record; with `token`, only by spending that join token in the same
        transaction. False (nothing written) when the token could not be spent.
        PermissionDeniedError (AgentReplacedError when only the datastore tells), nothing
        written, when the record `previous` was banned, evicted or replaced by another
        attestation since it was read (its signing took a while): a compare-and-swap, so a
        stale renewal never overwrites the record of the node that attested again."""
        async with self._agent_writes:
            return await self._save_agent(agent, previous, token)

    async def refuse_save(self, spiffe_id: str, previous: AttestedAgent | None) -> None:
        """Raise now what save_agent would for the agent: RemovalUnderWayError while a removal
        of it is stored (read from the datastore: another server's counts), PermissionDeniedError
        when the agent `previous` names was evicted or banned since it was read. An admission
        asks before its allowed attestation is logged, so a refusal is not preceded on the log
        by an admission that did not take; save_agent still refuses what comes after this."""
        if await self.removal_of(spiffe_id) is not None:
            raise RemovalUnderWayError(spiffe_id)
        if previous is None:
            self._refuse_present(spiffe_id)
        else:
            self._refuse_replaced(spiffe_id, previous.serial, previous)

    def _refuse_present(self, spiffe_id: str) -> None:
        """A first admission (no record read) of an agent admitted since: that record, banned
        or not, is another attestation's, not this one's to overwrite (see q.INSERT_AGENT)."""
        current = self._agents.get(spiffe_id)
        if current is None:
            return
        if current.banned:
            raise PermissionDeniedError(f"agent {spiffe_id} is banned")
        raise PermissionDeniedError(
            f"agent {spiffe_id} was admitted by another attestation meanwhile: attest again"
        )

    def _refuse_replaced(self, spiffe_id: str, held: str, previous: AttestedAgent) -> None:
        """`held`: the certificate the save carries on as previous (see q.REPLACE_AGENT)."""
        current = self._agents.get(spiffe_id)
        if current is None:
            raise PermissionDeniedError(f"agent {spiffe_id} was evicted: attest again")
        if current.banned:
            raise PermissionDeniedError(f"agent {spiffe_id} is banned")
        # Another admission since `previous` was read (evicted and attested again, or a second
        # attestation), or the certificate this save carries on no longer the record's (the
        # same test as the datastore's, q.REPLACE_AGENT): not this caller's to overwrite.
        if current.attested_at != previous.attested_at or held not in (
            current.serial,
            current.previous_serial,
        ):
            raise PermissionDeniedError(
                f"agent {spiffe_id} attested again or renewed meanwhile: attest again"
            )

    def _selectors_changed(self, records: Iterable[AttestedAgent]) -> list[str]:
        """The agents of `records` whose selectors differ from the records memory holds (a
        renewal keeps them; an attestation may not)."""
        out = []
        for agent in records:
            held = self._agents.get(agent.spiffe_id)
            if held is None or held.selectors != agent.selectors:
                out.append(agent.spiffe_id)
        return out

    async def _save_agent(
        self, agent: AttestedAgent, previous: AttestedAgent | None, token: TokenUse | None
    ) -> bool:
        if previous is None:
            self._refuse_present(agent.spiffe_id)
        else:
            self._refuse_replaced(
                agent.spiffe_id, agent.previous_serial or previous.serial, previous
            )
        # The datastore compares again: another server sharing it may have replaced the record
        # this server's snapshot still shows. Saved, the row is `agent` as it stands (a ban is
        # never overwritten, only refused), so memory holds what the datastore holds.
        if token is None:
            await asyncio.to_thread(self._datastore.upsert_agent, agent, previous)
        else:
            now = int(self._clock.now())
            admitted = await asyncio.to_thread(
                self._datastore.admit_agent, agent, token, now, previous
            )
            if not admitted:
                return False
        self._touch(FEED_AGENT, (agent.spiffe_id,))
        moved = self._selectors_changed((agent,))
        self._put_agent(agent)
        self._record(agents=(agent.spiffe_id,), selectors_changed=moved)
        await self._after_write()
        return True

    async def adopt_agent_certificate(
        self, adopted: AttestedAgent, restored: AttestedAgent
    ) -> bool:
        """Move the agent's record `restored` to its newer certificate (`adopted`, see
        server/restore_adoption.py), only while the datastore's record is still `restored`
        naming that serial as its current one: False, nothing written, when another write came
        first (a renewal, another server's adoption, an eviction, a ban)."""
        async with self._agent_writes:
            won = await asyncio.to_thread(
                self._datastore.adopt_agent_certificate, adopted, restored
            )
            if not won:
                return False
            self._touch(FEED_AGENT, (adopted.spiffe_id,))
            self._put_agent(adopted)
            self._record(agents=(adopted.spiffe_id,))
            await self._after_write()
            return True

    async def drop_previous_certificate(self, agent: AttestedAgent) -> bool:
        """The agent presented its newest certificate (`agent.serial`): the one it renewed with
        is no longer taken. Kept, a renewal with it answered late (its server hung or slow,
        the agent renewed again meanwhile, there or elsewhere) superseded the certificate the
        agent went on with, and the agent was refused with it. The same compare-and-swap as
        an adoption: False, nothing written, when the record moved on meanwhile."""
        return await self.adopt_agent_certificate(agent.without_previous(), agent)

    async def evict_agent(self, spiffe_id: str, *, unless_banned: bool = False) -> Removal:
        """Delete the agent's row, storing its removal with it: once the caller has revoked
        what the agent holds, `end_removal(removal)`; one left stored (the server died midway)
        is finished by housekeeping (server/tasks/removals.py). `unless_banned`: a row the
        datastore holds banned (perhaps through another server) stays, and ConflictError."""
        async with self._agent_writes:
            return await self._evict_agent(spiffe_id, unless_banned)

    async def _evict_agent(self, spiffe_id: str, unless_banned: bool = False) -> Removal:
        if spiffe_id not in self._agents:
            raise NotFoundError(f"agent {spiffe_id} not found")
        removal = Removal(spiffe_id, REMOVAL_EVICTED, int(self._clock.now()))
        await asyncio.to_thread(
            functools.partial(
                self._datastore.delete_agent, spiffe_id, removal, unless_banned=unless_banned
            )
        )
        self._touch(FEED_AGENT, (spiffe_id,))
        self._agents = self._agents.with_changes(removed=(spiffe_id,))
        self._record(agents=(spiffe_id,))
        await self._after_write()
        return removal

    async def ban_agent(self, spiffe_id: str) -> Removal:
        """Ban the agent, storing its removal with the ban: as `evict_agent`."""
        async with self._agent_writes:
            return await self._ban_agent(spiffe_id)

    async def _ban_agent(self, spiffe_id: str) -> Removal:
        agent = self._agents.get(spiffe_id)
        if agent is None:
            raise NotFoundError(f"agent {spiffe_id} not found")
        removal = Removal(spiffe_id, REMOVAL_BANNED, int(self._clock.now()))
        await asyncio.to_thread(self._datastore.set_agent_banned, spiffe_id, True, removal)
        self._touch(FEED_AGENT, (spiffe_id,))
        self._put_agent(replace(agent, banned=True))
        self._record(agents=(spiffe_id,))
        await self._after_write()
        return removal

    # Removals under way are not held in memory: only the few jobs that finish them read them.

    async def end_removal(self, removal: Removal) -> bool:
        """The removal is done (everything the agent held is revoked on record): forget it, so
        the agent may be admitted again. False when a newer removal of the agent replaced it
        (that one stays) or it was ended already."""
        return await asyncio.to_thread(self._datastore.end_removal, removal)

    async def claim_removal(self, agent_id: str, holder: str, ttl: int) -> bool:
        """Claim (or keep claiming) the agent's stored removal for `holder` for `ttl` seconds
        from now: see DataStore.claim_removal."""
        now = int(self._clock.now())
        return await asyncio.to_thread(self._datastore.claim_removal, agent_id, holder, now, ttl)

    async def renew_removal_claim(self, agent_id: str, holder: str, ttl: int) -> bool:
        """Keep `holder`'s claim for `ttl` seconds from now, unless another holder claimed
        it since: see DataStore.renew_removal_claim."""
        now = int(self._clock.now())
        return await asyncio.to_thread(
            self._datastore.renew_removal_claim, agent_id, holder, now, ttl
        )

    async def release_removal_claim(self, agent_id: str, holder: str) -> None:
        await asyncio.to_thread(self._datastore.release_removal_claim, agent_id, holder)

    async def resume_removal(self, removal: Removal) -> bool:
        """Store `removal` for an agent with no row: see DataStore.resume_removal."""
        return await asyncio.to_thread(self._datastore.resume_removal, removal)

    async def removal_of(self, agent_id: str) -> Removal | None:
        return await asyncio.to_thread(self._datastore.removal_of, agent_id)

    async def removals_before(self, before: int) -> list[Removal]:
        """The removals under way that began at or before `before`, oldest first."""
        return await asyncio.to_thread(self._datastore.list_removals, before)

    async def add_revocations(self, items: tuple[Revocation, ...]) -> None:
        await asyncio.to_thread(self._datastore.add_revocations, items)
        try:
            current = await asyncio.to_thread(self._datastore.list_revocations)
        except StorageError as exc:
            # They are committed: they must reach the agents now, not at the next revocation
            # (a caller that sees an error may not try again: a task already ended). Other
            # servers' revocations come with the next full read.
            _log.warning("could not read the revocations back after adding them: %s", exc)
            self._join_revocations(items)
        else:
            # Joined, not installed as the list: another server's revocation committed after
            # the read may be in memory already (the change feed brought it), and the feed's
            # cursor is past it, so nothing would bring it back.
            self._join_revocations(current)
        await self._after_write()

    def _join_revocations(self, stored: Iterable[Revocation]) -> bool:
        """Those of `stored` memory lacks join it; True when any did. Never removes one: a
        list read before another write may lack a revocation memory holds, and only expiry
        (prune) ends a revocation."""
        current = {(r.kind, r.value) for r in self._revocations}
        added = [r for r in stored if (r.kind, r.value) not in current]
        if added:
            self._revocations = (*self._revocations, *added)
            self._record(revocations_added=added, revocations_removed=())
        return bool(added)

    async def prune(self) -> None:
        """Drop expired join tokens and revocations, and agents expired long ago (housekeeping)."""
        now = int(self._clock.now())
        await asyncio.to_thread(self._datastore.prune_join_tokens, now)
        removed = await asyncio.to_thread(self._datastore.prune_revocations, now)
        # Memory drops what the datastore's bound drops, and only that, whether this prune
        # removed it or another server sharing the datastore did first: a revocation added
        # meanwhile (here or through the change feed) stays.
        dropped = self._drop_revocations_before(revocation_needed_from(now))
        agents = await self._prune_agents(now)
        if removed or dropped or agents:
            await self._after_write()

    async def _prune_agents(self, now: int) -> bool:
        """Delete the rows of join-token agents whose SVIDs expired EXPIRED_RECORD_RETENTION
        ago (an ID is new per token: such a row serves nothing again; an x509pop node's ID
        comes back with its certificate, so its row stays, to be banned by ID), and drop them
        from memory; other servers drop them through the change feed. True when any went."""
        async with self._agent_writes:
            before = expired_record_kept_from(now)
            gone = await asyncio.to_thread(self._datastore.prune_agents, before)
            if not gone:
                return False
            self._touch(FEED_AGENT, gone)
            self._agents = self._agents.with_changes(removed=gone)
            self._record(agents=tuple(gone))
            return True

    def _drop_revocations_before(self, needed_from: float) -> bool:
        """Drop the revocations expiring before `needed_from`; True when any went."""
        expired = [r for r in self._revocations if r.expires_at < needed_from]
        if expired:
            self._revocations = tuple(r for r in self._revocations if r.expires_at >= needed_from)
            self._record(revocations_added=(), revocations_removed=expired)
        return bool(expired)

    def _put_agent(self, agent: AttestedAgent) -> None:
        self._agents = self._agents.with_changes(put=(agent,))

    # -- changes made through other servers (server.replication) ------------------------------

    def _touch(self, kind: str, keys: Iterable[str]) -> None:
        if self._touched is not None:
            self._touched.update((kind, k) for k in keys)

    def follow_mark(self) -> None:
        """The follower is about to reload rows: from now on, remember which rows this server
        writes itself (DB first, then memory), so the follower does not install a version it
        read before such a write over the one the write installed."""
        self._touched = set()

    def touched(self, kind: str) -> frozenset[str]:
        """Keys of `kind` this server wrote since the last `follow_mark`."""
        return frozenset(k for t, k in self._touched or () if t == kind)

    def apply_entries(self, put: Sequence[Entry], removed: Sequence[str]) -> None:
        """Entries another server wrote (already diffed with memory): a new snapshot and one
        logged change, pushed to the streams it concerns like a local write."""
        if put or removed:
            self._install_entries(put, removed)
            self.notifier.notify()

    def apply_agents(self, put: Sequence[AttestedAgent], removed: Sequence[str]) -> None:
        """Agent records another server wrote (a renewed agent's previous certificate rides in
        its record, acceptable here as on the server that renewed it)."""
        if not put and not removed:
            return
        moved = self._selectors_changed(put)
        self._agents = self._agents.with_changes(put, removed)
        self._record(agents=[a.spiffe_id for a in put] + list(removed), selectors_changed=moved)
        self.notifier.notify()

    def add_revocations_seen(self, stored: Iterable[Revocation]) -> None:
        """Revocations another server added: those of `stored` memory lacks join it. Never
        removes one (a list read before a local add must not undo it); expiry prunes them on
        every server alike."""
        if self._join_revocations(stored):
            self.notifier.notify()

    async def refresh_revision(
        self, run: Callable[[Callable[[], int]], Awaitable[int]] = asyncio.to_thread
    ) -> None:
        """Read the datastore's revision off the loop, through `run` (the follower's own)."""
        self._revision = await run(self._datastore.revision)

"""Changes committed through other servers on the same datastore, brought into this one.

Every write that concerns a server's in-memory view names the rows it touched in the
datastore's change feed, in its own transaction (server.datastore.base.ChangeFeed). The
follower here waits on the feed, reads the rows after its cursor, reloads the rows they name
and applies what differs from memory to ServerState (entries, agents, revocations) and to the
task service (active tasks), as ordinary changes: the propagator then pushes each to the
agents it concerns, whichever server they are connected to. Key slots are only announced
(`on_key_slots_changed`): whoever keeps the CA's keys reloads them. Audit checkpoints and
prune records signed by the housekeeping lease holder are handed over as stored
(`on_audit_records`): the checkpointer checks their signature, files and pushes them.

Applying is idempotent: a row is reloaded and diffed with memory, so the rows this server
wrote itself cost a lookup and change nothing. The cursor starts at the feed head read before
the server loaded its state, so nothing committed meanwhile is missed; a safety poll reads
the feed even when no wake-up came; and a cursor older than the oldest row kept (pruned
while the server was down) reloads everything instead of missing changes.

The decisions (what a page of rows asks for, whether rows were pruned past the cursor, what
a reload changes) are pure functions; `FeedFollower` is the loop around them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar

from server.datastore.base import DataStore
from server.datastore.errors import NotFoundError
from server.datastore.records import (
    FEED_AGENT,
    FEED_AUDIT_RECORD,
    FEED_ENTRY,
    FEED_FOREIGN_BUNDLE,
    FEED_KEY_SLOT,
    FEED_POLICY,
    FEED_RELATIONSHIP,
    FEED_REVOCATION,
    FEED_TASK,
    AttestedAgent,
    AuditRecord,
    Entry,
    FeedItem,
    PolicyAnnouncement,
    Revocation,
)
from server.federation.service import Stored
from server.state import ServerState
from server.tasks.model import Task
from server.view_freshness import ViewFreshness
from svid._clock import Clock
from svid._waits import set_within

_log = logging.getLogger("svid.server.replication")
_V = TypeVar("_V")
_P = ParamSpec("_P")
# Rows read per step: a page of reloads stays a few milliseconds of datastore work.
FEED_PAGE = 1000
# Policy announcements remembered, to tell a restored feed's from one written since.
POLICY_ANNOUNCEMENTS_KEPT = 1024
# A row this server was writing while the follower reloaded it is read again this soon.
RETRY_DELAY = 0.05


@dataclass(frozen=True)
class FollowSettings:
    # Read the feed at least this often even when no wake-up came (seconds).
    poll_interval: float = 1.0
    # Feed rows older than this are pruned (seconds); a server down for longer reloads all.
    retention: float = 3600.0


# -- pure decisions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedWork:
    """What a page of feed rows asks this server to reload."""

    entries: frozenset[str] = frozenset()
    agents: frozenset[str] = frozenset()
    tasks: frozenset[str] = frozenset()
    revocations: bool = False
    key_slots: bool = False
    audit_records: bool = False
    federation: bool = False
    # The newest policy announcement (FEED_POLICY), None when none was.
    policy: PolicyAnnouncement | None = None

    def __bool__(self) -> bool:
        return bool(
            self.policy is not None
            or self.entries
            or self.agents
            or self.tasks
            or self.revocations
            or self.key_slots
            or self.audit_records
            or self.federation
        )

    def __or__(self, other: FeedWork) -> FeedWork:
        return FeedWork(
            self.entries | other.entries,
            self.agents | other.agents,
            self.tasks | other.tasks,
            self.revocations or other.revocations,
            self.key_slots or other.key_slots,
            self.audit_records or other.audit_records,
            self.federation or other.federation,
            self.policy or other.policy,  # `self`: the newer rows (plan(items) | pending)
        )


def plan(items: Sequence[FeedItem]) -> FeedWork:
    """The rows to reload for `items`, each once however often it was written. A row kind
    this release does not know is skipped (a newer server's)."""
    keys: dict[str, set[str]] = {FEED_ENTRY: set(), FEED_AGENT: set(), FEED_TASK: set()}
    kinds = set()
    policy = None
    for item in items:
        kinds.add(item.kind)
        if item.kind in keys:
            keys[item.kind].add(item.key)
        elif item.kind == FEED_POLICY:
            policy = PolicyAnnouncement(item.revision, item.key, item.at)  # the newest counts
    return FeedWork(
        entries=frozenset(keys[FEED_ENTRY]),
        agents=frozenset(keys[FEED_AGENT]),
        tasks=frozenset(keys[FEED_TASK]),
        revocations=FEED_REVOCATION in kinds,
        key_slots=FEED_KEY_SLOT in kinds,
        audit_records=FEED_AUDIT_RECORD in kinds,
        federation=bool(kinds & {FEED_RELATIONSHIP, FEED_FOREIGN_BUNDLE}),
        policy=policy,
    )


def pruned_past(cursor: int, head: int, items: Sequence[FeedItem]) -> bool:
    """Whether rows after `cursor` are gone: `head` was read before `items` (the rows after
    the cursor), and revisions have no gaps, so they must be cursor + 1, cursor + 2, ...
    Not only the first: rows are pruned by their writer's clock, and a row of a server whose
    clock runs behind goes before older rows of one whose clock runs ahead (a hole between
    kept rows). A head behind the cursor is a feed that went back (the database restored from
    a backup, or reset): what follows the cursor there is other history, read again whole."""
    if head < cursor:
        return True
    if items:
        return items[0].revision != cursor + 1 or items[-1].revision != cursor + len(items)
    return head > cursor


def rewritten(cursor_row: FeedItem | None, rows: Sequence[FeedItem]) -> bool:
    """Whether the feed holds another row at the cursor than the one read there (`rows`:
    read from the cursor's revision on): the datastore was restored, and written to past the
    cursor before the follower looked, so the head is not behind it (pruned_past). Read from
    after the cursor, the new history's rows up to it were never read, and this server served
    without them. A row at the cursor that is gone was pruned, not rewritten."""
    return (
        cursor_row is not None
        and bool(rows)
        and rows[0].revision == cursor_row.revision
        and rows[0] != cursor_row
    )


def from_the_backup(
    announced: PolicyAnnouncement | None, read_from: int, read: Mapping[int, str]
) -> bool:
    """Whether `announced`, the newest announcement of a feed that went back behind the
    cursor, is one the follower read before (the backup's, older maybe than the fleet's last),
    not one written on the restored datastore since: a `policy reload` made there before the
    follower looked is the fleet's set now, and announcing the old one over it left this
    server serving that old set with nothing diverged. `read`: the announcements read, by
    revision, which the follower read every row after `read_from` to find; one at or before
    `read_from` predates them and is taken for the backup's. Written since the restore, it
    holds a revision the follower read another row at."""
    return (
        announced is None
        or announced.revision <= read_from
        or read.get(announced.revision) == announced.policy_set_hash
    )


def diff_rows(
    current: Mapping[str, _V],
    loaded: Mapping[str, _V | None],
    skip: Container[str] = (),
    *,
    complete: bool = False,
) -> tuple[list[_V], list[str]]:
    """(put, removed): the rows of `loaded` that differ from `current` (None: the row is gone),
    except keys in `skip`. With `complete`, `loaded` is every stored row: a key of `current`
    it lacks is gone too."""
    put: list[_V] = []
    removed: list[str] = []
    for key, row in loaded.items():
        if key in skip:
            continue
        if row is None:
            if key in current:
                removed.append(key)
        elif current.get(key) != row:
            put.append(row)
    if complete:
        removed.extend(k for k in current if k not in loaded and k not in skip)
    return put, removed


# -- the loop -------------------------------------------------------------------------------------


class FollowedTasks(Protocol):
    """What the follower asks of the task layer (server.tasks.service.TaskService)."""

    def reload_tasks(self, task_ids: Sequence[str]) -> Mapping[str, Task | None]: ...

    def reload_all_tasks(self) -> Mapping[str, Task | None]: ...

    def apply_tasks(self, loaded: Mapping[str, Task | None]) -> None: ...


class FollowedFederation(Protocol):
    """What the follower asks of the federation service (server.federation.service)."""

    def follow_mark(self) -> int: ...

    def read_stored(self) -> Stored: ...

    def apply_stored(self, stored: Stored, mark: int) -> bool: ...

    async def let_go_deleted(self) -> None: ...


@dataclass
class _Loaded:
    entries: dict[str, Entry | None] = field(default_factory=dict)
    agents: dict[str, AttestedAgent | None] = field(default_factory=dict)
    tasks: Mapping[str, Task | None] = field(default_factory=dict)
    revocations: list[Revocation] | None = None
    audit_records: list[AuditRecord] | None = None
    federation: Stored | None = None


class FeedFollower:
    """Follows the change feed from `cursor` (the feed head read before the state loaded)."""

    def __init__(
        self,
        *,
        datastore: DataStore,
        state: ServerState,
        tasks: FollowedTasks,
        on_key_slots_changed: Callable[[], None],
        clock: Clock,
        cursor: int,
        settings: FollowSettings | None = None,
        on_audit_records: Callable[[Sequence[AuditRecord]], None] = lambda _records: None,
        federation: FollowedFederation | None = None,
        view: ViewFreshness | None = None,
        on_policy_announced: Callable[[PolicyAnnouncement], None] = lambda _announced: None,
        on_feed_restored: Callable[[PolicyAnnouncement | None], None] | None = None,
    ) -> None:
        self._ds = datastore
        self._state = state
        self._tasks = tasks
        self._federation = federation
        self._on_key_slots_changed = on_key_slots_changed
        self._on_audit_records = on_audit_records
        self._on_policy_announced = on_policy_announced
        self._on_feed_restored = on_feed_restored
        self._clock = clock
        self._cursor = cursor
        self.settings = settings or FollowSettings()
        # Marked at each catch-up that read the feed to its end (what Sync asks before serving).
        self.view = view or ViewFreshness(clock, None)
        # Rows skipped last time (this server was writing them meanwhile): read again.
        self._pending = FeedWork()
        # The catch-up running (shared by whoever asks meanwhile), and how many have begun.
        self._flight: asyncio.Task[int] | None = None
        self._started = 0
        # The policy reload an announcement asks for runs beside the feed, not in it: a slow
        # Cedar parse (or a policy_dir on a hung mount) held every later row back, revocations
        # and Sync snapshots included. Only the newest hash waits; one reload runs at a time.
        # A restore's turn (on_feed_restored) waits the same way: it takes the fleet's lock,
        # which a hung reload holds.
        self._policy_next: Callable[[], None] | None = None
        self._policy_reload: asyncio.Task[None] | None = None
        # The row read at the cursor (None: not read, as after a full reload): rewritten.
        self._cursor_row: FeedItem | None = None
        # The announcements read since the cursor was `_policy_read_from` (from_the_backup).
        self._policy_read: dict[int, str] = {}
        self._policy_read_from = cursor
        # For tests and metrics: rows read, full reloads done.
        self.rows_read = 0
        self.full_reloads = 0
        # Threads of its own, not asyncio's default pool: that one is shared with every
        # admin and node call touching the datastore, and under a burst of writes the feed
        # read queued behind them past the view's staleness bound (Sync then refused).
        # One thread holds wait_feed; the other reads the feed and the rows it names.
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="feed-wait")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="feed-read")

    @property
    def cursor(self) -> int:
        return self._cursor

    async def run(self, stop: asyncio.Event) -> None:
        """Catch up, then wait for the feed to move (or the safety poll), until `stop`."""
        try:
            await self._follow(stop)
        finally:
            await self._ground()

    async def _ground(self) -> None:
        # A catch-up a Sync stream began (shielded from its caller) may still be running at
        # stop: it is ended here, not left pending on a loop about to close.
        flight = self._flight
        if flight is not None and not flight.done():
            flight.cancel()
            await asyncio.wait({flight})
        reload = self._policy_reload
        if reload is not None and not reload.done():
            reload.cancel()
            await asyncio.wait({reload})
        # Not waited for: wait_feed ends on its own (at its timeout, or when the datastore
        # closes), as does a read under way.
        self._waiter.shutdown(wait=False, cancel_futures=True)
        self._reader.shutdown(wait=False, cancel_futures=True)

    async def _read(self, call: Callable[_P, _V], *args: _P.args, **kwargs: _P.kwargs) -> _V:
        """`call` on the follower's reading thread."""
        return await self._on(self._reader, call, *args, **kwargs)

    async def _on(
        self, thread: Executor, call: Callable[_P, _V], *args: _P.args, **kwargs: _P.kwargs
    ) -> _V:
        def follower_call() -> _V:
            with self._ds.feed_reading():
                return call(*args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(thread, follower_call)

    async def _read_dated(
        self, call: Callable[_P, _V], *args: _P.args, **kwargs: _P.kwargs
    ) -> tuple[float, _V]:
        """`call` on the reading thread, and a view mark (`ViewFreshness.now`) of when its
        first datastore read began: once the thread and a connection were had. Time queued
        for either (a loaded server) is no part of the view's age; what committed before the
        read began is in what it reads."""

        def dated_call() -> tuple[float, _V]:
            marks = [self.view.now()]

            def connected() -> None:
                marks.append(self.view.now())

            with self._ds.feed_reading(connected):
                result = call(*args, **kwargs)
            return marks[1] if len(marks) > 1 else marks[0], result

        return await asyncio.get_running_loop().run_in_executor(self._reader, dated_call)

    async def _follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.catch_up()
            except Exception:
                _log.exception("following the change feed failed; retrying")
            if self._pending:
                await set_within(stop, RETRY_DELAY)
                continue
            # A wake-up is a hint: after the poll interval the feed is read anyway.
            waiting = asyncio.ensure_future(
                self._on(
                    self._waiter, self._ds.wait_feed, self._cursor, self.settings.poll_interval
                )
            )
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                # Stopping: the thread ends on its own (at the timeout, or when the datastore
                # closes); nothing is left waiting for it on a loop that may be gone by then.
                waiting.cancel()
            if waiting.done() and not waiting.cancelled() and waiting.exception() is not None:
                _log.warning("waiting on the change feed failed: %s", waiting.exception())

    async def catch_up(self) -> int:
        """Apply every row committed before this call (and rows left pending); returns the
        rows read by the catch-up it waited on.

        One catch-up runs at a time, shared by every caller (the loop here, and each Sync
        stream about to send a snapshot): two at once would read the same rows and undo each
        other's record of what this server wrote meanwhile (`follow_mark`). One already
        running may have read the feed before this call: it is waited out, and the next one,
        begun after this call, is shared by all who came meanwhile. However many callers,
        a burst costs two reads of the feed at most."""
        need = self._started + 1
        while True:
            flight = self._flight
            if flight is None or flight.done():
                flight = self._take_off()
            if self._started >= need:
                # Shielded: a caller that stops waiting (its own deadline) leaves the catch-up
                # to finish for the others and for the view.
                return await asyncio.shield(flight)
            await asyncio.wait({flight})  # begun before this call: its outcome is not ours

    def _take_off(self) -> asyncio.Task[int]:
        self._started += 1
        flight = asyncio.ensure_future(self._read_to_end())
        self._flight = flight
        flight.add_done_callback(self._landed)
        return flight

    def _landed(self, flight: asyncio.Task[int]) -> None:
        if self._flight is flight:
            self._flight = None
        if not flight.cancelled():
            flight.exception()  # its callers were told; nothing is left to say at exit

    async def _read_to_end(self) -> int:
        read = 0
        while True:
            cursor = self._cursor
            # The view holds what committed before this read began, once it is applied.
            cursor_row = self._cursor_row
            as_of, (head, rows) = await self._read_dated(self._page, cursor)
            items = [row for row in rows if row.revision > cursor][:FEED_PAGE]
            went_back = head < cursor or rewritten(cursor_row, rows)
            if went_back or pruned_past(cursor, head, items):
                await self.reload_everything(went_back=went_back)
                return read
            self._read_announcements(items)
            work = plan(items) | self._pending
            if work:
                await self._apply(work)
            if items:
                self._cursor = items[-1].revision
                self._cursor_row = items[-1]
                read += len(items)
                self.rows_read += len(items)
            if len(items) < FEED_PAGE:
                self.view.caught_up(as_of)
                return read

    def _read_announcements(self, items: Sequence[FeedItem]) -> None:
        self._policy_read.update((i.revision, i.key) for i in items if i.kind == FEED_POLICY)
        # Bounded (announcements are rare, but the datastore's rows are no promise): the
        # oldest forgotten are taken for a backup's, as those before the first read are.
        while len(self._policy_read) > POLICY_ANNOUNCEMENTS_KEPT:
            oldest = min(self._policy_read)
            del self._policy_read[oldest]
            self._policy_read_from = oldest

    def _page(self, cursor: int) -> tuple[int, list[FeedItem]]:
        head = self._ds.feed_head()
        # With the row at the cursor, when one was read there (rewritten).
        after = cursor if self._cursor_row is None else cursor - 1
        return head, self._ds.feed_since(after, FEED_PAGE + cursor - after)

    async def _apply(self, work: FeedWork) -> None:
        self._state.follow_mark()
        mark = self._federation.follow_mark() if self._federation is not None else 0
        loaded = await self._read(self._load, work)
        # From here to the end of the install, nothing else runs on the loop: memory and the
        # rows written meanwhile (`touched`) are one consistent picture.
        skip_entries = self._state.touched(FEED_ENTRY)
        skip_agents = self._state.touched(FEED_AGENT)
        put, removed = diff_rows(self._state.entries.by_id, loaded.entries, skip_entries)
        self._state.apply_entries(put, removed)
        agents, gone = diff_rows(self._state.agents, loaded.agents, skip_agents)
        self._state.apply_agents(agents, gone)
        if loaded.revocations is not None:
            self._state.add_revocations_seen(loaded.revocations)
        self._tasks.apply_tasks(loaded.tasks)
        self._pending = FeedWork(
            entries=work.entries & skip_entries,
            agents=work.agents & skip_agents,
            federation=self._apply_federation(loaded.federation, mark),
        )
        await self._federation_applied()
        if work.key_slots:
            await self._key_slots_changed()
        if loaded.audit_records is not None:
            await self._audit_records_stored(loaded.audit_records)
        if work.policy is not None:
            self._policy_announced(work.policy)
        await self._state.refresh_revision(self._read)

    def _apply_federation(self, stored: Stored | None, mark: int) -> bool:
        """Hand the federation rows to the service; True when it asks to read them again."""
        if stored is None or self._federation is None:
            return False
        return self._federation.apply_stored(stored, mark)

    async def _federation_applied(self) -> None:
        """After the install: the fetch leases of relationships deleted elsewhere go now."""
        if self._federation is not None:
            await self._federation.let_go_deleted()

    async def _key_slots_changed(self) -> None:
        # A failing reload of keys must not stop entries and revocations from following: it
        # is logged, and the next key slot row (or full reload) calls the hook again.
        try:
            await asyncio.to_thread(self._on_key_slots_changed)
        except Exception:
            _log.exception("reloading key slots written by another server failed")

    async def _audit_records_stored(self, records: Sequence[AuditRecord]) -> None:
        # As for key slots: a failure is logged, and the next record (or reload) retries.
        try:
            await asyncio.to_thread(self._on_audit_records, records)
        except Exception:
            _log.exception("taking in audit checkpoints stored by another server failed")

    def _policy_announced(self, announced: PolicyAnnouncement) -> None:
        self._policy_turn(lambda: self._on_policy_announced(announced))

    def _policy_turn(self, job: Callable[[], None]) -> None:
        self._policy_next = job
        if self._policy_reload is None or self._policy_reload.done():
            self._policy_reload = asyncio.ensure_future(self._reload_policy())

    async def _reload_policy(self) -> None:
        while (job := self._policy_next) is not None:
            self._policy_next = None
            # As for key slots: a failure (this server's policy_dir, its ledger) is logged and
            # reported by the hook; the next announcement tries again.
            try:
                await asyncio.to_thread(job)
            except Exception:
                _log.exception("following the policy set another server announced failed")

    async def policy_settled(self) -> None:
        """For tests: wait until the announcements read so far were handed over."""
        while (reload := self._policy_reload) is not None and not reload.done():
            await asyncio.wait({reload})

    def _load(self, work: FeedWork) -> _Loaded:
        loaded = _Loaded()
        if work.entries:
            loaded.entries = dict.fromkeys(work.entries)
            loaded.entries.update((e.id, e) for e in self._ds.get_entries(sorted(work.entries)))
        for spiffe_id in work.agents:
            try:
                loaded.agents[spiffe_id] = self._ds.get_agent(spiffe_id)
            except NotFoundError:
                loaded.agents[spiffe_id] = None
        if work.tasks:
            loaded.tasks = self._tasks.reload_tasks(sorted(work.tasks))
        if work.revocations:
            loaded.revocations = self._ds.list_revocations()
        if work.audit_records:
            loaded.audit_records = self._ds.audit_records()
        if work.federation and self._federation is not None:
            loaded.federation = self._federation.read_stored()
        return loaded

    async def reload_everything(self, went_back: bool = False) -> None:
        """The rows after the cursor were pruned: diff everything stored with memory.
        `went_back`: the feed's head is behind the cursor (the datastore restored from a
        backup): its newest policy announcement is handed to `on_feed_restored`."""
        self.full_reloads += 1
        _log.warning(
            "change feed rows after revision %d were pruned; reloading all state", self._cursor
        )
        self._state.follow_mark()
        mark = self._federation.follow_mark() if self._federation is not None else 0
        as_of, loaded = await self._read_dated(self._load_all)
        head, entries, agents, revocations, tasks, records, federation, announced = loaded
        skip_entries = self._state.touched(FEED_ENTRY)
        skip_agents = self._state.touched(FEED_AGENT)
        put, removed = diff_rows(
            self._state.entries.by_id, {e.id: e for e in entries}, skip_entries, complete=True
        )
        self._state.apply_entries(put, removed)
        put_agents, gone = diff_rows(
            self._state.agents, {a.spiffe_id: a for a in agents}, skip_agents, complete=True
        )
        self._state.apply_agents(put_agents, gone)
        self._state.add_revocations_seen(revocations)
        self._tasks.apply_tasks(tasks)
        self._pending = FeedWork(
            entries=skip_entries,
            agents=skip_agents,
            federation=self._apply_federation(federation, mark),
        )
        await self._federation_applied()
        await self._key_slots_changed()
        await self._audit_records_stored(records)
        # The cursor jumps to the head: an announcement among the rows kept after the pruned
        # ones would be skipped, and this server would serve its old set without a word.
        restored = went_back and from_the_backup(
            announced, self._policy_read_from, self._policy_read
        )
        if went_back:
            # Another history from here on: what was read of the old one says nothing of it.
            self._policy_read.clear()
            self._policy_read_from = head
        elif announced is not None:
            self._policy_read[announced.revision] = announced.policy_set_hash
        if restored and (on_restored := self._on_feed_restored) is not None:
            # Older, maybe, than the fleet's last reload (lost with the rows after the copy).
            self._policy_turn(lambda: on_restored(announced))
        elif announced is not None:
            self._policy_announced(announced)
        await self._state.refresh_revision(self._read)
        self._cursor = head
        self._cursor_row = None
        self.view.caught_up(as_of)

    def _load_all(
        self,
    ) -> tuple[
        int,
        list[Entry],
        list[AttestedAgent],
        list[Revocation],
        Mapping[str, Task | None],
        list[AuditRecord],
        Stored | None,
        PolicyAnnouncement | None,
    ]:
        # The head first: whatever commits after it is read again from the feed.
        head = self._ds.feed_head()
        return (
            head,
            self._ds.list_entries(),
            self._ds.list_agents(),
            self._ds.list_revocations(),
            self._tasks.reload_all_tasks(),
            self._ds.audit_records(),
            self._federation.read_stored() if self._federation is not None else None,
            self._ds.announced_policy(),
        )

    async def prune(self) -> int:
        """Drop feed rows older than the retention (from the server's housekeeping)."""
        before = int(self._clock.now() - self.settings.retention)
        return await asyncio.to_thread(self._ds.prune_feed, before)

"""The change feed's follower: the pure decisions, then the loop over two real SQLite
connections to one file (what two server processes on one datastore see)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent_attestor.cache import Cache
from agent_attestor.node_client import sync_state
from server.changelog import Change
from server.datastore.postgres import FEED_CONNECTIONS, PostgresDataStore
from server.datastore.records import (
    EXPIRED_RECORD_RETENTION,
    AttestedAgent,
    Entry,
    FederationRelationship,
    FeedItem,
    ForeignBundle,
    KeySlot,
    PolicyAnnouncement,
    Revocation,
    Selector,
    TaskRecord,
)
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.events import ChangeNotifier
from server.federation.service import Stored
from server.replication import (
    FeedFollower,
    FeedWork,
    FollowedFederation,
    FollowSettings,
    diff_rows,
    from_the_backup,
    plan,
    pruned_past,
    rewritten,
)
from server.state import ServerState
from server.tasks.model import Task, TaskState
from server.tasks.service import follow_tasks
from server.view_freshness import ViewFreshness
from svid import MAX_CLOCK_SKEW, MAX_VERIFIER_LEEWAY
from svid._clock import FakeClock, SystemClock
from svid._proto import node_pb2
from tests.server import test_sync_attack
from tests.server.fixtures import TRUST_DOMAIN, Agent, RunningServer
from tests.server.test_sync_attack import Partitioned
from tests.waits import wait_for

NOW = 1_700_000_000
AGENT = "spiffe://example.org/svid/agent/join_token/t1"
SELS = (Selector("unix", "uid:1000"),)


def entry(path: str, **kw: Any) -> Entry:
    return Entry("", f"spiffe://example.org{path}", AGENT, SELS, **kw)


# -- pure decisions -------------------------------------------------------------------------------


def test_plan_reloads_each_named_row_once() -> None:
    items = [
        FeedItem(1, NOW, "entry", "e1"),
        FeedItem(2, NOW, "entry", "e1"),
        FeedItem(3, NOW, "agent", "a1"),
        FeedItem(4, NOW, "task", "t1"),
        FeedItem(5, NOW, "revocation", "jwt_id:j"),
        FeedItem(6, NOW, "key_slot", "s1"),
        FeedItem(7, NOW, "a kind of a newer release", "x"),
    ]
    assert plan(items) == FeedWork(
        entries=frozenset({"e1"}),
        agents=frozenset({"a1"}),
        tasks=frozenset({"t1"}),
        revocations=True,
        key_slots=True,
    )
    assert not plan([])
    assert plan(items[:1]) | FeedWork(agents=frozenset({"a2"})) == FeedWork(
        entries=frozenset({"e1"}), agents=frozenset({"a2"})
    )
    # Federation rows (a handful, read whole): one reload of them, whichever was written.
    for kind in ("federation_relationship", "foreign_bundle"):
        assert plan([FeedItem(8, NOW, kind, "other.org")]) == FeedWork(federation=True)
    assert FeedWork(federation=True)
    assert (FeedWork() | FeedWork(federation=True)).federation


def test_plan_hands_over_stored_audit_records() -> None:
    work = plan([FeedItem(1, NOW, "audit_record", "checkpoint")])
    assert work == FeedWork(audit_records=True)
    assert work
    assert (FeedWork() | work).audit_records


def test_plan_hands_over_the_newest_policy_announcement_only() -> None:
    """Two reloads read in one page: the fleet converges on the later one, not on each."""
    work = plan([FeedItem(1, NOW, "policy", "h1"), FeedItem(2, NOW, "policy", "h2")])
    assert work == FeedWork(policy=PolicyAnnouncement(2, "h2", NOW))
    assert work
    assert (work | FeedWork(policy=PolicyAnnouncement(0, "h0", NOW))).policy == (2, "h2", NOW)
    assert (FeedWork() | work).policy == (2, "h2", NOW)


@pytest.mark.parametrize(
    ("cursor", "head", "first", "pruned"),
    [
        (0, 0, None, False),  # nothing written
        (5, 5, None, False),  # up to date
        (5, 7, None, True),  # rows 6..7 committed before the read, none left: pruned
        (5, 7, 6, False),
        (5, 9, 8, True),  # 6..7 gone
        (0, 3, 2, True),
    ],
)
def test_rows_pruned_past_the_cursor_are_seen(
    cursor: int, head: int, first: int | None, pruned: bool
) -> None:
    items = [] if first is None else [FeedItem(first, NOW, "entry", "e")]
    assert pruned_past(cursor, head, items) is pruned


@pytest.mark.parametrize(
    ("revisions", "pruned"),
    [
        ((6, 7, 8), False),
        ((6, 8), True),  # 7 gone between rows still kept
        ((6, 7, 9, 10), True),
    ],
)
def test_a_hole_within_the_rows_is_seen(revisions: tuple[int, ...], pruned: bool) -> None:
    items = [FeedItem(r, NOW, "entry", "e") for r in revisions]
    assert pruned_past(5, 10, items) is pruned


def test_a_feed_that_went_back_behind_the_cursor_is_read_again_whole() -> None:
    # A database restored from a backup: its revisions start again below what was applied.
    assert pruned_past(10, 4, [])
    assert pruned_past(10, 9, [FeedItem(11, NOW, "entry", "e")])
    assert not pruned_past(10, 10, [])


def test_a_feed_holding_another_row_at_the_cursor_was_rewritten() -> None:
    read = FeedItem(5, NOW, "entry", "e")
    assert not rewritten(read, [read, FeedItem(6, NOW, "entry", "f")])
    assert rewritten(read, [FeedItem(5, NOW + 3, "policy", "h"), FeedItem(6, NOW, "entry", "f")])
    assert not rewritten(read, [FeedItem(6, NOW, "entry", "f")])  # pruned, not rewritten
    assert not rewritten(None, [FeedItem(5, NOW + 3, "policy", "h")])  # none read there
    assert not rewritten(read, [])


def test_a_restored_feeds_announcement_is_the_backups_only_when_it_was_read_before() -> None:
    read = {7: "h7", 9: "h9"}  # read by the follower, every row after revision 5
    assert from_the_backup(None, 5, read)  # the backup holds none
    assert from_the_backup(PolicyAnnouncement(3, "h3", NOW), 5, read)  # older than what was read
    assert from_the_backup(PolicyAnnouncement(7, "h7", NOW), 5, read)
    # Written on the restored datastore since: at a revision another row was read at.
    assert not from_the_backup(PolicyAnnouncement(8, "h8", NOW), 5, read)
    assert not from_the_backup(PolicyAnnouncement(9, "hY", NOW), 5, read)


def test_diff_rows_puts_what_differs_and_removes_what_is_gone() -> None:
    current = {"a": 1, "b": 2, "c": 3}
    put, removed = diff_rows(current, {"a": 1, "b": 20, "c": None, "d": 4, "e": None})
    assert (put, removed) == ([20, 4], ["c"])
    # Keys this server wrote meanwhile are left as memory has them.
    assert diff_rows(current, {"b": 20, "c": None}, skip={"b", "c"}) == ([], [])
    # A complete reload removes what it lacks (except skipped keys).
    assert diff_rows(current, {"a": 1}, skip={"c"}, complete=True) == ([], ["b"])


def _task(task_id: str, state: TaskState = TaskState.ACTIVE) -> Task:
    return Task(
        task_id=task_id,
        spiffe_id=f"spiffe://example.org/bot/task/{task_id}",
        runtime_id="spiffe://example.org/bot",
        agent_id=AGENT,
        entry_id=f"task-{task_id}",
        actions=("read",),
        resources=("docs",),
        classification="internal",
        environment="",
        on_behalf_of="",
        goal_sha256="",
        parent_task_id="",
        depth=0,
        ttl=60,
        created_at=NOW,
        expires_at=NOW + 60,
        decision="allow",
        reason="",
        policy_ids=(),
        policy_set_hash="",
        act={},
        state=state,
    )


def test_follow_tasks_begins_active_rows_and_an_end_is_final() -> None:
    held = _task("t1")
    active = {held.spiffe_id: held}
    loaded: Mapping[str, Task | None] = {
        "t1": replace(held, state=TaskState.ENDED),  # ended elsewhere
        "t2": _task("t2"),  # begun elsewhere
        "t3": _task("t3"),  # read before this server ended it: stays ended
        "t4": None,
    }
    begun, ended = follow_tasks(active, {"t3"}, loaded)
    assert [t.task_id for t in begun] == ["t2"]
    assert ended == [held]
    assert follow_tasks(active, set(), {"t1": held}) == ([], [])


# -- the loop over two connections to one file --------------------------------------------------


class Tasks:
    """The task layer's side of the follower, recorded (its own tests cover TaskService)."""

    def __init__(self) -> None:
        self.applied: list[Mapping[str, Task | None]] = []

    def reload_tasks(self, task_ids: Sequence[str]) -> Mapping[str, Task | None]:
        return dict.fromkeys(task_ids)

    def reload_all_tasks(self) -> Mapping[str, Task | None]:
        return {}

    def apply_tasks(self, loaded: Mapping[str, Task | None]) -> None:
        if loaded:
            self.applied.append(loaded)


class Side:
    """One server's view: its own connection, state, follower and the changes it logged."""

    def __init__(
        self,
        path: Path,
        clock: FakeClock,
        wrap: bool = False,
        poll_interval: float = 0.2,
        federation: FollowedFederation | None = None,
    ) -> None:
        self.store = SqliteDataStore(path, clock)
        self.ds = FaultInjectingDataStore(self.store) if wrap else self.store
        cursor = self.ds.feed_head()
        self.state = ServerState(self.ds, clock, ChangeNotifier())  # type: ignore[arg-type]
        self.state.load()
        self.tasks = Tasks()
        self.key_slot_calls = 0
        self.announced: list[str] = []
        self.follower = FeedFollower(
            datastore=self.ds,  # type: ignore[arg-type]
            state=self.state,
            tasks=self.tasks,
            on_key_slots_changed=self._key_slots_changed,
            clock=clock,
            cursor=cursor,
            settings=FollowSettings(poll_interval=poll_interval, retention=60),
            federation=federation,
            on_policy_announced=lambda announced: self.announced.append(announced.policy_set_hash),
        )
        self.changes: list[Change] = []

    def _key_slots_changed(self) -> None:
        self.key_slot_calls += 1

    def listen(self) -> None:
        self.state.on_change(self.changes.append)


class Federated:
    """The federation service's side of the follower, recorded (FederationService's own
    tests cover what it does with the rows)."""

    def __init__(self, store: SqliteDataStore) -> None:
        self.store = store
        self.applied: list[Stored] = []
        self.ask_again = 0

    def follow_mark(self) -> int:
        return 0

    def read_stored(self) -> Stored:
        return Stored(
            {r.trust_domain: r for r in self.store.list_relationships()},
            {b.trust_domain: b for b in self.store.list_foreign_bundles()},
        )

    def apply_stored(self, stored: Stored, mark: int) -> bool:
        self.applied.append(stored)
        if self.ask_again:
            self.ask_again -= 1
            return True
        return False

    async def let_go_deleted(self) -> None:
        pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def sides(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[Side, Side]]:
    a = Side(tmp_path / "db", clock)
    b = Side(tmp_path / "db", clock)
    yield a, b
    a.store.close()
    b.store.close()


def test_writes_through_one_side_reach_the_other_as_changes(sides: tuple[Side, Side]) -> None:
    a, b = sides

    async def scenario() -> None:
        b.listen()
        made = await a.state.create_entry(entry("/web"))
        batch = await a.state.create_entries([entry("/x"), entry("/y")])
        agent = AttestedAgent(AGENT, "join_token", "1", NOW + 3600)
        await a.state.save_agent(agent, None)
        revoked = Revocation("jwt_id", "j1", "spiffe://example.org/web", NOW + 60, "r", NOW)
        await a.state.add_revocations((revoked,))
        await asyncio.to_thread(a.store.put_task, _record("t1"))
        assert await b.follower.catch_up() == 6
        assert b.state.entries.by_id == a.state.entries.by_id
        assert set(b.state.entries.by_id) == {made.id, *(e.id for e in batch)}  # type: ignore[union-attr]
        assert b.state.agents == a.state.agents
        assert b.state.revocations == (revoked,)
        assert [list(t) for t in b.tasks.applied] == [["t1"]]
        # Delivered as ordinary changes: the propagator hands them to the streams concerned.
        touched = [t.id for c in b.changes for t in c.entries]
        assert sorted(touched) == sorted(b.state.entries.by_id)
        assert [c.agents for c in b.changes if c.agents] == [(AGENT,)]
        assert [c.revocations_added for c in b.changes if c.revocations_added] == [(revoked,)]
        # Updates, renewals (the old certificate stays acceptable) and deletes follow too.
        await a.state.update_entry(replace(made, hint="new", revision=0))
        await a.state.save_agent(agent.renewed("2", NOW + 3600, held="1"), agent)
        await a.state.delete_entries([batch[0].id])  # type: ignore[union-attr]
        await b.follower.catch_up()
        assert b.state.entries.by_id == a.state.entries.by_id
        assert b.state.authorize_agent(AGENT, "1") == b.state.agents[AGENT]
        assert b.state.agents[AGENT].serial == "2"
        await a.state.evict_agent(AGENT)
        await b.follower.catch_up()
        assert AGENT not in b.state.agents

    asyncio.run(scenario())


def _record(task_id: str) -> TaskRecord:
    return TaskRecord(task_id, AGENT, "spiffe://example.org/bot", "active", NOW + 60, NOW, "{}")


def test_rows_a_side_wrote_itself_change_nothing(sides: tuple[Side, Side]) -> None:
    a, _ = sides

    async def scenario() -> None:
        a.listen()
        await a.state.create_entry(entry("/web"))
        logged = len(a.changes)
        assert await a.follower.catch_up() == 1
        assert len(a.changes) == logged
        assert await a.follower.catch_up() == 0

    asyncio.run(scenario())


def test_key_slot_rows_call_the_hook(sides: tuple[Side, Side]) -> None:
    a, b = sides
    a.store.save_key_slot(KeySlot("s1", "jwt", "active", b"der", "kid", NOW, NOW + 10, NOW))
    asyncio.run(b.follower.catch_up())
    assert b.key_slot_calls == 1
    asyncio.run(b.follower.catch_up())
    assert b.key_slot_calls == 1


def test_a_failing_key_slot_hook_does_not_stop_the_feed(sides: tuple[Side, Side]) -> None:
    a, b = sides

    def broken() -> None:
        raise OSError("key file unreadable")

    b.follower._on_key_slots_changed = broken
    a.store.save_key_slot(KeySlot("s1", "jwt", "active", b"der", "kid", NOW, NOW + 10, NOW))
    a.store.put_task(_record("t1"))
    asyncio.run(b.follower.catch_up())
    assert b.follower.cursor == a.store.feed_head()
    assert [list(t) for t in b.tasks.applied] == [["t1"]]


def test_federation_rows_hand_what_is_stored_to_the_federation_service(
    tmp_path: Path, clock: FakeClock
) -> None:
    a = Side(tmp_path / "db", clock)
    federated = Federated(SqliteDataStore(tmp_path / "db", clock))
    b = Side(tmp_path / "db", clock, federation=federated)
    try:
        rel = FederationRelationship("other.org", "https://127.0.0.1:1/", "https_web")
        a.store.create_relationship(rel)
        a.store.put_foreign_bundle(ForeignBundle("other.org", b'{"keys":[]}', NOW))
        asyncio.run(b.follower.catch_up())
        # Two rows, one read of the federation tables.
        assert len(federated.applied) == 1
        assert set(federated.applied[0].relationships) == {"other.org"}
        assert set(federated.applied[0].bundles) == {"other.org"}
        # The service wrote one of them itself meanwhile: read again with no new row.
        federated.ask_again = 1
        a.store.delete_foreign_bundle("other.org")
        asyncio.run(b.follower.catch_up())
        assert federated.applied[-1].bundles == {}
        asyncio.run(b.follower.catch_up())
        assert len(federated.applied) == 3
        asyncio.run(b.follower.catch_up())
        assert len(federated.applied) == 3
        # Rows pruned past the cursor: the full reload reads them too.
        a.store.delete_relationship("other.org")
        clock.advance(61)
        assert asyncio.run(a.follower.prune()) == 4
        asyncio.run(b.follower.catch_up())
        assert b.follower.full_reloads == 1
        assert federated.applied[-1].relationships == {}
    finally:
        for store in (a.store, b.store, federated.store):
            store.close()


def test_a_cursor_behind_pruned_rows_reloads_everything(
    sides: tuple[Side, Side], clock: FakeClock
) -> None:
    a, b = sides

    async def scenario() -> None:
        keep = await a.state.create_entry(entry("/keep"))
        gone = await a.state.create_entry(entry("/gone"))
        await b.follower.catch_up()
        # b is "down" while a writes and prunes every row it wrote.
        await a.state.delete_entry(gone.id)
        added = await a.state.create_entry(entry("/added"))
        await a.state.save_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600), None)
        clock.advance(61)
        assert await a.follower.prune() == 5
        b.listen()
        await b.follower.catch_up()
        assert b.follower.full_reloads == 1
        assert set(b.state.entries.by_id) == {keep.id, added.id}
        assert AGENT in b.state.agents
        assert b.key_slot_calls == 1
        assert b.follower.cursor == a.store.feed_head()
        # From there on it follows row by row again.
        await a.state.delete_entry(keep.id)
        await b.follower.catch_up()
        assert set(b.state.entries.by_id) == {added.id}
        assert b.follower.full_reloads == 1

    asyncio.run(scenario())


def test_a_policy_announcement_kept_past_pruned_rows_reaches_a_full_reload(
    sides: tuple[Side, Side], clock: FakeClock
) -> None:
    """The full reload jumps the cursor to the head: the announcement among the kept rows
    was skipped, and b served its old policy set without a word."""
    a, b = sides

    async def scenario() -> None:
        await a.state.create_entry(entry("/old"))
        await b.follower.catch_up()
        await a.state.create_entry(entry("/pruned"))
        clock.advance(61)
        assert await a.follower.prune() == 2
        a.store.announce_policy("h1")  # newer than the retention: kept
        await b.follower.catch_up()
        assert b.follower.full_reloads == 1
        await b.follower.policy_settled()
        assert b.announced == ["h1"]

    asyncio.run(scenario())


def test_a_slow_policy_reload_holds_no_later_row_back(
    sides: tuple[Side, Side], clock: FakeClock
) -> None:
    """The reload an announcement asks for ran inside the catch-up: while this server's Cedar
    parse (or its policy_dir's mount) hung, no entry, revocation or Sync snapshot followed.
    Announcements read meanwhile wait as one: only the newest is reloaded next."""
    a, b = sides
    parsing = threading.Event()
    parsed = threading.Event()

    def slow(announced: PolicyAnnouncement) -> None:
        b.announced.append(announced.policy_set_hash)
        parsing.set()
        parsed.wait(30)

    b.follower._on_policy_announced = slow

    async def scenario() -> None:
        a.store.announce_policy("h1")
        await asyncio.wait_for(b.follower.catch_up(), 10)
        await asyncio.to_thread(parsing.wait, 10)
        later = await a.state.create_entry(entry("/later"))
        a.store.announce_policy("h2")
        a.store.announce_policy("h3")
        # A hang guard, not a speed bound: the catch-up hung for as long as the parse did.
        await asyncio.wait_for(b.follower.catch_up(), 10)
        assert later.id in b.state.entries.by_id
        parsed.set()
        await b.follower.policy_settled()
        assert b.announced == ["h1", "h3"]

    try:
        asyncio.run(scenario())
    finally:
        parsed.set()


def test_a_hung_policy_reload_holds_no_restored_feed_back(
    sides: tuple[Side, Side], tmp_path: Path
) -> None:
    """A feed gone back (the datastore restored) while an announcement's reload hung (this
    server's policy_dir on a hung mount): the full reload waited for the fleet's lock, which
    the hung reload held, inside the catch-up, and no entry, revocation or Sync snapshot
    followed. What the restore asks of the fleet waits beside the feed, as a reload does."""
    a, b = sides
    fleet = threading.Lock()  # PolicyFleet's: each hook runs under it
    parsing = threading.Event()
    parsed = threading.Event()
    restored: list[PolicyAnnouncement | None] = []

    def hung(announced: PolicyAnnouncement) -> None:
        with fleet:
            parsing.set()
            parsed.wait(30)

    def on_restored(newest: PolicyAnnouncement | None) -> None:
        with fleet:
            restored.append(newest)

    b.follower._on_policy_announced = hung
    b.follower._on_feed_restored = on_restored

    async def scenario() -> None:
        with contextlib.closing(sqlite3.connect(tmp_path / "copy")) as copy:
            with contextlib.closing(sqlite3.connect(tmp_path / "db")) as live:
                live.backup(copy)
            await a.state.create_entry(entry("/lost"))
            a.store.announce_policy("h1")
            await asyncio.wait_for(b.follower.catch_up(), 10)
            await asyncio.to_thread(parsing.wait, 10)
            with contextlib.closing(sqlite3.connect(tmp_path / "db")) as live:
                copy.backup(live)  # the restore
        # A hang guard, not a speed bound: the catch-up hung for as long as the reload did.
        await asyncio.wait_for(b.follower.catch_up(), 10)
        assert b.follower.full_reloads == 1
        assert not [e for e in b.state.entries.by_id.values() if e.spiffe_id.endswith("/lost")]
        parsed.set()
        await b.follower.policy_settled()
        assert restored == [None]

    try:
        asyncio.run(scenario())
    finally:
        parsed.set()


def test_a_restored_feed_written_past_the_cursor_before_it_was_read_reloads_everything(
    sides: tuple[Side, Side], tmp_path: Path
) -> None:
    """The datastore restored, and written to by another server before this one's follower
    looked, past its cursor: the rows after the cursor were read as if nothing happened, and
    those of the new history at or before it never were (an entry, a revocation, a policy
    reload: this server served without them, silently). The row at the cursor is another:
    the feed is read again whole, as one that went back."""
    a, b = sides
    announced: list[PolicyAnnouncement | None] = []
    b.follower._on_feed_restored = announced.append

    async def scenario() -> None:
        with contextlib.closing(sqlite3.connect(tmp_path / "copy")) as copy:
            with contextlib.closing(sqlite3.connect(tmp_path / "db")) as live:
                live.backup(copy)
            await a.state.create_entry(entry("/lost"))
            await b.follower.catch_up()
            with contextlib.closing(sqlite3.connect(tmp_path / "db")) as live:
                copy.backup(live)  # the restore
        a.store.announce_policy("since")  # at the revision /lost was at
        made = await a.state.create_entry(entry("/since"))
        await b.follower.catch_up()
        await b.follower.policy_settled()
        assert b.follower.full_reloads == 1
        assert made.id in b.state.entries.by_id
        assert not [e for e in b.state.entries.by_id.values() if e.spiffe_id.endswith("/lost")]
        assert b.announced == ["since"]
        # An ordinary feed is not taken for a restored one: its rows are read as ever.
        await a.state.create_entry(entry("/later"))
        await b.follower.catch_up()
        assert b.follower.full_reloads == 1

    asyncio.run(scenario())


def test_a_pruned_row_at_the_cursor_is_not_taken_for_a_restore(
    sides: tuple[Side, Side], clock: FakeClock
) -> None:
    a, b = sides

    async def scenario() -> None:
        await a.state.create_entry(entry("/old"))
        await b.follower.catch_up()
        clock.advance(61)
        assert await a.follower.prune() == 1  # the row at b's cursor
        made = await a.state.create_entry(entry("/new"))
        await b.follower.catch_up()
        assert b.follower.full_reloads == 0
        assert made.id in b.state.entries.by_id

    asyncio.run(scenario())


def test_a_row_pruned_between_kept_rows_reloads_everything(tmp_path: Path) -> None:
    """Rows are pruned by their writer's clock, and servers' clocks differ: a row written by a
    server running behind can go while an older row from a server running ahead stays. The
    hole in the middle of a page must not be read past (its change would be lost)."""
    ahead, behind = FakeClock(NOW + 10), FakeClock(NOW)
    a = Side(tmp_path / "db", ahead)
    c = Side(tmp_path / "db", behind)
    b = Side(tmp_path / "db", ahead)

    async def scenario() -> None:
        await a.state.create_entry(entry("/first"))
        missed = await c.state.create_entry(entry("/from-the-late-clock"))
        await a.state.create_entry(entry("/last"))
        # Retention runs out between the two clocks: only the late clock's row goes.
        ahead.advance(55)
        assert await a.follower.prune() == 1
        await b.follower.catch_up()
        assert missed.id in b.state.entries.by_id
        assert b.follower.full_reloads == 1
        assert b.follower.cursor == a.store.feed_head()

    try:
        asyncio.run(scenario())
    finally:
        for side in (a, b, c):
            side.store.close()


def test_an_agent_another_server_pruned_leaves_this_ones_memory(
    sides: tuple[Side, Side], clock: FakeClock
) -> None:
    """An agent expired EXPIRED_RECORD_RETENTION ago goes from the datastore and the pruning
    server's memory, and from every other server's through the change feed; a current one
    stays everywhere."""
    a, b = sides
    old = "spiffe://example.org/svid/agent/join_token/old"

    async def scenario() -> None:
        await a.state.save_agent(AttestedAgent(old, "join_token", "1", NOW + 60), None)
        await b.follower.catch_up()
        assert old in b.state.agents
        clock.advance(61 + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW + EXPIRED_RECORD_RETENTION)
        await a.state.save_agent(AttestedAgent(AGENT, "join_token", "1", int(clock.now())), None)
        a.listen()
        await a.state.prune()
        assert set(a.state.agents) == {AGENT}
        assert [c.agents for c in a.changes] == [(old,)]
        b.listen()
        await b.follower.catch_up()
        assert set(b.state.agents) == {AGENT}
        assert any(old in c.agents for c in b.changes)  # its agents are told

    asyncio.run(scenario())


def test_revocations_pruned_by_another_server_leave_this_ones_memory(
    sides: tuple[Side, Side], clock: FakeClock
) -> None:
    """Housekeeping prunes on every server; the first one's delete leaves nothing for the
    others to delete, and they must still drop what expired from memory (and tell agents)."""
    a, b = sides

    async def scenario() -> None:
        revoked = Revocation("jwt_id", "j1", "spiffe://example.org/web", NOW + 60, "r", NOW)
        await a.state.add_revocations((revoked,))
        await b.follower.catch_up()
        assert b.state.revocations == (revoked,)
        clock.advance(61 + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW)
        await a.state.prune()
        assert a.state.revocations == ()
        b.listen()
        await b.state.prune()
        assert not b.state.revocations
        assert [c.revocations_removed for c in b.changes] == [(revoked,)]

    asyncio.run(scenario())


def test_a_row_read_before_a_local_write_does_not_undo_it(tmp_path: Path, clock: FakeClock) -> None:
    """b reloads an entry a changed; while that read is in flight, b deletes the entry itself.
    The version read before the delete must not bring it back."""
    a = Side(tmp_path / "db", clock)
    b = Side(tmp_path / "db", clock, wrap=True)
    read, go = threading.Event(), threading.Event()
    real_get = b.store.get_entries

    def slow_get(entry_ids: Sequence[str]) -> list[Entry]:
        found = real_get(entry_ids)
        read.set()
        go.wait(10)
        return found

    async def scenario() -> None:
        made = await a.state.create_entry(entry("/web"))
        await b.follower.catch_up()
        await a.state.update_entry(replace(made, hint="changed", revision=0))
        b.ds.get_entries = slow_get  # type: ignore[method-assign]
        following = asyncio.create_task(b.follower.catch_up())
        await asyncio.to_thread(read.wait, 10)
        await b.state.delete_entry(made.id)  # b's own write, while the stale read is held
        go.set()
        await following
        assert made.id not in b.state.entries.by_id
        b.ds.get_entries = real_get  # type: ignore[method-assign]
        await b.follower.catch_up()  # the skipped row is read again: still gone
        assert made.id not in b.state.entries.by_id

    try:
        asyncio.run(scenario())
    finally:
        a.store.close()
        b.store.close()


def test_the_loop_wakes_on_a_write_of_another_connection(tmp_path: Path, clock: FakeClock) -> None:
    a = Side(tmp_path / "db", clock)
    b = Side(tmp_path / "db", clock, poll_interval=30)

    async def scenario() -> float:
        stop = asyncio.Event()
        running = asyncio.create_task(b.follower.run(stop))
        await asyncio.sleep(0.05)
        made = await a.state.create_entry(entry("/web"))
        started = time.monotonic()  # committed: from here on it is the follower's time
        while made.id not in b.state.entries.by_id:
            await asyncio.sleep(0.005)
        took = time.monotonic() - started
        stop.set()
        await asyncio.wait_for(running, 5)
        b.store.close()  # ends the wait still under way in its thread
        return took

    try:
        took = asyncio.run(scenario())
    finally:
        a.store.close()
        b.store.close()
    # Far from the 30 s safety poll: the feed's wake-up brought it (about 20 ms when idle).
    assert took < 2


class Deaf(FaultInjectingDataStore):
    """A feed whose wake-ups never come (a lost notification): waits always time out."""

    def wait_feed(self, after: int, timeout: float) -> bool:
        time.sleep(timeout)
        return False


def test_a_missed_wake_up_lands_within_the_safety_poll(tmp_path: Path, clock: FakeClock) -> None:
    a = Side(tmp_path / "db", clock)
    b = Side(tmp_path / "db", clock, poll_interval=0.3)
    b.follower._ds = Deaf(b.store)  # type: ignore[assignment]

    async def scenario() -> float:
        stop = asyncio.Event()
        running = asyncio.create_task(b.follower.run(stop))
        await asyncio.sleep(0.05)
        made = await a.state.create_entry(entry("/web"))
        started = time.monotonic()
        while made.id not in b.state.entries.by_id:
            await asyncio.sleep(0.005)
        took = time.monotonic() - started
        stop.set()
        await asyncio.wait_for(running, 5)
        return took

    try:
        took = asyncio.run(scenario())
    finally:
        a.store.close()
        b.store.close()
    assert took < 0.3 + 0.5  # one poll interval, and slack for a busy machine


def test_a_revocation_another_server_pruned_by_a_clock_ahead_stays_while_this_one_needs_it(
    tmp_path: Path,
) -> None:
    """a's clock runs 30 s ahead of b's. a's housekeeping deletes the row at exp + leeway by
    its clock; b's own prune rightly keeps the revocation in memory (b's clock says a verifier
    may still take the token). Then b adds an unrelated revocation: reading the list back, b
    drops the first from memory and tells its agents to forget it, though its own clock (and
    every verifier's near it) still needs it for 29 s."""
    ahead, behind = FakeClock(NOW + 30), FakeClock(NOW)
    a = Side(tmp_path / "db", ahead)
    b = Side(tmp_path / "db", behind)

    async def scenario() -> None:
        exp = NOW + 60
        needed = Revocation("jwt_id", "j1", "spiffe://example.org/web", exp, "r", NOW)
        await a.state.add_revocations((needed,))
        await b.follower.catch_up()
        ahead.set(exp + MAX_VERIFIER_LEEWAY + 1)
        behind.set(exp + MAX_VERIFIER_LEEWAY - 29)
        await a.state.prune()
        await b.state.prune()
        assert needed in b.state.revocations  # b's own prune keeps it: b's clock needs it
        b.listen()
        other = Revocation("jwt_id", "j2", "spiffe://example.org/web", exp + 600, "r", NOW)
        await b.state.add_revocations((other,))
        assert [c.revocations_removed for c in b.changes] == [()]
        assert needed in b.state.revocations

    try:
        asyncio.run(scenario())
    finally:
        a.store.close()
        b.store.close()


def test_catch_ups_asked_at_once_share_one_begun_after_them(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A catch-up under way read the feed before a's entry committed; the ten asked after
    that commit (Sync streams about to send a snapshot) wait it out and share the next one,
    which brings the entry: two reads of the feed in all, not eleven."""
    a = Side(tmp_path / "db", clock)
    b = Side(tmp_path / "db", clock)
    reads: list[int] = []
    read, go = threading.Event(), threading.Event()
    real_page = b.follower._page

    def held_page(cursor: int) -> tuple[int, list[FeedItem]]:
        page = real_page(cursor)
        reads.append(cursor)
        if len(reads) == 1:
            read.set()
            go.wait(10)
        return page

    b.follower._page = held_page  # type: ignore[method-assign]

    async def scenario() -> None:
        under_way = asyncio.create_task(b.follower.catch_up())
        await asyncio.to_thread(read.wait, 10)
        made = await a.state.create_entry(entry("/web"))
        asked = [asyncio.create_task(b.follower.catch_up()) for _ in range(10)]
        await asyncio.sleep(0.05)
        go.set()
        await asyncio.gather(under_way, *asked)
        assert made.id in b.state.entries.by_id

    try:
        asyncio.run(scenario())
    finally:
        a.store.close()
        b.store.close()
    assert len(reads) == 2


# -- Sync on servers sharing PostgreSQL -----------------------------------------------------------

# Servers A and B on one PostgreSQL database (B reaches it through a relay; not cut here).
partitioned = test_sync_attack.partitioned


@contextlib.contextmanager
def _a_poll_behind(server: RunningServer) -> Iterator[FeedFollower]:
    """From its next wait on, the server's follower reads the feed no more on its own: its
    wake-ups and safety poll never come, as between two polls."""
    follower = server.server.follower
    assert follower is not None
    store = follower._ds
    waiting, ended = threading.Event(), threading.Event()

    def deaf(after: int, timeout: float) -> bool:
        waiting.set()
        ended.wait(timeout)
        return False

    store.wait_feed = deaf  # type: ignore[method-assign]
    follower.settings = replace(follower.settings, poll_interval=60)
    try:
        assert waiting.wait(10), "the follower never waited on the feed again"
        yield follower
    finally:
        ended.set()


def _first(server: RunningServer, agent: Agent, request: node_pb2.SyncRequest) -> Any:
    stream = server.node_stub(agent).Sync(request, timeout=10)
    try:
        return next(stream)
    finally:
        stream.cancel()


def _revoke_through(server: RunningServer, jti: str) -> None:
    now = int(server.clock.now())
    revoked = Revocation("jwt_id", jti, f"spiffe://{TRUST_DOMAIN}/web", now + 600, "r", now)
    server.call(server.server.state.add_revocations((revoked,)))


def _revoked(update: Any) -> set[str]:
    return {r.value for r in update.revocations}


def test_an_agent_failing_over_to_a_server_a_poll_behind_keeps_the_revocations_it_holds(
    partitioned: Partitioned,
) -> None:
    """A revokes j1 and its agent takes the snapshot saying so; A dies, and the agent's next
    Sync is on B, whose follower has not read the feed row yet (it polls). A snapshot replaces
    what the agent holds: made of B's view as it was, it would make the agent forget a
    revocation of a token still valid. B catches up with the datastore before sending it."""
    a, b = partitioned.a, partitioned.b
    agent = a.attest()
    wait_for(lambda: agent.spiffe_id in b.server.state.agents, 10, "B to learn the agent")
    with _a_poll_behind(b):
        _revoke_through(a, "j1")
        cache = Cache()
        on_a = _first(a, agent, node_pb2.SyncRequest())
        cache.apply_sync(sync_state(on_a))
        assert "j1" in cache.snapshot().revoked_jtis
        assert "j1" not in {r.value for r in b.server.state.revocations}  # a poll behind
        # Failing over, the agent asks B for what came after A's revision: another log's.
        request = node_pb2.SyncRequest(since_revision=on_a.revision, epoch=on_a.epoch)
        on_b = _first(b, agent, request)
        assert on_b.kind == node_pb2.SyncUpdate.SNAPSHOT
        cache.apply_sync(sync_state(on_b))
        assert "j1" in cache.snapshot().revoked_jtis


def test_sync_streams_opening_at_once_on_a_server_a_poll_behind_share_its_catch_ups(
    partitioned: Partitioned,
) -> None:
    """Many agents fail over to B at once: each snapshot holds the revocation B's follower
    had not read, yet the datastore is read by a couple of catch-ups, not one per stream."""
    a, b = partitioned.a, partitioned.b
    agents = [a.attest() for _ in range(12)]
    wait_for(
        lambda: all(x.spiffe_id in b.server.state.agents for x in agents), 10, "B to learn them"
    )
    with _a_poll_behind(b) as follower:
        _revoke_through(a, "j1")
        reads: list[int] = []
        reading, go = threading.Event(), threading.Event()
        real_page = follower._page

        def held_page(cursor: int) -> tuple[int, list[FeedItem]]:
            reads.append(cursor)
            if len(reads) == 1:  # the first read waits for the other streams to come
                reading.set()
                go.wait(10)
            return real_page(cursor)

        follower._page = held_page  # type: ignore[method-assign]
        streams = 2 * len(agents)  # within the streams one agent may hold
        with ThreadPoolExecutor(streams) as pool:
            opening = [
                pool.submit(_first, b, agent, node_pb2.SyncRequest())
                for agent in agents
                for _ in range(2)
            ]
            assert reading.wait(10)
            time.sleep(0.5)
            go.set()
            firsts = [f.result(timeout=20) for f in opening]
    assert all("j1" in _revoked(first) for first in firsts)
    assert len(reads) <= 3, f"{streams} streams opening at once read the feed {len(reads)} times"


def test_a_catch_up_s_wait_for_the_reading_thread_does_not_age_the_view(
    sides: tuple[Side, Side], clock: FakeClock
) -> None:
    """A catch-up queued behind other work (the follower's thread busy, a loaded server)
    read the feed when it got to run: the view is as fresh as that read, not as old as the
    moment the catch-up was asked for. Counting the queueing, a server busy for the
    staleness bound would end its Sync streams though its feed reads succeed."""
    a, b = sides
    released = threading.Event()

    def busy() -> None:
        released.wait(10)
        clock.advance(5.0)  # the time the catch-up queued behind this

    async def scenario() -> None:
        await a.state.create_entry(entry("/web"))
        b.follower._reader.submit(busy)
        catching_up = asyncio.ensure_future(b.follower.catch_up())
        await asyncio.sleep(0.05)
        released.set()
        await catching_up

    asyncio.run(scenario())
    assert len(b.state.entries.by_id) == 1
    assert b.follower.view.age() < 1.0


def test_a_catch_up_s_wait_for_a_feed_connection_does_not_age_the_view(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """On PostgreSQL the follower's reads wait for one of its own connections (all taken
    here, as while one is being made again): the view is dated from when the read had one."""
    store = PostgresDataStore(postgres_dsn, clock)
    follower: FeedFollower | None = None
    try:
        state = ServerState(store, clock, ChangeNotifier())
        state.load()
        follower = FeedFollower(
            datastore=store,
            state=state,
            tasks=Tasks(),
            on_key_slots_changed=lambda: None,
            clock=clock,
            cursor=store.feed_head(),
            view=ViewFreshness(SystemClock(), 30.0),
        )
        pool = store._feed_pool
        taken = [pool.getconn() for _ in range(FEED_CONNECTIONS)]
        given_back = threading.Timer(1.5, lambda: [pool.putconn(c) for c in taken])
        given_back.start()
        started = time.monotonic()
        asyncio.run(follower.catch_up())
        assert time.monotonic() - started >= 1.4  # it did wait for a connection
        assert follower.view.age() < 1.0
    finally:
        if follower is not None:
            follower._reader.shutdown()
        store.close()

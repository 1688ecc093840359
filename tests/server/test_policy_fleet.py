"""PolicyFleet on one host: a real policy directory, engine, and audit log on a real SQLite
file; what another server announces is handed in as the follower would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.audit import AuditLog
from server.datastore.base import DataStore
from server.datastore.records import PolicyAnnouncement
from server.datastore.sqlite import SqliteDataStore
from server.policy import PolicyEngine
from server.policy.fleet import PolicyFleet
from server.replication import plan
from svid._clock import FakeClock
from tests.e2e.test_tasks_server import POLICY
from tests.server.test_replication import Side

TD = "example.org"


def test_an_announcement_read_during_a_local_reload_is_not_cleared_by_it(
    tmp_path: Path,
) -> None:
    """Another server announced its set just after this one's: the follower reported the
    difference, and the local reload, finishing last, cleared the report (diverged None while
    the fleet's newest set was another)."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "work.cedar").write_text(POLICY)
    clock = FakeClock(1_800_000_000.0)
    store = SqliteDataStore(tmp_path / "db", clock)
    engine = PolicyEngine(tmp_path / "policies", clock, trust_domain=TD)
    follower: list[threading.Thread] = []

    def announce(policy_set_hash: str) -> None:
        store.announce_policy(policy_set_hash)
        # The other server's announcement, read by this one's follower meanwhile.
        store.announce_policy("other")
        thread = threading.Thread(target=fleet.on_announced, args=(store.announced_policy(),))
        thread.start()
        follower.append(thread)
        thread.join(1)  # done at once unless the reload holds it back

    fleet = PolicyFleet(engine, AuditLog(store, clock), announce, store.announced_policy)
    try:
        info = fleet.reload_here()
        follower[0].join()
        assert fleet.announced == "other"
        assert store.announced_policy() == (2, "other", int(clock.now()))
        assert fleet.diverged is not None
        assert "other" in fleet.diverged
        assert info.hash in fleet.diverged
    finally:
        store.close()


def test_a_reload_the_fleet_asked_for_says_so_in_the_audit_log(tmp_path: Path) -> None:
    """The record of a reload an announcement ran was an operator's, word for word: the log
    said neither why it ran nor which set the fleet asked for (its own directory's loaded)."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "work.cedar").write_text(POLICY)
    clock = FakeClock(1_800_000_000.0)
    store = SqliteDataStore(tmp_path / "db", clock)
    engine = PolicyEngine(tmp_path / "policies", clock, trust_domain=TD)
    fleet = PolicyFleet(
        engine, AuditLog(store, clock), store.announce_policy, store.announced_policy
    )
    try:
        (tmp_path / "policies" / "work.cedar").write_text(POLICY + "\n")
        store.announce_policy("other")
        fleet.on_announced(PolicyAnnouncement(1, "other", int(clock.now())))
        fleet.reload_here()
        rows = [r for r in store.audit_rows() if r["kind"] == "policy_reload"]
        assert [json.loads(r["extra"]).get("announced_hash") for r in rows] == ["other", None]
        assert rows[0]["policy_set_hash"] == engine.policy_set_hash
    finally:
        store.close()


# -- two reloads within a second, on each backend --------------------------------------------

# Only "read" now: another set than POLICY.
READ_ONLY = POLICY.replace('[Action::"read", Action::"write"]', '[Action::"read"]')


class Host:
    """One server's policy side on the shared store: its directory, engine, ledger, fleet."""

    def __init__(self, root: Path, store: DataStore, clock: FakeClock, text: str = POLICY) -> None:
        self.dir = root / "policies"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write(text)
        self.store = store
        self.engine = PolicyEngine(self.dir, clock, trust_domain=TD)
        self.fleet = PolicyFleet(
            self.engine, AuditLog(store, clock), store.announce_policy, store.announced_policy
        )
        self.cursor = store.feed_head()

    def write(self, text: str) -> None:
        (self.dir / "work.cedar").write_text(text)

    def read_feed(self) -> PolicyAnnouncement | None:
        """What this server's follower takes from its next page of the feed (plan)."""
        items = self.store.feed_since(self.cursor, 1000)
        if items:
            self.cursor = items[-1].revision
        return plan(items).policy

    def reloads_asked(self) -> list[str]:
        """The announced hashes of the fleet's reloads this server recorded."""
        rows = [r for r in self.store.audit_rows() if r["kind"] == "policy_reload"]
        extras = [json.loads(r["extra"]) for r in rows]
        return [e["announced_hash"] for e in extras if "announced_hash" in e]


@pytest.fixture
def store_clock() -> FakeClock:
    """The clock `shared` stamps its feed rows with."""
    return FakeClock(1_800_000_000.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared(
    request: pytest.FixtureRequest, tmp_path: Path, store_clock: FakeClock
) -> Iterator[DataStore]:
    """One datastore of either backend (the servers below share it)."""
    clock = store_clock
    if request.param == "sqlite":
        store: DataStore = SqliteDataStore(tmp_path / "db", clock)
    else:
        from server.datastore.postgres import PostgresDataStore

        store = PostgresDataStore(request.getfixturevalue("postgres_dsn"), clock)
    try:
        yield store
    finally:
        store.close()


def test_an_older_announcement_read_after_a_newer_one_served_here_reloads_nothing(
    shared: DataStore, tmp_path: Path
) -> None:
    """Two reloads on one server within a second: its follower read the first's announcement
    after the second served, reloaded once more (a record naming the first's hash) and
    reported the set diverged until the second's was read."""
    a = Host(tmp_path / "a", shared, FakeClock(1_800_000_000.0))
    a.write(READ_ONLY)
    a.fleet.reload_here()
    first = a.read_feed()
    assert first is not None
    a.write(READ_ONLY + "\n")
    second = a.fleet.reload_here()
    a.fleet.on_announced(first)  # handed over after the second served
    assert a.fleet.diverged is None
    assert a.engine.policy_set_hash == second.hash
    assert a.reloads_asked() == []
    newer = a.read_feed()
    assert newer is not None
    assert newer.policy_set_hash == second.hash
    a.fleet.on_announced(newer)
    assert a.fleet.diverged is None
    assert a.reloads_asked() == []


def test_another_server_never_reloads_to_an_announcement_a_newer_one_followed(
    shared: DataStore, tmp_path: Path
) -> None:
    """B read the first of A's two reloads, then both hosts were deployed to and A reloaded
    again: B reloaded for the first, loaded the second's set, and reported it diverged from
    the first until it read the second."""
    clock = FakeClock(1_800_000_000.0)
    a, b = Host(tmp_path / "a", shared, clock), Host(tmp_path / "b", shared, clock)
    for host in (a, b):
        host.write(READ_ONLY)
    a.fleet.reload_here()
    first = b.read_feed()
    assert first is not None
    for host in (a, b):
        host.write(READ_ONLY + "\n")
    second = a.fleet.reload_here()
    b.fleet.on_announced(first)
    assert b.fleet.diverged is None
    assert b.reloads_asked() == []  # not to the older one
    newer = b.read_feed()
    assert newer is not None
    b.fleet.on_announced(newer)
    assert b.fleet.diverged is None
    assert b.engine.policy_set_hash == second.hash
    assert b.reloads_asked() == [second.hash]


def test_a_reload_announced_while_another_server_reloaded_is_not_reported_against_the_older(
    shared: DataStore, tmp_path: Path
) -> None:
    """A's second reload landed while B reloaded for its first: B's directory held the second
    set by then, and B reported it diverged from the first until the second was read."""
    clock = FakeClock(1_800_000_000.0)
    a, b = Host(tmp_path / "a", shared, clock), Host(tmp_path / "b", shared, clock)
    a.write(READ_ONLY)
    a.fleet.reload_here()
    first = b.read_feed()
    assert first is not None
    looks: list[PolicyAnnouncement | None] = []

    def newest() -> PolicyAnnouncement | None:
        found = shared.announced_policy()
        if not looks:  # B's look before its reload: A deploys and reloads right after
            for host in (a, b):
                host.write(READ_ONLY + "\n")
            a.fleet.reload_here()
        looks.append(found)
        return found

    b.fleet._newest = newest
    b.fleet.on_announced(first)
    assert b.reloads_asked() == [first.policy_set_hash]
    assert b.fleet.diverged is None


# -- a datastore restored from a backup -------------------------------------------------------


def test_a_start_on_a_restored_datastore_holding_an_older_announcement_reports_nothing(
    shared: DataStore, tmp_path: Path
) -> None:
    """The backup held the announcement of a reload the fleet made before a later one (lost
    with everything after the copy): every server started on it reported its set diverged
    from one "loaded by another server" that none serves, until a `policy reload` by hand."""
    clock = FakeClock(1_800_000_000.0)
    a = Host(tmp_path / "a", shared, clock)
    old = a.fleet.reload_here()  # in the backup; the later reload to READ_ONLY is not
    # The hosts, deployed with the later set.
    b = Host(tmp_path / "b", shared, clock, text=READ_ONLY)
    b.fleet.restored(shared.announced_policy())  # started with --restored-datastore
    assert b.fleet.diverged is None
    newest = shared.announced_policy()
    assert newest is not None
    assert newest.policy_set_hash == b.engine.policy_set_hash != old.hash
    # The next server started (without the flag) compares with it: nothing differs.
    c = Host(tmp_path / "c", shared, clock, text=READ_ONLY)
    c.fleet.started(shared.announced_policy())
    assert c.fleet.diverged is None
    # A running server followed it: the same set serves, nothing is reloaded.
    a.write(READ_ONLY)
    a.fleet.on_announced(newest)
    assert a.fleet.diverged is None
    assert a.engine.policy_set_hash == newest.policy_set_hash


def _following(side: Side, host: Host) -> Callable[[], None]:
    """Hands what `side`'s follower reads of the policy feed to `host`'s fleet; returns a call
    that follows the feed to its end and waits for what it announced to settle."""
    side.follower._on_policy_announced = host.fleet.on_announced
    side.follower._on_feed_restored = host.fleet.restored

    async def follow() -> None:
        await side.follower.catch_up()
        await side.follower.policy_settled()

    return lambda: asyncio.run(follow())


def test_a_datastore_restored_under_a_running_server_gets_the_fleets_set_announced_again(
    tmp_path: Path,
) -> None:
    """The feed went back under a running server's follower (its SQLite file restored from
    a copy): the restored announcement, older than the one it followed, was handed over as
    new; the server reloaded for it (a record naming the old hash) and reported its set
    diverged. The set it followed is announced again instead."""
    clock = FakeClock(1_800_000_000.0)
    side = Side(tmp_path / "db", clock)
    host = Host(tmp_path / "b", side.store, clock)
    follow = _following(side, host)
    try:
        host.fleet.reload_here()
        follow()
        with contextlib.closing(sqlite3.connect(tmp_path / "copy")) as copy:
            with contextlib.closing(sqlite3.connect(tmp_path / "db")) as live:
                live.backup(copy)
            host.write(READ_ONLY)
            later = host.fleet.reload_here()  # lost with the restore
            follow()
            with contextlib.closing(sqlite3.connect(tmp_path / "db")) as live:
                copy.backup(live)  # the restore
        follow()
        assert side.follower.full_reloads == 1
        assert host.fleet.diverged is None
        assert host.reloads_asked() == []
        newest = side.store.announced_policy()
        assert newest is not None
        assert newest.policy_set_hash == later.hash
    finally:
        side.store.close()


# Only "write": a third set.
WRITE_ONLY = POLICY.replace('[Action::"read", Action::"write"]', '[Action::"write"]')


def test_a_start_on_a_restored_datastore_does_not_announce_over_a_set_announced_since(
    shared: DataStore, store_clock: FakeClock, tmp_path: Path
) -> None:
    """Every server of the fleet starts on a restored datastore told so (each data_dir holds
    the checkpoint it lacks), each announcing its own directory's set over the newest: the
    last one started won. A host whose directory was left stale, started last, made its old
    set the fleet's: it served it with nothing diverged, and every other server reported
    the difference. An announcement made since the restore is compared with instead."""
    clock = FakeClock(1_800_000_000.0)
    Host(tmp_path / "old", shared, clock).fleet.reload_here()  # in the backup
    signed = store_clock.now() + 10  # the checkpoint the backup lacks
    store_clock.advance(600)  # the restore
    first = Host(tmp_path / "a", shared, clock, text=READ_ONLY)
    first.fleet.restored(shared.announced_policy(), backup_before=signed)
    store_clock.advance(5)
    stale = Host(tmp_path / "c", shared, clock, text=WRITE_ONLY)
    stale.fleet.restored(shared.announced_policy(), backup_before=signed)
    newest = shared.announced_policy()
    assert newest is not None
    assert newest.policy_set_hash == first.engine.policy_set_hash
    assert stale.fleet.diverged is not None
    # The backup's own announcement is still announced over, as before.
    assert first.fleet.diverged is None


def test_a_reload_made_on_the_restored_datastore_is_followed_not_announced_over(
    tmp_path: Path,
) -> None:
    """The datastore was restored under a running server, and an operator reloaded another
    server with a new set before this one's follower saw the feed go back. The follower took
    that announcement for the backup's and announced the set it had followed before the
    restore over it: this server never reloaded (its directory held the new set) and served
    the old one with nothing diverged, and every other server was told the old set again."""
    clock = FakeClock(1_800_000_000.0)
    side = Side(tmp_path / "db", clock)
    host = Host(tmp_path / "a", side.store, clock, text=READ_ONLY)
    follow = _following(side, host)
    try:
        with contextlib.closing(sqlite3.connect(tmp_path / "copy")) as copy:
            with contextlib.closing(sqlite3.connect(tmp_path / "db")) as live:
                live.backup(copy)
            # Reloads on another server, followed here, lost with the restore.
            gone = Host(tmp_path / "gone", side.store, clock, text=READ_ONLY)
            for _ in range(3):
                gone.fleet.reload_here()
            follow()
            assert host.fleet.announced == host.engine.policy_set_hash
            with contextlib.closing(sqlite3.connect(tmp_path / "db")) as live:
                copy.backup(live)  # the restore
        # The operator, on another server, deploys a new set to every host and reloads it.
        host.write(WRITE_ONLY)
        other = Host(tmp_path / "b", side.store, clock, text=WRITE_ONLY)
        fresh = other.fleet.reload_here()
        follow()
        assert side.follower.full_reloads == 1
        assert host.engine.policy_set_hash == fresh.hash
        assert host.fleet.diverged is None
        newest = side.store.announced_policy()
        assert newest is not None
        assert newest.policy_set_hash == fresh.hash
    finally:
        side.store.close()

"""The PostgreSQL datastore where it differs from SQLite: several processes' connections racing
on one database, connections dying under it, migrations of servers starting together, and a
DSN's password kept out of every message. (What both backends share is the contract:
test_datastore_contract.py.) Each test gets a fresh schema on a real server (tests/postgres.py).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from server.datastore import (
    AlreadyExistsError,
    AttestedAgent,
    Credential,
    Entry,
    JoinToken,
    Revocation,
    Selector,
    StorageError,
)
from server.datastore import ledger_queries as lq
from server.datastore import postgres as postgres_module
from server.datastore import postgres_sql as ps
from server.datastore import queries as q
from server.datastore.base import JtiClaim
from server.datastore.errors import (
    AgentRemovedError,
    JtiHeldError,
    TaskEndedMeanwhileError,
    UnreachableError,
)
from server.datastore.ledger_queries import audit_page
from server.datastore.migrations import MIGRATIONS, Migration, postgres_ddl, postgres_migrations
from server.datastore.postgres import AnsweredConnection, PostgresDataStore, connection_options
from server.datastore.postgres_dsn import redact_dsn, scrub
from server.datastore.postgres_sql import pg
from server.datastore.records import (
    AUDIT_COLUMNS,
    REMOVAL_BANNED,
    REMOVAL_EVICTED,
    EventFilter,
    Head,
    Removal,
    TokenUse,
)
from server.datastore.sqlite_ledger import _task_params
from svid._clock import FakeClock
from tests import postgres
from tests.server.tcp_cut import CuttableRelay, upstream_of
from tests.server.test_datastore_contract import (
    MIGRATION_17_SEQUENCES,
    MIGRATION_21_TASK_BODIES,
    assert_migration_17_sequences_carried_over,
    assert_migration_22_announcement_carried_over,
    assert_migration_22_parents_carried_over,
    audit_rows,
    task,
)
from tests.waits import wait_for

psycopg = pytest.importorskip("psycopg")

NOW = 1_700_000_000
AGENT = "spiffe://example.org/svid/agent/join_token/t1"
HASH = b"h" * 32
T = TypeVar("T")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def stores(postgres_dsn: str, clock: FakeClock) -> Iterator[list[PostgresDataStore]]:
    """Four stores on one database, each with its own pool: four servers, as PostgreSQL
    sees them."""
    opened = [PostgresDataStore(postgres_dsn, clock) for _ in range(4)]
    yield opened
    for store in opened:
        store.close()


def race(callers: list[Callable[[], T]]) -> list[T | BaseException]:
    """Run every caller at once on its own thread (released together); results in order."""
    barrier = threading.Barrier(len(callers))
    results: list[T | BaseException] = [RuntimeError("did not run")] * len(callers)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = callers[i]()
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(callers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def entry(path: str, uid: int = 1000) -> Entry:
    return Entry("", f"spiffe://example.org{path}", AGENT, (Selector("unix", f"uid:{uid}"),))


# -- races across servers -----------------------------------------------------------------------


def test_a_join_token_admits_exactly_one_of_many_servers(
    stores: list[PostgresDataStore],
) -> None:
    for n in range(10):
        stores[0].create_join_token(JoinToken(f"race-{n}", HASH, NOW + 600))
        callers = [
            (
                lambda s=s, k=k, n=n: s.admit_agent(
                    AttestedAgent(f"{AGENT}-{k}", "join_token", str(k), NOW + 3600),
                    TokenUse(f"race-{n}", HASH),
                    NOW,
                )
            )
            for k, s in enumerate(stores * 2)
        ]
        results = race(callers)
        assert results.count(True) == 1, results
        assert results.count(False) == len(callers) - 1, results
        winner = results.index(True)
        agents = stores[1].list_agents()
        assert [a.serial for a in agents if a.spiffe_id.endswith(f"-{winner}")] == [str(winner)]
        for a in agents:  # only winners were ever saved
            stores[0].delete_agent(a.spiffe_id)


def test_concurrent_creates_of_one_entry_store_it_once(stores: list[PostgresDataStore]) -> None:
    for n in range(10):
        same = entry(f"/same/{n}")
        results = race([lambda s=s, e=same: s.create_entry(e) for s in stores * 2])
        made = [r for r in results if isinstance(r, Entry)]
        assert len(made) == 1, results
        refused = [r for r in results if not isinstance(r, Entry)]
        assert all(isinstance(r, AlreadyExistsError) for r in refused), refused
        assert all(f"(id {made[0].id})" in str(r) for r in refused)
    assert len(stores[2].list_entries()) == 10


def test_concurrent_batches_over_the_same_entries_each_get_an_answer_per_item(
    stores: list[PostgresDataStore],
) -> None:
    """Batches inserting one set of identities in opposite orders wait on each other's keys
    (a deadlock PostgreSQL breaks by failing one): every item is stored exactly once and every
    caller gets per-item results."""
    items = [entry(f"/batch/{n}") for n in range(30)]
    batches = [items if k % 2 else items[::-1] for k in range(len(stores))]
    results = race(
        [lambda s=s, b=b: s.create_entries(b) for s, b in zip(stores, batches, strict=True)]
    )
    for r in results:
        assert isinstance(r, list), r
    stored = stores[0].list_entries()
    assert sorted(e.spiffe_id for e in stored) == sorted(e.spiffe_id for e in items)
    won = [e for r in results if isinstance(r, list) for e in r if isinstance(e, Entry)]
    assert sorted(e.id for e in won) == sorted(e.id for e in stored)


def test_a_concurrent_update_with_a_stale_revision_conflicts(
    stores: list[PostgresDataStore],
) -> None:
    made = stores[0].create_entry(entry("/web"))
    results = race(
        [lambda s=s, k=k: s.update_entry(replace(made, hint=f"h{k}")) for k, s in enumerate(stores)]
    )
    assert sum(isinstance(r, Entry) for r in results) == 1, results
    assert stores[0].get_entry(made.id).revision == 2


def test_revisions_are_monotonic_and_no_write_is_lost_across_servers(
    stores: list[PostgresDataStore],
) -> None:
    # The credentials' agent: a ledger write refuses those of an agent not admitted.
    stores[0].upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    start = stores[0].revision()
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(stores[3].revision())

    def write(k: int) -> int:
        store = stores[k % 3]
        for i in range(15):
            store.create_entry(entry(f"/w/{k}/{i}"))
            store.write_ledger(
                [Credential("jwt_id", f"{k}-{i}", AGENT, "spiffe://x/y", "", NOW + 60)], []
            )
            store.next_bundle_sequence()
        return k

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = race([lambda k=k: write(k) for k in range(6)])
    finally:
        stop.set()
        watcher.join()
    assert results == list(range(6))
    assert seen == sorted(seen), "a reader saw the revision go back"
    assert stores[0].revision() == start + 6 * 15 * 2  # entry + bundle, each bumps once
    assert stores[1].bundle_sequence() == 6 * 15
    assert len(stores[2].list_entries()) == 6 * 15
    assert len(stores[3].agent_credentials(AGENT, NOW)) == 6 * 15


def test_entry_writes_queued_behind_another_servers_hold_one_connection_and_none_fails(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """Another server's entry write holds the turn (LOCK_ENTRIES) past the pool's wait for a
    connection. This server's entry writes wait for it holding one pooled connection between
    them: none is refused UNAVAILABLE for want of a connection on a healthy database, and the
    server's other calls are served meanwhile. Each had taken a connection to wait in
    PostgreSQL, a burst of them every one: the pool's later takers, writes or not, failed."""
    app = f"svidd-test-entries-{secrets.token_hex(4)}"
    pool_wait = 2.0
    store = PostgresDataStore(
        f"{postgres_dsn}&application_name={app}", clock, max_connections=2, timeout=pool_wait
    )
    queued = [entry(f"/queued/{n}", 1000 + n) for n in range(4)]
    outcomes: list[BaseException | None] = [None] * len(queued)

    def write(n: int) -> None:
        try:
            store.create_entry(queued[n])
        except Exception as e:
            outcomes[n] = e

    writers = [threading.Thread(target=write, args=(n,)) for n in range(len(queued))]
    try:
        before = store.revision()
        with psycopg.connect(postgres_dsn) as other:
            other.execute(ps.LOCK_ENTRIES)  # another server's write, not yet committed
            for writer in writers:
                writer.start()
            _wait_for_a_lock_wait(postgres_dsn, app, "no entry write waited for the turn")
            time.sleep(pool_wait + 0.5)  # a write waiting for a connection has given up
            assert store.revision() == before  # a call served meanwhile
            assert outcomes == [None] * len(queued)
            other.commit()
            for writer in writers:
                writer.join(30)
        assert outcomes == [None] * len(queued)
        stored = {e.spiffe_id for e in store.list_entries()}
        assert stored == {e.spiffe_id for e in queued}
        assert store.revision() == before + len(queued)
    finally:
        store.close()


def test_a_jti_is_accepted_by_exactly_one_of_many_servers(
    stores: list[PostgresDataStore],
) -> None:
    """Replayed assertions racing to several servers: each (issuer, jti) is claimed once, even
    by batches that meet the same jtis in opposite orders."""
    claims = [JtiClaim("spiffe://example.org", f"jti-{n}", NOW + 60) for n in range(40)]
    batches = [claims if k % 2 else claims[::-1] for k in range(len(stores) * 2)]
    results = race(
        [lambda s=s, b=b: s.claim_jtis(b, NOW) for s, b in zip(stores * 2, batches, strict=True)]
    )
    won: dict[str, int] = {}
    for batch, result in zip(batches, results, strict=True):
        assert isinstance(result, list), result
        for claim, granted in zip(batch, result, strict=True):
            won[claim.jti] = won.get(claim.jti, 0) + granted
    assert won == {c.jti: 1 for c in claims}


def test_a_jti_in_ledger_writes_racing_to_many_servers_is_kept_by_exactly_one(
    stores: list[PostgresDataStore],
) -> None:
    """The token endpoint's commit (a token's record with its assertion's claim) through
    several servers at once, batches meeting the jtis in opposite orders: one write keeps its
    record and every claim, each other one is refused whole (JtiHeldError) and keeps nothing."""
    claims = [JtiClaim("spiffe://example.org", f"jti-{n}", NOW + 60) for n in range(40)]
    batches = [claims if k % 2 else claims[::-1] for k in range(len(stores) * 2)]
    writers = zip(stores * 2, batches, strict=True)
    results = race(
        [
            lambda s=s, b=b, k=k: s.write_ledger(
                [Credential("jwt_id", f"token-{k}", "", "spiffe://example.org/w", "", NOW + 60)],
                [],
                b,
                NOW,
            )
            for k, (s, b) in enumerate(writers)
        ]
    )
    assert sum(r is None for r in results) == 1, results
    assert all(r is None or isinstance(r, JtiHeldError) for r in results), results
    kept = stores[0]._tuples("count tokens", "SELECT count(*) FROM credentials", {})
    assert kept == [(1,)]
    assert stores[1].claim_jtis(claims, NOW) == [False] * len(claims)


# -- migrations ---------------------------------------------------------------------------------


def test_servers_starting_together_migrate_once(postgres_dsn: str, clock: FakeClock) -> None:
    results = race([lambda: PostgresDataStore(postgres_dsn, clock) for _ in range(4)])
    try:
        for r in results:
            assert isinstance(r, PostgresDataStore), r
        versions = [m.version for m in MIGRATIONS]
        assert all(r.schema_versions() == versions for r in results)  # type: ignore[union-attr]
        assert results[0].migrate() == []  # type: ignore[union-attr]
    finally:
        for r in results:
            if isinstance(r, PostgresDataStore):
                r.close()


def test_a_migration_appended_to_the_shared_list_applies_to_postgres(
    postgres_dsn: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One list: a new migration written with SQLite's words runs translated, with no second
    copy; the store opened before it gains it on the next start."""
    PostgresDataStore(postgres_dsn, clock).close()

    def blobs(execute: Callable[[str], object]) -> None:
        execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")

    monkeypatch.setattr(postgres_module, "MIGRATIONS", (*MIGRATIONS, Migration(99, "blobs", blobs)))
    store = PostgresDataStore(postgres_dsn, clock)
    try:
        assert store.schema_versions()[-1] == 99
    finally:
        store.close()
    with psycopg.connect(postgres_dsn) as conn:
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'blobs'"
            ).fetchall()
        )
    assert types == {"id": "bigint", "body": "bytea"}


def test_a_datastore_a_newer_server_migrated_is_refused(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """As on SQLite: a schema newer than this server's is not opened."""
    PostgresDataStore(postgres_dsn, clock).close()
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'n', 1)"
        )
    with pytest.raises(StorageError, match="version 999, newer than this server's"):
        PostgresDataStore(postgres_dsn, clock)


def _latest_version(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    assert row is not None
    return int(row[0])


def test_a_store_that_does_not_migrate_refuses_an_older_schema_naming_both_versions(
    postgres_dsn: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on SQLite: the previous release's servers may run on it; nothing moves."""
    previous = MIGRATIONS[-2].version
    with monkeypatch.context() as m:
        m.setattr(postgres_module, "MIGRATIONS", MIGRATIONS[:-1])
        PostgresDataStore(postgres_dsn, clock).close()
    latest = MIGRATIONS[-1].version
    with pytest.raises(StorageError) as raised:
        PostgresDataStore(postgres_dsn, clock, migrate=False)
    said = str(raised.value)
    assert f"version {previous}, older than this release's ({latest})" in said
    assert "upgrade every server sharing the datastore first" in said
    assert _latest_version(postgres_dsn) == previous
    store = PostgresDataStore(postgres_dsn, clock, migrate=False, oldest_schema=previous)
    try:
        assert store.schema_versions()[-1] == previous
        assert store.list_entries() == []
    finally:
        store.close()
    assert _latest_version(postgres_dsn) == previous


def test_a_store_that_does_not_migrate_refuses_a_newer_schema(
    postgres_dsn: str, clock: FakeClock
) -> None:
    PostgresDataStore(postgres_dsn, clock).close()
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'n', 1)"
        )
    with pytest.raises(StorageError, match="version 999, newer than this server's"):
        PostgresDataStore(postgres_dsn, clock, migrate=False, oldest_schema=1)


def test_a_store_that_does_not_migrate_creates_nothing_and_writes_nothing(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """An empty schema stays empty (no schema_migrations table made); on a migrated one,
    every transaction is READ ONLY, so a write some read path would make fails."""
    with pytest.raises(StorageError, match="holds no svidd schema"):
        PostgresDataStore(postgres_dsn, clock, migrate=False)
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute(ps.TABLES_IN_SCHEMA).fetchall() == []
    PostgresDataStore(postgres_dsn, clock).close()
    store = PostgresDataStore(postgres_dsn, clock, migrate=False)
    try:
        with pytest.raises(StorageError, match="read-only transaction"):
            store.create_entry(entry("/web"))
        assert store.list_entries() == []
    finally:
        store.close()


def test_foreign_bundle_sequences_stored_under_migration_17_read_back_and_order(
    postgres_dsn: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 18 shifts the sequences 17 stored as they were (a uint64 in a signed BIGINT):
    each reads back as written and still orders the next write."""
    with monkeypatch.context() as m:
        m.setattr(postgres_module, "MIGRATIONS", MIGRATIONS[:17])
        PostgresDataStore(postgres_dsn, clock).close()
    with psycopg.connect(postgres_dsn) as conn:
        for td, sequence in MIGRATION_17_SEQUENCES.items():
            conn.execute(
                "INSERT INTO foreign_bundles (trust_domain, bundle, updated_at, spiffe_sequence) "
                "VALUES (%s, %s, 5, %s)",
                (td, b"{}", sequence),
            )
    store = PostgresDataStore(postgres_dsn, clock)
    try:
        assert_migration_17_sequences_carried_over(store)
    finally:
        store.close()


def _pg_plan(dsn: str, sql: str, params: dict[str, object] | None = None) -> str:
    """PostgreSQL's plan for `sql` (written as for SQLite), its lines joined, sequential scans
    off: on the tiny tables of a test the planner would rightly prefer one."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        return " ".join(row[0] for row in conn.execute(f"EXPLAIN {pg(sql)}", params))


def test_the_revocation_events_of_a_node_are_read_by_index(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """Migration 12's partial index serves the node's revocation lookup on PostgreSQL too
    (sequential scans off: on a tiny table the planner would rightly prefer one)."""
    PostgresDataStore(postgres_dsn, clock).close()
    sql, params = audit_page(EventFilter(kind="revocation", node_id="spiffe://example.org/n"))
    plan = _pg_plan(postgres_dsn, sql, {**params, "after": 0, "limit": 10})
    assert "audit_events_node_revocations" in plan, plan


@pytest.mark.parametrize(
    ("by_spiffe_id", "by_parent", "index"),
    [(True, False, "entries_spiffe_id"), (False, True, "entries_parent_id")],
)
def test_entries_filtered_by_an_id_are_read_by_index(
    postgres_dsn: str, clock: FakeClock, by_spiffe_id: bool, by_parent: bool, index: str
) -> None:
    """An exact SPIFFE ID or parent ID is an index search on PostgreSQL too."""
    PostgresDataStore(postgres_dsn, clock).close()
    sql = q.list_entries(spiffe_id=by_spiffe_id, parent_id=by_parent)
    params = {"spiffe_id": "spiffe://example.org/w", "parent_id": "spiffe://example.org/a"}
    plan = _pg_plan(postgres_dsn, sql, params)
    assert index in plan, plan


def test_a_workload_jwt_is_read_by_index(postgres_dsn: str, clock: FakeClock) -> None:
    """Migration 21's partial index serves the JWT-bearer grant's lookup on PostgreSQL too."""
    from server.datastore.ledger_queries import WORKLOAD_JWT

    PostgresDataStore(postgres_dsn, clock).close()
    params = {"jti": "j", "expires_at": 1, "spiffe_id": "spiffe://example.org/w"}
    plan = _pg_plan(postgres_dsn, WORKLOAD_JWT, params)
    assert "credentials_workload_jwt_by_subject" in plan, plan


def test_a_tasks_sub_tasks_are_read_by_index(postgres_dsn: str, clock: FakeClock) -> None:
    """Migration 22's partial index serves an end's read of its sub-tasks on PostgreSQL too."""
    from server.datastore.ledger_queries import SUB_TASKS

    PostgresDataStore(postgres_dsn, clock).close()
    plan = _pg_plan(postgres_dsn, SUB_TASKS, {"parent_task_id": "t", "state": "active"})
    assert "tasks_parent" in plan, plan


def _assert_newest_announcement_read_by_index(dsn: str) -> None:
    """The plan of a start's read of the newest announcement uses the partial index
    (sequential scans off: on a table this small the planner would pick one anyway)."""
    plan = _pg_plan(dsn, q.NEWEST_POLICY_ANNOUNCEMENT)
    assert "feed_policy" in plan, plan


def test_the_newest_policy_announcement_is_read_by_index(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """Migration 23's partial index serves a start's read of the newest announcement on
    PostgreSQL too: without it, a feed holding none was read whole."""
    PostgresDataStore(postgres_dsn, clock).close()
    _assert_newest_announcement_read_by_index(postgres_dsn)


def test_a_datastore_of_migration_22_reads_its_policy_announcement_by_the_new_index(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """Upgraded from the previous schema: the announcements it holds are indexed too."""
    PostgresDataStore(postgres_dsn, clock).close()
    with psycopg.connect(postgres_dsn) as conn:
        # As a store at migration 22 held them: an announcement, a newer row of another kind.
        conn.execute("DROP INDEX feed_policy")
        conn.execute("DELETE FROM schema_migrations WHERE version = 23")
        conn.execute("UPDATE counters SET value = 2 WHERE name = 'feed'")
        conn.execute("INSERT INTO feed (revision, at, kind, key) VALUES (1, 5, 'policy', 'h1')")
        conn.execute("INSERT INTO feed (revision, at, kind, key) VALUES (2, 5, 'task', 't1')")
    store = PostgresDataStore(postgres_dsn, clock)
    try:
        assert_migration_22_announcement_carried_over(store, clock)
    finally:
        store.close()
    _assert_newest_announcement_read_by_index(postgres_dsn)


def test_tasks_stored_before_migration_22_are_found_by_their_parent(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """The PostgreSQL migration copies a stored sub-task's parent out of its body."""
    PostgresDataStore(postgres_dsn, clock).close()
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("DROP INDEX tasks_parent")
        conn.execute("ALTER TABLE tasks DROP COLUMN parent_task_id")
        conn.execute("DELETE FROM schema_migrations WHERE version = 22")
        conn.cursor().executemany(
            "INSERT INTO tasks (task_id, agent_id, runtime_id, state, expires_at, "
            "created_at, body) VALUES (%s, 'a', 'r', 'active', 9, 1, %s)",
            MIGRATION_21_TASK_BODIES,
        )
    store = PostgresDataStore(postgres_dsn, clock)
    try:
        assert_migration_22_parents_carried_over(store)
    finally:
        store.close()


def test_an_agents_credentials_are_read_by_index(postgres_dsn: str, clock: FakeClock) -> None:
    """Its own credentials and, by migration 15's partial index, the delegated tokens its
    workloads act with, and by migration 19's, the tokens derived from those."""
    from server.datastore.ledger_queries import AGENT_CREDENTIALS

    PostgresDataStore(postgres_dsn, clock).close()
    plan = _pg_plan(postgres_dsn, AGENT_CREDENTIALS, {"agent_id": "a", "needed_from": 1})
    assert "credentials_agent" in plan, plan
    assert "credentials_actor_agent" in plan, plan
    assert "credentials_derived_from" in plan, plan


def test_the_translation_changes_only_sqlites_words() -> None:
    assert postgres_ddl("seq INTEGER PRIMARY KEY, b blob, blobs TEXT") == (
        "seq BIGINT PRIMARY KEY, b BYTEA, blobs TEXT"
    )
    statements: list[str] = []
    for m in postgres_migrations():
        m.apply(statements.append)
    assert not [s for s in statements if "BLOB" in s.upper() or "INTEGER PRIMARY" in s]
    override: list[str] = []
    (only,) = postgres_migrations(MIGRATIONS[:1], {1: lambda execute: override.append("x")})
    only.apply(statements.append)
    assert override == ["x"]


# -- connections --------------------------------------------------------------------------------


def _backends(dsn_app: str) -> int:
    with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (dsn_app,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _terminate(dsn_app: str) -> int:
    with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (dsn_app,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_call_on_a_dead_connection_fails_and_the_next_one_gets_a_fresh_one(
    postgres_dsn: str, clock: FakeClock
) -> None:
    app = f"svidd-test-victim-{secrets.token_hex(4)}"
    store = PostgresDataStore(f"{postgres_dsn}&application_name={app}", clock, min_connections=3)
    try:
        store.create_entry(entry("/before"))
        # The pool opens its connections in the background: kill them once all three are up.
        wait_for(lambda: _backends(app) >= 3, 30, "the pool's three connections")
        assert _terminate(app) >= 3  # the migration's own connection is long gone
        with pytest.raises(StorageError, match="cannot list entries"):
            store.list_entries()
        # Every other pooled connection died too: none of them may fail the next calls.
        assert [e.spiffe_id for e in store.list_entries()] == ["spiffe://example.org/before"]
        store.create_entry(entry("/after"))
        assert len(store.list_entries()) == 2
    finally:
        store.close()


def test_a_closed_store_refuses_calls(postgres_dsn: str, clock: FakeClock) -> None:
    store = PostgresDataStore(postgres_dsn, clock)
    store.close()
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.list_entries()


# -- the password -------------------------------------------------------------------------------

SECRET = "Sup3r-Secret-pw"


def test_an_unreachable_database_is_named_without_the_password(clock: FakeClock) -> None:
    dsn = f"postgresql://svidd:{SECRET}@127.0.0.1:1/svidd"
    with pytest.raises(StorageError) as caught:
        PostgresDataStore(dsn, clock, timeout=2)
    message = str(caught.value)
    assert "postgresql://svidd:***@127.0.0.1:1/svidd" in message
    assert SECRET not in message
    assert caught.value.__cause__ is None  # the driver's exception is not chained either


def test_redaction_covers_every_place_a_password_can_sit() -> None:
    for dsn in (
        f"postgresql://u:{SECRET}@h/db",
        f"postgres://u:{SECRET.replace('-', '%2D')}@h:5432/db?sslmode=require",
        f"postgresql://u@h/db?password={SECRET}&connect_timeout=3",
    ):
        shown = redact_dsn(dsn)
        assert SECRET not in shown
        assert "***" in shown
        assert SECRET not in scrub(f"failed for {dsn}: password={SECRET} ({SECRET})", dsn)
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_dsn(f"host=h password='{SECRET} x' dbname=d") == "host=h password=*** dbname=d"


def test_a_url_libpq_cannot_read_is_refused_without_its_password(clock: FakeClock) -> None:
    # libpq's own complaint about "%zz" quotes the password: the store names the URL redacted.
    dsn = f"postgresql://svidd:{SECRET}%zz@127.0.0.1:1/svidd"
    with pytest.raises(StorageError, match="not a valid PostgreSQL URL") as caught:
        PostgresDataStore(dsn, clock, timeout=2)
    assert SECRET not in str(caught.value)
    assert "postgresql://svidd:***@127.0.0.1:1/svidd" in str(caught.value)


def test_scrub_takes_out_every_spelling_of_the_secrets() -> None:
    dsn = f"postgresql://u@h/db?sslpassword={SECRET[:5]}%2D{SECRET[6:]}&password=a%26b%zz"
    message = f"bad: {SECRET[:5]}%2D{SECRET[6:]} / {SECRET} / a%26b%zz"
    assert scrub(message, dsn) == "bad: *** / *** / ***"
    assert redact_dsn(f"host=h sslpassword={SECRET} dbname=d") == (
        "host=h sslpassword=*** dbname=d"
    )
    # No user part: libpq reads the '@' as the query password's, not as the user part's end.
    for dsn in (
        f"postgresql://h/db?password=a@{SECRET}",
        f"postgresql://h/d?sslpassword=@{SECRET}/x",
    ):
        assert SECRET not in redact_dsn(dsn)
        assert SECRET not in scrub(f"bad: {dsn.partition('=')[2]}", dsn)
    # Other parameters are shown as the URL spells them, '#' and all.
    assert redact_dsn("postgresql://u@h/db?application_name=a%20b#c&password=x#y") == (
        "postgresql://u@h/db?application_name=a%20b#c&password=***"
    )


# -- the audit chain ----------------------------------------------------------------------------


def test_the_audit_chain_verifies_on_postgresql_and_an_edit_is_caught(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """The log's own hashing reads back what PostgreSQL stored (floats, NULLs, JSON text)
    exactly as it wrote it: the chain verifies, through a prune, and an edited row is named."""
    from server.audit.log import AuditLog

    store = PostgresDataStore(postgres_dsn, clock)
    try:
        log = AuditLog(store, clock)
        for n in range(5):
            clock.advance(1.25)
            log.append("task_begin", agent_id=AGENT, task_id=f"t{n}", extra={"n": n, "é": [1]})
        result = log.verify()
        assert result.ok, str(result)
        assert result.checked == 5
        marks = store.audit_marks(0, 10)
        assert store.prune_audit(Head(marks[1].seq, marks[1].hash), clock.now()) == 2
        assert store.prune_audit(Head(marks[0].seq, marks[0].hash), clock.now()) == 0
        assert log.verify().ok
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute("UPDATE audit_events SET task_id = 'forged' WHERE seq = 4")
        broken = log.verify()
        assert not broken.ok
        assert broken.broken_seq == 4, str(broken)
    finally:
        store.close()


def test_a_write_that_deadlocks_runs_again(postgres_dsn: str, clock: FakeClock) -> None:
    """Another server's transaction and a revocation batch meet the same keys in opposite
    orders: PostgreSQL fails the batch for a deadlock (it waited first, and the other waits
    longer before checking), and the batch runs again and lands once the other commits."""
    items = [Revocation("jwt_id", f"j{n:03d}", "spiffe://x/y", NOW, "r", NOW) for n in range(50)]
    app = f"svidd-test-deadlock-{secrets.token_hex(4)}"
    store = PostgresDataStore(f"{postgres_dsn}&application_name={app}", clock)
    insert = "INSERT INTO revocations VALUES ('jwt_id', %s, 's', 1, 'r', 1)"
    try:
        before = store.revision()
        with psycopg.connect(postgres_dsn) as other:
            other.execute("SET deadlock_timeout = '20s'")
            other.execute(insert, ("j049",))  # holds the batch's last key
            outcome: list[BaseException | None] = [None]
            batch = threading.Thread(target=lambda: outcome.__setitem__(0, _call(store, items)))
            batch.start()
            _wait_for_a_lock_wait(postgres_dsn, app)
            other.execute(insert, ("j000",))  # waits on the batch's first key: a cycle
            other.commit()
            batch.join(30)
        assert outcome[0] is None, outcome[0]
        assert [r.value for r in store.list_revocations()] == [i.value for i in items]
        assert store.revision() == before + 1
    finally:
        store.close()


def _call(store: PostgresDataStore, items: list[Revocation]) -> BaseException | None:
    try:
        store.add_revocations(items)
    except Exception as e:
        return e
    return None


def _wait_for_a_lock_wait(
    dsn: str, app: str, why: str = "the batch never waited for the other transaction's key"
) -> None:
    with psycopg.connect(dsn, autocommit=True) as watcher:
        for _ in range(200):
            row = watcher.execute(
                "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) "
                "WHERE NOT granted AND application_name = %s",
                (app,),
            ).fetchone()
            if row is not None and row[0] > 0:
                return
            threading.Event().wait(0.05)
    raise AssertionError(why)


# -- a removal racing a grant ------------------------------------------------------------------


def _store_as(dsn: str, clock: FakeClock, role: str) -> tuple[PostgresDataStore, str]:
    """A store whose connections carry an application name of their own (to see them wait)."""
    app = f"svidd-test-{role}-{secrets.token_hex(4)}"
    return PostgresDataStore(f"{dsn}&application_name={app}", clock), app


def _a_ledger_write_waiting_for(
    postgres_dsn: str,
    clock: FakeClock,
    late: Credential,
    change: Callable[[Any], None],  # a psycopg connection
) -> BaseException | None:
    """What the ledger write of `late` raised, started while `change` (a removal or an end,
    made on its own connection) holds its agent's (or task's) row uncommitted, and asserted
    to wait for its commit; after it, that nothing of the write was kept."""
    store, app = _store_as(postgres_dsn, clock, "ledger")
    try:
        store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
        if late.task_id:
            store.put_task(task(late.task_id, agent=AGENT))
        outcome: list[BaseException | None] = [None]

        def write() -> None:
            try:
                store.write_ledger([late], audit_rows(1, 1))
            except Exception as e:
                outcome[0] = e

        with psycopg.connect(postgres_dsn) as conn:
            change(conn)
            writer = threading.Thread(target=write)
            writer.start()
            _wait_for_a_lock_wait(postgres_dsn, app, "the ledger write did not wait")
            conn.commit()
            writer.join(30)
        if late.task_id:
            assert store.task_credentials(late.task_id, NOW) == []
        else:
            assert store.agent_credentials(AGENT, NOW) == []
        assert store.audit_head() is None
        return outcome[0]
    finally:
        store.close()


@pytest.mark.parametrize("how", ["evicted", "banned"])
def test_a_ledger_write_waits_for_a_removal_under_way_and_then_refuses(
    postgres_dsn: str, clock: FakeClock, how: str
) -> None:
    """The grant was decided before the removal committed; its ledger write comes while the
    removal's transaction holds the agent's row. It waits for it, then keeps nothing: the
    removal reads the agent's credentials right after its commit, before this write could
    have landed."""

    def remove(removal: Any) -> None:
        if how == "evicted":
            removal.execute(pg(q.DELETE_AGENT), {"spiffe_id": AGENT})
        else:
            removal.execute(pg(q.SET_AGENT_BANNED), {"spiffe_id": AGENT, "banned": 1})
        removal.execute(pg(q.UPSERT_REMOVAL), {"agent_id": AGENT, "reason": how, "started_at": NOW})

    late = Credential("jwt_id", "late", AGENT, "spiffe://x/y", "", NOW + 60)
    outcome = _a_ledger_write_waiting_for(postgres_dsn, clock, late, remove)
    assert isinstance(outcome, AgentRemovedError), outcome
    assert outcome.agents == {AGENT}


class _HeldReseal:
    """A reseal that stops the ledger write calling it inside its transaction (its rows
    locked, nothing committed) until `release` is set."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()

    def __call__(self, stored: Head | None) -> list[tuple[object, ...]]:
        self.inside.set()
        self.release.wait(30)
        return audit_rows(1, 1)


def _a_change_waits_for_a_ledger_write(
    postgres_dsn: str,
    clock: FakeClock,
    role: str,
    late: Credential,
    change: Callable[[PostgresDataStore], list[str]],
) -> None:
    """The ledger write of `late` holds its agent's (and task's) rows, stopped in its
    transaction where it seals its events again on another server's head, when `change` (a
    removal or an end, on the `role` store) comes: the change waits for the write's commit,
    so its read of what to revoke (what `change` returns), right after its own commit, lists
    the credential."""
    ledger, _ = _store_as(postgres_dsn, clock, "ledger")
    changer, changer_app = _store_as(postgres_dsn, clock, role)
    reseal = _HeldReseal()
    found: list[list[str] | BaseException] = []

    def run() -> None:
        try:
            found.append(change(changer))
        except Exception as e:
            found.append(e)

    try:
        ledger.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
        if late.task_id:
            ledger.put_task(task(late.task_id, agent=AGENT))
        # Sealed on a head the (empty) chain is not at: the store calls reseal, mid-write.
        writer = threading.Thread(
            target=ledger.write_ledger, args=([late], audit_rows(5, 1)), kwargs={"reseal": reseal}
        )
        writer.start()
        assert reseal.inside.wait(30)
        changer_thread = threading.Thread(target=run)
        changer_thread.start()
        try:
            _wait_for_a_lock_wait(postgres_dsn, changer_app, f"the {role} did not wait")
        finally:
            reseal.release.set()
            writer.join(30)
            changer_thread.join(30)
        assert found == [["late"]]
        assert ledger.audit_head() == Head(1, f"{1:064x}")
    finally:
        ledger.close()
        changer.close()


def test_a_removal_waits_for_a_ledger_write_under_way_and_then_finds_its_credentials(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """The reverse order: the ledger write holds the agent's row when the eviction comes. The
    delete waits for the write's commit, so the removal's read of what to revoke, right after
    its own commit, lists the credential."""

    def evict(remover: PostgresDataStore) -> list[str]:
        remover.delete_agent(AGENT, Removal(AGENT, REMOVAL_EVICTED, NOW))
        return [c.value for c in remover.agent_credentials(AGENT, NOW)]

    late = Credential("jwt_id", "late", AGENT, "spiffe://x/y", "", NOW + 60)
    _a_change_waits_for_a_ledger_write(postgres_dsn, clock, "removal", late, evict)


# -- a task's end racing a grant ---------------------------------------------------------------


def test_a_ledger_write_waits_for_a_task_end_under_way_and_then_refuses(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """The task JWT was decided before the task's end committed (on another server, say); its
    ledger write comes while the end's transaction holds the task's row. It waits for it,
    then keeps nothing: the end reads the task's credentials right after its commit, before
    this write could have landed."""

    def end(conn: Any) -> None:
        # The end's claim (TaskStore.finish), not committed yet.
        params = {
            **_task_params(task("t1", agent=AGENT, state="ending")),
            "expected_state": "active",
        }
        assert conn.execute(pg(lq.SWAP_TASK), params).rowcount == 1

    late = Credential("jwt_id", "late", AGENT, "spiffe://x/y", "t1", NOW + 60)
    outcome = _a_ledger_write_waiting_for(postgres_dsn, clock, late, end)
    assert isinstance(outcome, TaskEndedMeanwhileError), outcome
    assert outcome.tasks == {"t1"}


def test_a_task_end_waits_for_a_ledger_write_under_way_and_then_finds_its_credentials(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """The reverse order: the ledger write holds the agent's and the task's rows when the end
    comes. The end's claim waits for the write's commit, so its read of what to revoke, right
    after its own commit, lists the credential."""

    def end(ender: PostgresDataStore) -> list[str]:
        assert ender.swap_task(task("t1", agent=AGENT, state="ending"), "active")
        return [c.value for c in ender.task_credentials("t1", NOW)]

    late = Credential("jwt_id", "late", AGENT, "spiffe://x/y", "t1", NOW + 60)
    _a_change_waits_for_a_ledger_write(postgres_dsn, clock, "end", late, end)


def test_ledger_writes_and_ends_of_several_tasks_at_once_never_deadlock(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """Writes holding credentials of several tasks and agents (their rows locked in one order)
    while those tasks end and the agents' other writes go on: every call returns, each write
    either whole or refused, and every credential on record of an ended task is found by
    the read its end makes after its claim."""
    stores = [PostgresDataStore(postgres_dsn, clock) for _ in range(3)]
    other = "spiffe://example.org/svid/agent/join_token/t2"
    tasks = [f"t{n}" for n in range(6)]
    try:
        for agent in (AGENT, other):
            stores[0].upsert_agent(AttestedAgent(agent, "join_token", "1", NOW + 3600))
        for n, task_id in enumerate(tasks):
            stores[0].put_task(task(task_id, agent=AGENT if n % 2 else other))
        errors: list[BaseException] = []
        read_at_end: dict[str, set[str]] = {}

        def writes(store: PostgresDataStore, order: int) -> None:
            for i in range(30):
                picked = tasks[::order] if i % 2 else list(reversed(tasks))[::order]
                creds = [
                    Credential("jwt_id", f"{order}-{i}-{t}", AGENT, "spiffe://x/y", t, NOW + 60)
                    for t in picked
                ]
                creds.append(
                    Credential("jwt_id", f"{order}-{i}", other, "spiffe://x/z", "", NOW + 60)
                )
                try:
                    store.write_ledger(creds, [])
                except TaskEndedMeanwhileError:
                    pass
                except Exception as e:
                    errors.append(e)
                    return

        def ends() -> None:
            for task_id in tasks:
                threading.Event().wait(0.02)
                try:
                    assert stores[2].swap_task(task(task_id, state="ending"), "active")
                    read_at_end[task_id] = {
                        c.value for c in stores[2].task_credentials(task_id, NOW)
                    }
                except Exception as e:
                    errors.append(e)

        threads = [
            threading.Thread(target=writes, args=(stores[0], 1)),
            threading.Thread(target=writes, args=(stores[1], 2)),
            threading.Thread(target=ends),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        for task_id in tasks:
            on_record = {c.value for c in stores[0].task_credentials(task_id, NOW)}
            assert on_record == read_at_end[task_id], task_id
    finally:
        for store in stores:
            store.close()


def test_pruning_revocations_reads_the_expiry_index(postgres_dsn: str, clock: FakeClock) -> None:
    """The cut-off is bound as an integer: a float would make PostgreSQL compare the column
    as float8 and scan every revocation at each prune."""
    from server.datastore import queries
    from server.datastore.postgres_sql import needed_from, pg

    PostgresDataStore(postgres_dsn, clock).close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(  # a hundred of them past the cut-off
            "INSERT INTO revocations SELECT 'jwt_id', g::text, 's', %s + g, 'r', 1 "
            "FROM generate_series(1, 20000) g",
            (needed_from(NOW) - 101,),
        )
        conn.execute("ANALYZE revocations")
        plan = conn.execute(
            "EXPLAIN " + pg(queries.PRUNE_REVOCATIONS), {"needed_from": needed_from(NOW)}
        ).fetchall()
    assert "revocations_expires_at" in " ".join(r[0] for r in plan)
    assert needed_from(100.5 + 600) - needed_from(100 + 600) == 1  # ceil, never floor


def test_writes_on_another_schema_neither_end_nor_shorten_a_feed_wait(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """NOTIFY is per database: a deployment (or test) on another schema of the same database
    is heard on the feed's channel. Its notifications must not end this store's wait."""
    reader = PostgresDataStore(postgres_dsn, clock)
    stop = threading.Event()
    written: list[str] = []
    with postgres.fresh_schema(postgres.server_dsn()) as other_dsn:
        other = PostgresDataStore(other_dsn, clock)

        def write_there() -> None:
            while not stop.wait(0.02):
                written.append(other.create_entry(entry(f"/other/{len(written)}")).id)

        writer = threading.Thread(target=write_there)
        try:
            head = reader.feed_head()
            writer.start()
            started = time.monotonic()
            assert not reader.wait_feed(head, 1.0)
            waited = time.monotonic() - started
        finally:
            stop.set()
            writer.join(10)
            other.close()
            reader.close()
    assert waited >= 0.95, f"the wait ended after {waited:.2f} s of 1 s"
    assert len(written) >= 10  # the other schema's writes went on all through the wait


# -- leases between servers whose clocks disagree ------------------------------------------------

# Within MAX_CLOCK_SKEW (60 s), and more than a third of the lease's life: the holder still
# trusts its last renewal (Lease.held: two thirds of the ttl) when the row lapses by B's clock.
SKEW = 40
LEASE_TTL = 30


def test_a_lease_is_not_taken_by_a_server_whose_clock_runs_ahead_of_the_holders(
    postgres_dsn: str,
) -> None:
    """The row's expiry is counted on the database's clock, not each server's: B, its clock
    40 s ahead of A's, found A's fresh row lapsed and took the lease while A still acted on it
    (two servers rotating the CA, two pruning the audit chain). Moving both clocks on still
    lets the lease lapse, as a holder that stopped renewing must."""
    from server.housekeeping import HOUSEKEEPING_LEASE, Lease

    a_clock, b_clock = FakeClock(NOW), FakeClock(NOW + SKEW)
    a_store = PostgresDataStore(postgres_dsn, a_clock)
    b_store = PostgresDataStore(postgres_dsn, b_clock)
    try:
        a = Lease(a_store, HOUSEKEEPING_LEASE, "a", a_clock, LEASE_TTL)
        b = Lease(b_store, HOUSEKEEPING_LEASE, "b", b_clock, LEASE_TTL)
        assert a.renew()
        assert not b.renew(), "B took the lease A holds"
        assert a.held
        assert not b.held
        for moved in (a_clock, b_clock):  # A stops renewing; its row lapses for everyone
            moved.advance(LEASE_TTL)
        assert not a.held
        assert b.renew()
    finally:
        a_store.close()
        b_store.close()


def test_a_join_token_expires_at_one_moment_for_every_server_whatever_its_clock(
    postgres_dsn: str,
) -> None:
    """A made the token with a minute to live; B, its clock 40 s behind A's, checked the
    expiry by its own clock and admitted an agent with it 20 s after it expired (and C,
    40 s ahead, pruned it 40 s early). Counted on the database's clock, the token lives its
    minute on every server, and is spent once."""
    a_clock, b_clock, c_clock = FakeClock(NOW), FakeClock(NOW - SKEW), FakeClock(NOW + SKEW)
    a, b, c = (PostgresDataStore(postgres_dsn, k) for k in (a_clock, b_clock, c_clock))
    clocks = (a_clock, b_clock, c_clock)
    try:
        for name in ("spent", "expired"):
            a.create_join_token(JoinToken(name, HASH, NOW + 60))
        for moved in clocks:
            moved.advance(30)
        assert c.prune_join_tokens(int(c_clock.now())) == 0, "C pruned a live token"
        agent = AttestedAgent(AGENT, "join_token", "1", NOW + 3600)
        assert b.admit_agent(agent, TokenUse("spent", HASH), int(b_clock.now()))
        second = replace(agent, spiffe_id=f"{AGENT}-2")
        assert not a.admit_agent(second, TokenUse("spent", HASH), int(a_clock.now()))
        for moved in clocks:
            moved.advance(31)  # a second past the token's expiry
        assert not b.check_join_token("expired", HASH, int(b_clock.now()))
        late = replace(agent, spiffe_id=f"{AGENT}-3")
        assert not b.admit_agent(late, TokenUse("expired", HASH), int(b_clock.now()))
        assert [x.spiffe_id for x in a.list_agents()] == [AGENT]
        assert c.prune_join_tokens(int(c_clock.now())) == 1
    finally:
        for store in (a, b, c):
            store.close()


class _SteppedClock(FakeClock):
    """A FakeClock whose wall time can step alone (NTP correcting a clock that was off)."""

    def step_wall(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def test_a_prune_of_join_tokens_after_a_clock_step_takes_one_connection(
    postgres_dsn: str,
) -> None:
    """The prune turned its `now` into the database's clock inside its transaction: after a
    step of the server's clock that measures the offset again, on a second connection, while
    the prune held one. A pool with none to spare (one connection, or every one busy) made
    the prune wait out its timeout and fail. The time is turned before the transaction, as
    every other lease time is."""
    clock = _SteppedClock(NOW)
    store = PostgresDataStore(postgres_dsn, clock, max_connections=1, timeout=0.5)
    try:
        store.create_join_token(JoinToken("live", HASH, NOW + 60))
        clock.step_wall(120)  # NTP sets right a clock that ran two minutes behind
        # The step is no time passing on the database's clock: the token lives on.
        assert store.prune_join_tokens(int(clock.now())) == 0
        assert store.check_join_token("live", HASH, int(clock.now()))
    finally:
        store.close()


def test_a_removal_claim_is_not_taken_by_a_server_whose_clock_runs_ahead(
    postgres_dsn: str,
) -> None:
    a_clock, b_clock = FakeClock(NOW), FakeClock(NOW + SKEW)
    a_store = PostgresDataStore(postgres_dsn, a_clock)
    b_store = PostgresDataStore(postgres_dsn, b_clock)
    try:
        a_store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
        a_store.delete_agent(AGENT, Removal(AGENT, REMOVAL_EVICTED, NOW))
        assert a_store.claim_removal(AGENT, "a", int(a_clock.now()), LEASE_TTL)
        assert not b_store.claim_removal(AGENT, "b", int(b_clock.now()), LEASE_TTL)
        assert a_store.renew_removal_claim(AGENT, "a", int(a_clock.now()), LEASE_TTL)
        for moved in (a_clock, b_clock):
            moved.advance(LEASE_TTL + 1)
        assert b_store.claim_removal(AGENT, "b", int(b_clock.now()), LEASE_TTL)
    finally:
        a_store.close()
        b_store.close()


# -- a database that stops answering ------------------------------------------------------------


def _with_options(dsn: str, extra: str) -> str:
    """`dsn` (a URL) with `extra` appended to its `options`."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    options = " ".join([v for k, v in query if k == "options"] + [extra])
    query = [(k, v) for k, v in query if k != "options"] + [("options", options)]
    return urllib.parse.urlunsplit(
        parts._replace(query=urllib.parse.urlencode(query, quote_via=urllib.parse.quote))
    )


def test_a_database_gone_silent_fails_a_call_once_no_answer_came_in_time(
    postgres_dsn: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its host frozen, or a proxy in front of it acknowledging what nobody answers: TCP sees
    nothing wrong. The call fails (the store unreachable) once a request had no answer within
    the answer timeout, and the connection is closed, not handed to the next call."""
    monkeypatch.setattr(AnsweredConnection, "answer_timeout", 1.0)
    relay = CuttableRelay(upstream_of(postgres_dsn))
    store = PostgresDataStore(relay.dsn_through(postgres_dsn), clock, max_connections=1)
    try:
        store.create_entry(entry("/before"))
        relay.freeze()
        started = time.monotonic()
        with pytest.raises(UnreachableError, match=r"cannot read .*: no answer .* within 1 s"):
            store.revision()
        assert time.monotonic() - started < 3
    finally:
        relay.cut()
        store.close()


# Long enough for psycopg_pool's default backoff to reach half a minute between attempts.
OUTAGE = 35.0


def test_a_database_back_after_a_long_outage_is_used_at_once(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """A failover of half a minute or more: every connection of a full pool is lost, and the
    pool retries each one with backoff. Once the database is back, the next call is served:
    with psycopg_pool's default retry budget (5 minutes) each slot waited out a delay grown
    past 30 s, and every call meanwhile failed UNAVAILABLE after the pool's timeout, the
    database up all along."""
    relay = CuttableRelay(upstream_of(postgres_dsn))
    store = PostgresDataStore(relay.dsn_through(postgres_dsn), clock)
    try:

        def busy() -> None:  # the pool grows to its size, as a loaded server's does
            with store._connection("wait") as conn:
                conn.execute("SELECT pg_sleep(0.3)")

        race([busy] * postgres_module.MAX_CONNECTIONS)
        relay.cut()
        down_until = time.monotonic() + OUTAGE
        while time.monotonic() < down_until:  # the server's calls go on, and fail
            with pytest.raises(UnreachableError):
                store.revision()
            time.sleep(0.5)
        relay.restore()
        answers: list[BaseException | int] = []
        for _ in range(2):  # a call may still catch the one attempt being made
            try:
                answers.append(store.revision())
                break
            except UnreachableError as e:
                answers.append(e)
        assert isinstance(answers[-1], int), answers
    finally:
        relay.cut()
        store.close()


def test_a_statement_past_the_timeout_is_cancelled_and_bulk_work_may_run_long(
    postgres_dsn: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL cancels a statement running past the statement timeout (the DSN's own here,
    kept over the server's), and the connection serves the next call; bulk work (prunes,
    listing everything) runs under a long timeout, and gives it back after."""
    monkeypatch.setattr(AnsweredConnection, "answer_timeout", 1.5)
    store = PostgresDataStore(
        _with_options(postgres_dsn, "-c statement_timeout=500"), clock, max_connections=1
    )
    sleep = "SELECT pg_sleep(:s)"
    try:
        with pytest.raises(StorageError, match="canceling statement due to statement timeout"):
            store._tuples("sleep", sleep, {"s": 1})
        assert store.revision() == 0  # the same (only) connection, still good
        store._tuples("sleep", sleep, {"s": 2}, bulk=True)  # past both timeouts
        with pytest.raises(StorageError, match="statement timeout"):
            store._tuples("sleep", sleep, {"s": 1})
    finally:
        store.close()


def test_a_transaction_left_idle_is_ended_by_the_server_and_its_locks_go(
    postgres_dsn: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread stalled inside a transaction (its process paused, a callback that never
    returns) holds the rows it wrote; PostgreSQL ends its session once it sat idle in the
    transaction past the bound, so another server's write gets the row within its statement
    timeout, and the stalled call fails when it goes on, keeping nothing."""
    monkeypatch.setattr(postgres_module, "IDLE_IN_TRANSACTION_TIMEOUT", 0.5)
    stalled = PostgresDataStore(postgres_dsn, clock, max_connections=1)
    other = PostgresDataStore(postgres_dsn, clock)
    try:
        with _write_stalled_midway(stalled, bulk=False) as finish:
            started = time.monotonic()
            other.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
            assert time.monotonic() - started < postgres_module.STATEMENT_TIMEOUT
            error = finish()
        assert isinstance(error, StorageError), error
        assert "idle-in-transaction" in str(error)
        assert other.revision() == 1  # the stalled bump was rolled back
        assert stalled.revision() == 1  # and its pool serves again
    finally:
        stalled.close()
        other.close()


def test_a_bulk_write_left_idle_is_ended_by_the_server_as_any_write_is(
    postgres_dsn: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry write, an agent's ban or eviction, a prune run under the bulk limits (their
    turn, or the rows they delete, may rightly take long to come), but each runs its
    statements back to back. One whose server stalled midway (paused, its VM frozen) held its
    locks for the bulk bound, ten minutes: every server's entry writes, or the banned agent's
    issuance, failed all along. PostgreSQL ends it as it ends any other write left idle."""
    monkeypatch.setattr(postgres_module, "IDLE_IN_TRANSACTION_TIMEOUT", 0.5)
    stalled = PostgresDataStore(postgres_dsn, clock, max_connections=1)
    other = PostgresDataStore(postgres_dsn, clock)
    try:
        with _write_stalled_midway(stalled, bulk=True) as finish:
            other.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
            error = finish()
        assert isinstance(error, StorageError), error
        assert other.revision() == 1  # the stalled bump was rolled back
    finally:
        stalled.close()
        other.close()


@contextlib.contextmanager
def _write_stalled_midway(
    store: PostgresDataStore, *, bulk: bool
) -> Iterator[Callable[[], BaseException | None]]:
    """Runs a revision bump on `store` in a thread that stalls once it holds the counter's
    lock (every write's last); yields then. The yielded call lets the write go on and returns
    what it raised, so each test states only what another server sees meanwhile and after."""
    held, resume = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def stall(cur: Any) -> None:
        cur.execute(pg(ps.BUMP_COUNTER), {"name": "revision"})  # every write's last lock
        held.set()
        resume.wait(30)
        cur.execute("SELECT 1")

    def run() -> None:
        try:
            store._write("stall", stall, bulk=bulk)
            outcome.append(None)
        except Exception as e:
            outcome.append(e)

    def finish() -> BaseException | None:
        resume.set()
        thread.join(30)
        return outcome[0]

    thread = threading.Thread(target=run)
    try:
        thread.start()
        assert held.wait(30)
        yield finish
    finally:
        resume.set()
        thread.join(30)


def test_connection_options_bound_every_wait_unless_the_dsn_sets_its_own() -> None:
    found = connection_options("postgresql://u@h/db?options=-csearch_path%3Ds&keepalives_idle=60")
    assert found["options"] == (
        "-csearch_path=s -c statement_timeout=5000 -c idle_in_transaction_session_timeout=30000"
    )
    assert "keepalives_idle" not in found  # the DSN's 60 stands
    assert found["keepalives"] == 1
    assert found["tcp_user_timeout"] == 6000
    assert found["connect_timeout"] == 5
    own = connection_options("postgresql://u@h/db?options=-c%20statement_timeout%3D0")
    assert own["options"] == "-c statement_timeout=0 -c idle_in_transaction_session_timeout=30000"
    both = "-c%20statement_timeout%3D0%20-c%20idle_in_transaction_session_timeout%3D0"
    assert "options" not in connection_options(f"postgresql://u@h/db?options={both}")


def _settled(dsn: str, app: str, thread: threading.Thread) -> str:
    """'waiting' once a connection of `app` waits for a lock, 'done' once `thread` ended
    (whichever comes first)."""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        for _ in range(600):
            if not thread.is_alive():
                return "done"
            row = watcher.execute(
                "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) "
                "WHERE NOT granted AND application_name = %s",
                (app,),
            ).fetchone()
            if row is not None and row[0] > 0:
                return "waiting"
            threading.Event().wait(0.05)
    raise AssertionError(f"{app} neither waited nor ended")


def _started(
    outcomes: dict[str, BaseException | None], name: str, call: Callable[[], object]
) -> threading.Thread:
    """`call` on a thread of its own, its outcome kept in `outcomes` under `name`: None where
    it returned, else what it raised."""

    def target() -> None:
        try:
            call()
            outcomes[name] = None
        except Exception as e:
            outcomes[name] = e

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _credential(value: str) -> Credential:
    return Credential("jwt_id", value, AGENT, "spiffe://x/y", "", NOW + 60)


@pytest.mark.parametrize("how", ["evicted", "banned"])
def test_a_removal_waiting_for_a_ledger_write_goes_before_the_next_write(
    postgres_dsn: str, clock: FakeClock, how: str
) -> None:
    """An agent issuing without pause always has some ledger write holding it. A removal
    waiting for the one under way is not passed by the next write of the same agent: that
    write waits behind the removal and is refused after it, so the eviction or ban is never
    starved by overlapping writes from several servers."""
    first, _ = _store_as(postgres_dsn, clock, "first")
    second, second_app = _store_as(postgres_dsn, clock, "second")
    remover, remover_app = _store_as(postgres_dsn, clock, "removal")
    reseal = _HeldReseal()  # the first write holds the agent, uncommitted
    outcomes: dict[str, BaseException | None] = {}

    def remove() -> None:
        if how == "evicted":
            removal = Removal(AGENT, REMOVAL_EVICTED, NOW)
            remover.delete_agent(AGENT, removal)
        else:
            removal = Removal(AGENT, REMOVAL_BANNED, NOW)
            remover.set_agent_banned(AGENT, True, removal)

    threads: list[threading.Thread] = []
    try:
        first.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
        # Sealed on a head the (empty) chain is not at: the store calls reseal, mid-write.
        threads.append(
            _started(
                outcomes,
                "first",
                lambda: first.write_ledger([_credential("a")], audit_rows(5, 1), reseal=reseal),
            )
        )
        assert reseal.inside.wait(30)
        threads.append(_started(outcomes, "removal", remove))
        _wait_for_a_lock_wait(postgres_dsn, remover_app, f"the removal did not wait: {outcomes}")
        # No audit rows: the second write needs none of the locks the first holds but the
        # agent's.
        threads.append(
            _started(outcomes, "second", lambda: second.write_ledger([_credential("b")], []))
        )
        try:
            settled = _settled(postgres_dsn, second_app, threads[-1])
            assert settled == "waiting", (
                f"the second write ({outcomes.get('second')!r}) got in ahead of the removal "
                f"still waiting ({threads[1].is_alive()})"
            )
        finally:
            reseal.release.set()
            for thread in threads:
                thread.join(30)
        assert outcomes["first"] is None
        assert outcomes["removal"] is None
        assert isinstance(outcomes["second"], AgentRemovedError), outcomes["second"]
        assert [c.value for c in first.agent_credentials(AGENT, NOW)] == ["a"]
    finally:
        reseal.release.set()
        for store in (first, second, remover):
            store.close()


def test_a_reattestation_waiting_for_a_ledger_write_goes_before_the_next_write(
    postgres_dsn: str, clock: FakeClock
) -> None:
    """An agent issuing without pause always has some ledger write holding its row. Its
    re-attestation (the row's compare-and-swap to the new SVID) waiting for the one under way
    is not passed by the next write of the agent, as a row lock would let it: that write waits
    behind the re-attestation, so overlapping writes from several servers cannot starve the
    agent's renewal past its statement timeout. The write after it still goes through: the
    agent renewed is admitted."""
    first, _ = _store_as(postgres_dsn, clock, "first")
    second, second_app = _store_as(postgres_dsn, clock, "second")
    renewer, renewer_app = _store_as(postgres_dsn, clock, "renewal")
    reseal = _HeldReseal()  # the first write holds the agent, uncommitted
    outcomes: dict[str, BaseException | None] = {}
    held = AttestedAgent(AGENT, "join_token", "1", NOW + 3600, attested_at=NOW)
    renewed = AttestedAgent(
        AGENT,
        "join_token",
        "2",
        NOW + 7200,
        attested_at=NOW + 1,
        previous_serial="1",
        previous_expires_at=NOW + 3600,
    )

    threads: list[threading.Thread] = []
    try:
        first.upsert_agent(held)
        threads.append(
            _started(
                outcomes,
                "first",
                lambda: first.write_ledger([_credential("a")], audit_rows(5, 1), reseal=reseal),
            )
        )
        assert reseal.inside.wait(30)
        threads.append(
            _started(outcomes, "renewal", lambda: renewer.upsert_agent(renewed, replacing=held))
        )
        _wait_for_a_lock_wait(postgres_dsn, renewer_app, f"the renewal did not wait: {outcomes}")
        threads.append(
            _started(outcomes, "second", lambda: second.write_ledger([_credential("b")], []))
        )
        try:
            settled = _settled(postgres_dsn, second_app, threads[-1])
            assert settled == "waiting", (
                f"the second write ({outcomes.get('second')!r}) got in ahead of the renewal "
                f"still waiting ({threads[1].is_alive()})"
            )
        finally:
            reseal.release.set()
            for thread in threads:
                thread.join(30)
        assert outcomes == {"first": None, "renewal": None, "second": None}
        assert first.get_agent(AGENT).serial == "2"
        assert [c.value for c in first.agent_credentials(AGENT, NOW)] == ["a", "b"]
    finally:
        reseal.release.set()
        for store in (first, second, renewer):
            store.close()


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (EventFilter(kind="svid_minted"), [2, 3]),
        (EventFilter(decision="allow"), [1, 2, 3, 4]),
        (None, [1, 2, 3, 4]),
        # Through an index: a removal's or a task end's read keeps the short limit.
        (EventFilter(agent_id=AGENT), None),
        (EventFilter(kind="revocation", node_id=AGENT), None),
    ],
)
def test_a_listing_of_the_audit_log_by_no_index_runs_under_the_bulk_limits(
    postgres_dsn: str, clock: FakeClock, where: EventFilter | None, expected: list[int] | None
) -> None:
    """A listing by kind (no index: each page reads the log in seq order until it found a
    page's worth) on a very large log takes longer than a statement of the server's own may:
    it runs under the bulk limits. Here the page waits for a lock for longer than the DSN's
    statement timeout, as such a scan takes, and still answers with the rows asked for; a
    read an index serves is still cancelled at the statement timeout."""
    store = PostgresDataStore(_with_options(postgres_dsn, "-c statement_timeout=300"), clock)
    at = AUDIT_COLUMNS.index("kind")
    rows = [
        (*row[:at], "svid_minted" if row[0] in (2, 3) else row[at], *row[at + 1 :])
        for row in audit_rows(1, 4)
    ]
    held = threading.Event()

    def hold() -> None:
        with psycopg.connect(postgres_dsn) as conn:
            conn.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
            held.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    try:
        store.write_ledger([], rows)
        holder.start()
        assert held.wait(30)
        if expected is None:
            with pytest.raises(StorageError, match="statement timeout"):
                list(store.audit_rows(where))
        else:
            assert [r["seq"] for r in store.audit_rows(where)] == expected
    finally:
        holder.join(30)
        store.close()

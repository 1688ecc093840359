"""The datastore: CRUD, identity rules, single use and change tracking on every backend (the
`datastore` fixture below); restarts, migrations and the file on SQLite."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from server.datastore import (
    AlreadyExistsError,
    AttestedAgent,
    ConflictError,
    Credential,
    DataStore,
    Entry,
    JoinToken,
    KeySlot,
    NotFoundError,
    Revocation,
    Selector,
    ledger_queries,
    migrations,
    queries,
    sqlite_ledger,
)
from server.datastore import sqlite as sqlite_module
from server.datastore.errors import AgentReplacedError, DatastoreMovedError, StorageError
from server.datastore.migrations import MIGRATIONS
from server.datastore.records import (
    EventFilter,
    TokenUse,
    revocation_needed_from,
)
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from svid import MAX_CLOCK_SKEW, MAX_VERIFIER_LEEWAY
from svid._clock import FakeClock
from tests.server.test_datastore_contract import (
    BACKENDS,
    MIGRATION_17_SEQUENCES,
    MIGRATION_21_TASK_BODIES,
    RUNTIME,
    admit,
    assert_migration_17_sequences_carried_over,
    assert_migration_22_announcement_carried_over,
    assert_migration_22_parents_carried_over,
)

AGENT = "spiffe://example.org/svid/agent/join_token/t1"


@pytest.fixture(params=sorted(BACKENDS))
def datastore(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[DataStore]:
    store = BACKENDS[request.param](request, tmp_path, clock)()
    yield store
    store.close()


def entry(path: str = "/web", parent: str = AGENT, *selectors: str, **kw: object) -> Entry:
    sels = tuple(Selector.parse(s) for s in (selectors or ("unix:uid:1000",)))
    return Entry("", f"spiffe://example.org{path}", parent, sels, **kw)  # type: ignore[arg-type]


def agent(spiffe_id: str = AGENT, serial: str = "1", **kw: object) -> AttestedAgent:
    return AttestedAgent(spiffe_id, "join_token", serial, 1_700_003_600, **kw)  # type: ignore[arg-type]


# -- records -------------------------------------------------------------------------------------


def test_selector_parse_splits_on_first_colon() -> None:
    sel = Selector.parse("unix:uid:1000")
    assert sel == Selector("unix", "uid:1000")
    assert str(sel) == "unix:uid:1000"


@pytest.mark.parametrize("text", ["", "unix", "unix:", ":uid"])
def test_selector_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="type:value"):
        Selector.parse(text)


def test_join_token_repr_hides_the_hash() -> None:
    token = JoinToken("t1", b"\x01" * 32, 5)
    assert "secret" not in repr(token)
    assert repr(b"\x01" * 32) not in repr(token)


# -- entries -------------------------------------------------------------------------------------


def test_create_entry_assigns_id_revision_and_time(datastore: DataStore) -> None:
    created = datastore.create_entry(entry(dns_names=("a.example",), hint="h", admin=True))
    assert len(created.id) == 32
    assert created.revision == 1
    assert created.created_at == 1_700_000_000
    assert datastore.get_entry(created.id) == created


def test_entries_made_within_one_second_sort_in_creation_order(
    datastore: DataStore,
) -> None:
    """The agent picks a workload's default identity by (created_at, id); created_at counts
    seconds, so the id must keep same-second entries in the order they were made."""
    made = [datastore.create_entry(entry(f"/w{i}")) for i in range(50)]
    assert len({e.created_at for e in made}) == 1
    assert [e.id for e in made] == sorted(e.id for e in made)
    assert all(len(e.id) == 32 and int(e.id, 16) >= 0 for e in made)


def test_create_entry_keeps_a_given_id(datastore: DataStore) -> None:
    created = datastore.create_entry(Entry("my-id", "spiffe://example.org/a", AGENT, ()))
    assert created.id == "my-id"
    with pytest.raises(AlreadyExistsError, match="my-id"):
        datastore.create_entry(Entry("my-id", "spiffe://example.org/b", AGENT, ()))


def test_duplicate_entry_is_the_same_selector_set_in_any_order(datastore: DataStore) -> None:
    datastore.create_entry(entry("/web", AGENT, "unix:uid:1000", "unix:gid:5"))
    with pytest.raises(AlreadyExistsError, match="same selectors"):
        datastore.create_entry(entry("/web", AGENT, "unix:gid:5", "unix:uid:1000"))
    # A different selector set, parent or ID is a different entry.
    datastore.create_entry(entry("/web", AGENT, "unix:uid:1000"))
    datastore.create_entry(
        entry("/web", "spiffe://example.org/other", "unix:uid:1000", "unix:gid:5")
    )
    datastore.create_entry(entry("/api", AGENT, "unix:uid:1000", "unix:gid:5"))
    assert len(datastore.list_entries()) == 4


def test_list_entries_filters(datastore: DataStore) -> None:
    a = datastore.create_entry(entry("/a", AGENT))
    b = datastore.create_entry(entry("/b", AGENT))
    c = datastore.create_entry(entry("/a", "spiffe://example.org/other"))
    assert {e.id for e in datastore.list_entries()} == {a.id, b.id, c.id}
    assert {e.id for e in datastore.list_entries(spiffe_id=a.spiffe_id)} == {a.id, c.id}
    assert {e.id for e in datastore.list_entries(parent_id=AGENT)} == {a.id, b.id}
    assert [e.id for e in datastore.list_entries(a.spiffe_id, AGENT)] == [a.id]
    assert datastore.list_entries(spiffe_id="spiffe://example.org/none") == []


def test_update_entry_bumps_revision_and_keeps_created_at(
    datastore: DataStore, clock: FakeClock
) -> None:
    created = datastore.create_entry(entry())
    clock.advance(100)
    changed = Entry(created.id, created.spiffe_id, AGENT, created.selectors, x509_svid_ttl=60)
    updated = datastore.update_entry(changed)
    assert updated.revision == 2
    assert updated.created_at == created.created_at
    assert datastore.get_entry(created.id) == updated


def test_update_entry_with_a_stale_revision_conflicts(datastore: DataStore) -> None:
    created = datastore.create_entry(entry())
    datastore.update_entry(created)  # now revision 2
    with pytest.raises(ConflictError, match="revision 2"):
        datastore.update_entry(created)  # still says revision 1
    assert datastore.get_entry(created.id).revision == 2


def test_update_entry_may_not_clash_with_another(datastore: DataStore) -> None:
    a = datastore.create_entry(entry("/a"))
    b = datastore.create_entry(entry("/b"))
    with pytest.raises(AlreadyExistsError, match=a.id):
        datastore.update_entry(Entry(b.id, a.spiffe_id, a.parent_id, a.selectors))
    assert datastore.get_entry(b.id) == b


def test_unknown_entry_is_not_found(datastore: DataStore) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        datastore.get_entry("nope")
    with pytest.raises(NotFoundError, match="nope"):
        datastore.update_entry(Entry("nope", "spiffe://example.org/a", AGENT, ()))
    with pytest.raises(NotFoundError, match="nope"):
        datastore.delete_entry("nope")


def test_delete_entry(datastore: DataStore) -> None:
    created = datastore.create_entry(entry())
    datastore.delete_entry(created.id)
    assert datastore.list_entries() == []
    datastore.create_entry(entry())  # the identity is free again


# -- join tokens ---------------------------------------------------------------------------------


NOW = 1_700_000_000
HASH = b"h" * 32


def _spend(store: DataStore, token_id: str, secret_hash: bytes, now: int) -> bool:
    return store.admit_agent(agent(), TokenUse(token_id, secret_hash), now)


def test_join_token_is_consumed_once(datastore: DataStore) -> None:
    token = JoinToken("t1", HASH, NOW + 600)
    datastore.create_join_token(token)
    with pytest.raises(AlreadyExistsError, match="t1"):
        datastore.create_join_token(token)
    assert _spend(datastore, "t1", HASH, NOW)
    assert not _spend(datastore, "t1", HASH, NOW)
    assert not _spend(datastore, "never", HASH, NOW)


def test_a_wrong_hash_or_late_attempt_leaves_the_token_as_it_was(
    datastore: DataStore,
) -> None:
    datastore.create_join_token(JoinToken("t1", HASH, NOW + 600))
    revision = datastore.revision()
    assert not _spend(datastore, "t1", b"g" * 32, NOW)
    assert not _spend(datastore, "t1", HASH[:-1], NOW)
    assert not _spend(datastore, "t1", HASH, NOW + 600)  # expired: expires_at <= now
    assert datastore.revision() == revision
    assert datastore.list_agents() == []  # a token not spent saves no agent
    assert datastore.check_join_token("t1", HASH, NOW + 599)
    assert not datastore.check_join_token("t1", HASH, NOW + 600)
    assert not datastore.check_join_token("t1", b"g" * 32, NOW)
    assert _spend(datastore, "t1", HASH, NOW + 599)
    assert datastore.list_agents() == [agent()]
    assert not datastore.check_join_token("t1", HASH, NOW)


def test_join_token_single_use_under_concurrent_consumers(datastore: DataStore) -> None:
    datastore.create_join_token(JoinToken("race", HASH, NOW + 600))
    barrier = threading.Barrier(8)
    results: list[bool] = []
    lock = threading.Lock()

    def consume() -> None:
        barrier.wait()
        got = _spend(datastore, "race", HASH, NOW)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=consume) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert sum(results) == 1


def test_join_token_single_use_across_two_connections(tmp_path: Path, clock: FakeClock) -> None:
    first = SqliteDataStore(tmp_path / "db", clock)
    second = SqliteDataStore(tmp_path / "db", clock)
    first.create_join_token(JoinToken("t", HASH, NOW + 600))
    assert _spend(second, "t", HASH, NOW)
    assert not _spend(first, "t", HASH, NOW)
    first.close()
    second.close()


def test_prune_join_tokens(datastore: DataStore) -> None:
    datastore.create_join_token(JoinToken("old", HASH, 100))
    datastore.create_join_token(JoinToken("new", HASH, 200))
    assert datastore.prune_join_tokens(100) == 1
    datastore.create_join_token(JoinToken("old", HASH, 300))  # the id is free again
    assert _spend(datastore, "new", HASH, 150)


# -- agents --------------------------------------------------------------------------------------


def test_agent_upsert_get_list_delete(datastore: DataStore) -> None:
    first = agent(selectors=(Selector("join_token", "t1"),), attested_at=5)
    datastore.upsert_agent(first)
    assert datastore.get_agent(AGENT) == first
    renewed = first.renewed("2", first.expires_at + 60, held=first.serial)
    datastore.upsert_agent(renewed, first)
    assert datastore.get_agent(AGENT) == renewed
    assert (renewed.previous_serial, renewed.previous_expires_at) == (
        first.serial,
        first.expires_at,
    )
    other = agent("spiffe://example.org/svid/agent/x509pop/abc")
    datastore.upsert_agent(other)
    assert [a.spiffe_id for a in datastore.list_agents()] == [AGENT, other.spiffe_id]
    datastore.delete_agent(AGENT)
    with pytest.raises(NotFoundError, match="t1"):
        datastore.get_agent(AGENT)
    with pytest.raises(NotFoundError):
        datastore.delete_agent(AGENT)


def test_ban_is_sticky_across_saves(datastore: DataStore) -> None:
    datastore.upsert_agent(agent())
    datastore.set_agent_banned(AGENT, True)
    with pytest.raises(AgentReplacedError):  # a renewal racing the ban
        datastore.upsert_agent(agent().renewed("2", 1_700_007_200, held="1"), agent())
    with pytest.raises(AgentReplacedError):  # a first admission that read no record
        datastore.upsert_agent(agent(serial="3"))
    assert datastore.get_agent(AGENT) == agent(banned=True)
    datastore.set_agent_banned(AGENT, False)
    assert not datastore.get_agent(AGENT).banned
    with pytest.raises(NotFoundError):
        datastore.set_agent_banned("spiffe://example.org/nobody", True)


# -- key slots and bundle sequence ---------------------------------------------------------------


def test_key_slots_insert_replace_delete(datastore: DataStore) -> None:
    slot = KeySlot("s1", "x509", "prepared", b"\x30\x00", "k", 10, 20, 5)
    datastore.save_key_slot(slot)
    datastore.save_key_slot(KeySlot("s0", "x509", "active", b"\x30", "k0", 1, 20, 1))
    datastore.save_key_slot(KeySlot("j1", "jwt", "active", b"\x30", "j", 1, 20, 1))
    active = KeySlot("s1", "x509", "active", b"\x30\x00", "k", 10, 20, 5)
    datastore.save_key_slot(active)
    assert [s.slot_id for s in datastore.list_key_slots("x509")] == ["s0", "s1"]
    assert datastore.list_key_slots("x509")[1] == active
    datastore.delete_key_slot("s1")
    datastore.delete_key_slot("s1")  # replaying a journal step is harmless
    assert [s.slot_id for s in datastore.list_key_slots("x509")] == ["s0"]
    with pytest.raises(ValueError, match="kind"):
        datastore.save_key_slot(KeySlot("x", "pgp", "active", b"", "", 0, 0, 0))


def test_bundle_sequence_is_monotonic_across_restarts(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteDataStore(tmp_path / "db", clock)
    assert store.bundle_sequence() == 0
    assert [store.next_bundle_sequence() for _ in range(3)] == [1, 2, 3]
    store.close()
    store = SqliteDataStore(tmp_path / "db", clock)
    assert store.bundle_sequence() == 3
    assert store.next_bundle_sequence() == 4
    store.close()


# -- revocations ---------------------------------------------------------------------------------


def test_revocations_add_list_prune(datastore: DataStore) -> None:
    a = Revocation("x509_serial", "123", "spiffe://example.org/a", 100, "task ended", 50)
    b = Revocation("jwt_id", "abc", "spiffe://example.org/b", 200, "leaked", 50)
    datastore.add_revocations([a, b])
    datastore.add_revocations([Revocation("x509_serial", "123", "x", 999, "again", 60)])
    assert datastore.list_revocations() == [b, a]
    # Kept through exp + the widest leeway and clock skew, gone the second after.
    assert datastore.prune_revocations(100 + int(MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW)) == 0
    assert datastore.prune_revocations(101 + int(MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW)) == 1
    assert datastore.list_revocations() == [b]
    with pytest.raises(ValueError, match="kind"):
        datastore.add_revocations([Revocation("crl", "1", "x", 1, "", 1)])
    assert datastore.list_revocations() == [b]


# -- change tracking -----------------------------------------------------------------------------


def test_revision_moves_on_every_write_agents_care_about(datastore: DataStore) -> None:
    seen = [datastore.revision()]

    def moved() -> bool:
        now = datastore.revision()
        moved = now > seen[-1]
        seen.append(now)
        return moved

    created = datastore.create_entry(entry())
    assert moved()
    datastore.update_entry(created)
    assert moved()
    datastore.upsert_agent(agent())
    assert moved()
    datastore.set_agent_banned(AGENT, True)
    assert moved()
    datastore.add_revocations([Revocation("jwt_id", "j", "s", 10, "", 1)])
    assert moved()
    datastore.prune_revocations(11 + int(MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW))
    assert moved()
    datastore.next_bundle_sequence()
    assert moved()
    datastore.delete_agent(AGENT)
    assert moved()
    datastore.delete_entry(created.id)
    assert moved()
    datastore.create_join_token(JoinToken("t", b"h", 5))
    datastore.prune_revocations(11 + int(MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW))  # nothing to prune
    assert not moved()


def test_failed_write_changes_nothing(datastore: DataStore) -> None:
    datastore.create_entry(entry())
    before = datastore.revision()
    with pytest.raises(AlreadyExistsError):
        datastore.create_entry(entry())
    assert datastore.revision() == before
    assert len(datastore.list_entries()) == 1


# -- the file ------------------------------------------------------------------------------------


def test_restart_keeps_everything(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteDataStore(tmp_path / "db", clock)
    created = store.create_entry(entry())
    store.upsert_agent(agent())
    store.create_join_token(JoinToken("t", b"h", 5))
    store.add_revocations([Revocation("jwt_id", "j", "s", 10, "", 1)])
    revision = store.revision()
    store.close()
    again = SqliteDataStore(tmp_path / "db", clock)
    assert again.list_entries() == [created]
    assert again.get_agent(AGENT) == agent()
    assert again.check_join_token("t", b"h", 4)
    assert len(again.list_revocations()) == 1
    assert again.revision() == revision
    again.close()


def test_migrations_are_recorded_and_idempotent(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteDataStore(tmp_path / "db", clock)
    versions = [m.version for m in MIGRATIONS]
    assert store.schema_versions() == versions
    assert store.migrate() == []
    store.create_entry(entry())
    store.close()
    again = SqliteDataStore(tmp_path / "db", clock)
    assert again.migrate() == []
    assert again.schema_versions() == versions
    assert len(again.list_entries()) == 1
    again.close()


def _created_at_version(
    path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, version: int
) -> sqlite3.Connection:
    """A connection to a datastore created at `path` by the migrations up to `version`, to
    write rows as that version wrote them."""
    with monkeypatch.context() as m:
        m.setattr(sqlite_module, "MIGRATIONS", MIGRATIONS[:version])
        SqliteDataStore(path, clock).close()
    return sqlite3.connect(path)


def test_a_datastore_of_the_previous_schema_gains_the_ledger_tables(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written as version 1 wrote it: today's statements name columns later migrations added.
    db = _created_at_version(tmp_path / "db", clock, monkeypatch, 1)
    db.execute(
        "INSERT INTO entries (id, spiffe_id, parent_id, identity_hash, selectors, x509_svid_ttl, "
        "jwt_svid_ttl, dns_names, hint, admin, expires_at, revision, created_at) VALUES "
        "('e1', 'spiffe://example.org/web', ?, 'h', '[[\"unix\", \"uid:1000\"]]', 0, 0, "
        "'[]', '', 0, 0, 1, 5)",
        (AGENT,),
    )
    db.commit()
    db.close()
    made = replace(entry(), id="e1", revision=1, created_at=5)
    store = SqliteDataStore(tmp_path / "db", clock)
    assert store.schema_versions() == [m.version for m in MIGRATIONS]
    assert store.get_entry(made.id) == made
    assert store.audit_head() is None
    assert store.list_tasks() == []
    assert store.feed_head() == 0
    store.delete_entry(made.id)
    assert [(i.revision, i.key) for i in store.feed_since(0, 10)] == [(1, made.id)]
    store.close()


def test_serials_recorded_before_migration_11_read_back_with_no_issuer(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written as version 10 wrote them: no issuer column yet.
    db = _created_at_version(tmp_path / "db", clock, monkeypatch, 10)
    db.execute(
        "INSERT INTO revocations (kind, value, spiffe_id, expires_at, reason, revoked_at) "
        "VALUES ('x509_serial', '7b', 'spiffe://example.org/web', 900, 'r', 5)"
    )
    db.execute(
        "INSERT INTO credentials (kind, value, agent_id, spiffe_id, task_id, expires_at) "
        "VALUES ('x509_serial', '7b', ?, 'spiffe://example.org/web', '', 900)",
        (AGENT,),
    )
    db.commit()
    db.close()
    store = SqliteDataStore(tmp_path / "db", clock)
    assert store.schema_versions() == [m.version for m in MIGRATIONS]
    # No issuer on record: server.tasks.crl lists such a serial under every CA, as before.
    assert [(r.value, r.issuer) for r in store.list_revocations()] == [("7b", "")]
    assert [(c.value, c.issuer) for c in store.agent_credentials(AGENT, 0)] == [("7b", "")]
    store.close()


def test_a_removal_stored_before_migration_16_is_unclaimed(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal a server of the previous version left (it died midway) is free to claim and
    finish once the claim columns are added."""
    # Written as version 14 wrote it: no claim columns yet.
    db = _created_at_version(tmp_path / "db", clock, monkeypatch, 14)
    db.execute(
        "INSERT INTO removals (agent_id, reason, started_at) VALUES (?, 'agent evicted', 5)",
        (AGENT,),
    )
    db.commit()
    db.close()
    store = SqliteDataStore(tmp_path / "db", clock)
    assert store.schema_versions() == [m.version for m in MIGRATIONS]
    assert store.claim_removal(AGENT, "a", 10, 30)
    assert not store.claim_removal(AGENT, "b", 10, 30)
    store.close()


def test_a_datastore_a_newer_server_migrated_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    """A server older than the datastore's schema would read and write its rows in their old
    meaning: it refuses to open it, naming both versions."""
    SqliteDataStore(tmp_path / "db", clock).close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'n', 1)")
    db.commit()
    db.close()
    latest = MIGRATIONS[-1].version
    with pytest.raises(StorageError, match=rf"version 999, newer than this server's \({latest}\)"):
        SqliteDataStore(tmp_path / "db", clock)


def test_a_store_that_does_not_migrate_refuses_an_older_schema_naming_both_versions(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers of the release that made it may be running on it: the read-only open leaves
    the file as it is and says what to do."""
    previous = MIGRATIONS[-2].version
    _created_at_version(tmp_path / "db", clock, monkeypatch, previous).close()
    before = (tmp_path / "db").read_bytes()  # checkpointed: a closed store leaves no WAL
    latest = MIGRATIONS[-1].version
    with pytest.raises(StorageError) as raised:
        SqliteDataStore(tmp_path / "db", clock, migrate=False)
    said = str(raised.value)
    assert f"version {previous}, older than this release's ({latest})" in said
    assert "upgrade every server sharing the datastore first" in said
    assert (tmp_path / "db").read_bytes() == before
    db = sqlite3.connect(tmp_path / "db")
    try:
        assert max(r[0] for r in db.execute("SELECT version FROM schema_migrations")) == previous
    finally:
        db.close()


def test_a_store_that_does_not_migrate_reads_an_older_schema_it_is_told_it_can(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = MIGRATIONS[-2].version
    _created_at_version(tmp_path / "db", clock, monkeypatch, previous).close()
    store = SqliteDataStore(tmp_path / "db", clock, migrate=False, oldest_schema=previous)
    try:
        assert store.schema_versions()[-1] == previous
        assert store.list_entries() == []
    finally:
        store.close()


def test_a_store_that_does_not_migrate_refuses_a_newer_schema(
    tmp_path: Path, clock: FakeClock
) -> None:
    SqliteDataStore(tmp_path / "db", clock).close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'n', 1)")
    db.commit()
    db.close()
    with pytest.raises(StorageError, match=r"version 999, newer than this server's"):
        SqliteDataStore(tmp_path / "db", clock, migrate=False, oldest_schema=1)


def test_a_store_that_does_not_migrate_creates_nothing(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(StorageError, match="no datastore at"):
        SqliteDataStore(tmp_path / "db", clock, migrate=False)
    assert list(tmp_path.iterdir()) == []
    sqlite3.connect(tmp_path / "db").close()  # a file no server started on: no schema
    with pytest.raises(StorageError, match="holds no svidd schema"):
        SqliteDataStore(tmp_path / "db", clock, migrate=False)
    assert (tmp_path / "db").stat().st_size == 0


def test_a_store_that_does_not_migrate_writes_nothing(tmp_path: Path, clock: FakeClock) -> None:
    """Read-only all the way down: a write some read path would make fails, not lands."""
    SqliteDataStore(tmp_path / "db", clock).close()
    store = SqliteDataStore(tmp_path / "db", clock, migrate=False)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.create_entry(entry())
        assert store.list_entries() == []
    finally:
        store.close()


def test_foreign_bundle_sequences_stored_under_migration_17_read_back_and_order(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 18 shifts the sequences 17 stored as they were (a uint64 in a signed BIGINT):
    each reads back as written and still orders the next write."""
    db = _created_at_version(tmp_path / "db", clock, monkeypatch, 17)
    db.executemany(
        "INSERT INTO foreign_bundles (trust_domain, bundle, updated_at, spiffe_sequence) "
        "VALUES (?, X'7B7D', 5, ?)",
        list(MIGRATION_17_SEQUENCES.items()),
    )
    db.commit()
    db.close()
    store = SqliteDataStore(tmp_path / "db", clock)
    try:
        assert_migration_17_sequences_carried_over(store)
    finally:
        store.close()


@pytest.mark.parametrize("runtimes", [None, 1, 3])
@pytest.mark.parametrize("after", [False, True])
def test_every_task_page_reads_an_index_in_order(
    tmp_path: Path, clock: FakeClock, runtimes: int | None, after: bool
) -> None:
    """Each filter set of a task list has an index ending in the page key: no full scan of
    the table, no sort of every matching row before the limit."""
    SqliteDataStore(tmp_path / "db", clock).close()
    db = sqlite3.connect(tmp_path / "db")
    params = {
        "agent_id": AGENT,
        "state": "active",
        "after_created_at": 1,
        "after_task_id": "t",
        "limit": 10,
        **{f"r{i}": f"r{i}" for i in range(3)},
    }
    try:
        for agent_filter in (False, True):
            for state in (False, True):
                sql = ledger_queries.list_tasks(
                    agent=agent_filter, state=state, runtime_count=runtimes, after=after, limit=True
                )
                steps = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
                reads = [s for s in steps if s.startswith(("SCAN", "SEARCH"))]
                assert reads, steps
                for step in reads:
                    assert "USING INDEX tasks_page" in step, (sql, steps)
                    assert step.startswith("SEARCH") or not (agent_filter or state or runtimes)
                assert not [s for s in steps if "TEMP B-TREE" in s], (sql, steps)
    finally:
        db.close()


def _query_plan(path: Path, sql: str, params: Any = ()) -> list[str]:
    """The steps SQLite's planner takes for `sql` on the store at `path`."""
    db = sqlite3.connect(path)
    try:
        return [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    finally:
        db.close()


@pytest.mark.parametrize(
    ("by_spiffe_id", "by_parent", "index"),
    [(True, False, "entries_spiffe_id"), (False, True, "entries_parent_id")],
)
def test_entries_filtered_by_an_id_are_read_by_index(
    tmp_path: Path, clock: FakeClock, by_spiffe_id: bool, by_parent: bool, index: str
) -> None:
    """An exact SPIFFE ID or parent ID is an index search: written `(:x IS NULL OR col = :x)`,
    the one query for every filter read the whole table in id order."""
    SqliteDataStore(tmp_path / "db", clock).close()
    sql = queries.list_entries(spiffe_id=by_spiffe_id, parent_id=by_parent)
    params = {"spiffe_id": "spiffe://example.org/w", "parent_id": AGENT}
    steps = _query_plan(tmp_path / "db", sql, params)
    reads = [s for s in steps if s.startswith(("SCAN", "SEARCH"))]
    assert len(reads) == 1, steps
    assert reads[0].startswith(f"SEARCH entries USING INDEX {index}"), steps


def test_the_revocation_events_of_a_node_are_read_by_index(
    tmp_path: Path, clock: FakeClock
) -> None:
    """An agent's removal looks up the revocation events of its node: an index search, not a
    scan of the whole audit log."""
    SqliteDataStore(tmp_path / "db", clock).close()
    sql, params = ledger_queries.audit_page(EventFilter(kind="revocation", node_id=AGENT))
    steps = _query_plan(tmp_path / "db", sql, {**params, "after": 0, "limit": 10})
    assert [s for s in steps if s.startswith(("SCAN", "SEARCH"))] == [
        "SEARCH audit_events USING INDEX audit_events_node_revocations (node_id=? AND seq>?)"
    ], steps
    assert not [s for s in steps if "TEMP B-TREE" in s], steps


def _credentials_around(cut: int) -> tuple[list[Credential], set[str]]:
    """Credentials in the order a ledger records them, a few prune chunks' worth expired before
    `cut` (needed no more) and others not, and the values of those expired. Not in expiry
    order: long-lived ones among the oldest, expired ones among the newest, one exactly at the
    cut (needed)."""
    rows: list[Credential] = []
    for i in range(3 * sqlite_ledger.PRUNE_CHUNK + 17):  # the oldest: mostly expired
        expires_at = cut + 86_400 if i % 7 == 0 else cut - 1000 + i % 1000
        rows.append(Credential("jwt_id", f"old-{i}", AGENT, RUNTIME, "", expires_at))
    rows.append(Credential("x509_serial", "at-the-cut", AGENT, RUNTIME, "", cut, "ca"))
    for i in range(2 * sqlite_ledger.PRUNE_CHUNK):  # the newest: mostly live
        expires_at = cut - 1 if i % 11 == 0 else cut + 1 + i
        rows.append(Credential("jwt_id", f"new-{i}", AGENT, RUNTIME, "", expires_at))
    return rows, {c.value for c in rows if c.expires_at < cut}


def _stored_values(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT value FROM credentials")}
    finally:
        db.close()


def test_the_credential_prune_holds_the_write_lock_only_to_delete_rows_it_found(
    tmp_path: Path, clock: FakeClock
) -> None:
    """No index leads by expires_at (it would cost every issuance insert), so a DELETE by it
    scanned the whole table under SQLite's write lock and the store's, every issuance commit
    waiting (over 100 ms at 1 M rows). Every statement the prune runs on the store's
    connection (the one issuance commits on) finds its rows by rowid; exactly the expired
    rows go."""
    path = tmp_path / "db"
    store = admit(SqliteDataStore(path, clock), AGENT)
    now = NOW + 100_000
    cut = int(revocation_needed_from(now))
    rows, expired = _credentials_around(cut)
    store.write_ledger(rows, [])
    ran: list[str] = []
    store._db.conn.set_trace_callback(ran.append)
    try:
        assert store.prune_credentials(now) == len(expired)
    finally:
        store._db.conn.set_trace_callback(None)
        store.close()
    assert _stored_values(path) == {c.value for c in rows} - expired
    db = sqlite3.connect(path)
    try:
        for sql in ran:
            if sql in ("BEGIN IMMEDIATE", "COMMIT"):
                continue
            steps = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            reads = [s for s in steps if s.startswith(("SCAN", "SEARCH")) and "credentials" in s]
            assert reads, (sql, steps)
            assert all(
                s.startswith("SEARCH credentials USING INTEGER PRIMARY KEY") for s in reads
            ), (sql, steps)
    finally:
        db.close()
    deletes = [sql for sql in ran if sql.startswith("DELETE")]
    assert len(deletes) > 1, ran  # chunk after chunk, each its own transaction
    assert len([sql for sql in ran if sql == "BEGIN IMMEDIATE"]) == len(deletes), ran


def test_a_credential_prune_that_fails_midway_deleted_only_expired_rows(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Each chunk commits on its own: a failure in the second leaves the first's rows deleted
    (none of them needed), the rest in place, and the next prune deletes those."""
    path = tmp_path / "db"
    store = admit(SqliteDataStore(path, clock), AGENT)
    now = NOW + 100_000
    cut = int(revocation_needed_from(now))
    rows, expired = _credentials_around(cut)
    store.write_ledger(rows, [])
    deletes = 0

    def count(sql: str) -> None:
        nonlocal deletes
        deletes += sql.startswith("DELETE")

    # SQLite interrupts the statement it runs when the handler says so: the second delete.
    store._db.conn.set_trace_callback(count)
    store._db.conn.set_progress_handler(lambda: deletes >= 2, 10)
    try:
        with pytest.raises(StorageError, match="cannot prune credentials: interrupted"):
            store.prune_credentials(now)
    finally:
        store._db.conn.set_progress_handler(None, 0)
        store._db.conn.set_trace_callback(None)
    try:
        left = _stored_values(path)
        assert len(rows) - len(left) == sqlite_ledger.PRUNE_CHUNK
        assert {c.value for c in rows} - left <= expired
        assert store.prune_credentials(now) == len(expired) - sqlite_ledger.PRUNE_CHUNK
    finally:
        store.close()
    assert _stored_values(path) == {c.value for c in rows} - expired


def _take_away(path: Path, how: str) -> Callable[[], None]:
    """The datastore file at `path` deleted, moved away, or moved away with another
    datastore put in its place, under the store that has it open; returns what puts the
    store's own back (nothing, once deleted)."""
    if how == "deleted":
        path.unlink()
        return lambda: None
    aside = path.with_name("moved")
    path.rename(aside)
    if how == "replaced":
        SqliteDataStore(path.with_name("other"), FakeClock()).close()
        path.with_name("other").rename(path)
    return lambda: aside.replace(path)


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced"])
def test_a_credential_prune_on_a_datastore_file_gone_from_its_path_names_the_path(
    tmp_path: Path, clock: FakeClock, how: str
) -> None:
    """The prune reads on a connection of its own, opened by path: with the file gone, SQLite
    said only "unable to open database file", and nothing of which file or why. The error
    names the path and what is wrong; the store serves reads on, and prunes again once its
    file is back."""
    path = tmp_path / "db"
    store = admit(SqliteDataStore(path, clock), AGENT)
    now = NOW + 100_000
    rows, expired = _credentials_around(int(revocation_needed_from(now)))
    store.write_ledger(rows, [])
    put_back = _take_away(path, how)
    try:
        with pytest.raises(DatastoreMovedError, match="cannot prune credentials") as refused:
            store.prune_credentials(now)
        said = str(refused.value)
        assert f"the datastore file at {path} " in said
        assert ("not the one the server opened" if how == "replaced" else "is gone") in said
        assert store.get_agent(AGENT).spiffe_id == AGENT  # reads go on
        if how != "deleted":
            put_back()
            assert store.prune_credentials(now) == len(expired)
    finally:
        store.close()


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced"])
def test_no_write_is_acknowledged_to_a_datastore_file_gone_from_its_path(
    tmp_path: Path, clock: FakeClock, how: str
) -> None:
    """SQLite goes on writing to the file it has open, deleted or moved away: every write
    succeeded, into a file no path names, and was gone at the next start (the datastore
    missing, or another in its place). None is taken, each refused naming the path; the
    store writes again once its own file is back."""
    path = tmp_path / "db"
    store = admit(SqliteDataStore(path, clock), AGENT)
    put_back = _take_away(path, how)
    try:
        with pytest.raises(DatastoreMovedError, match=f"the datastore file at {path} "):
            store.create_entry(entry("/lost"))
        with pytest.raises(DatastoreMovedError):
            store.write_ledger([Credential("jwt_id", "j", AGENT, RUNTIME, "", NOW)], [])
        assert store.list_entries() == []  # nothing of the refused write, reads go on
        if how != "deleted":
            put_back()
            kept = store.create_entry(entry("/kept"))
    finally:
        store.close()
    if how != "deleted":
        again = SqliteDataStore(path, clock)
        try:
            assert [e.id for e in again.list_entries()] == [kept.id]
        finally:
            again.close()


def test_no_write_is_acknowledged_once_the_datastore_s_directory_is_gone_from_its_path(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The data directory moved away and a file put where it was: the path names no file (the
    stat says "not a directory", not "no such file"), and the write went to the file no path
    names, as with the file itself moved. A store opened through a symlinked directory is the
    file the link leads to: it writes."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    path = tmp_path / "link" / "db"
    store = admit(SqliteDataStore(path, clock), AGENT)
    try:
        kept = store.create_entry(entry("/kept"))
        data.rename(tmp_path / "moved")
        data.write_text("")
        with pytest.raises(DatastoreMovedError, match=f"the datastore file at {path} is gone"):
            store.create_entry(entry("/lost"))
        data.unlink()
        (tmp_path / "moved").rename(data)
        again = store.create_entry(entry("/again"))
    finally:
        store.close()
    reopened = SqliteDataStore(path, clock)
    try:
        assert {e.id for e in reopened.list_entries()} == {kept.id, again.id}
    finally:
        reopened.close()


def test_a_workload_jwt_is_read_by_index(tmp_path: Path, clock: FakeClock) -> None:
    """The JWT-bearer grant's lookup of its assertion's record is a search of migration 21's
    partial index, not a scan of the credentials."""
    SqliteDataStore(tmp_path / "db", clock).close()
    steps = _query_plan(
        tmp_path / "db",
        ledger_queries.WORKLOAD_JWT,
        {"jti": "j", "expires_at": 1, "spiffe_id": "spiffe://example.org/w"},
    )
    assert steps == [
        "SEARCH credentials USING INDEX credentials_workload_jwt_by_subject "
        "(expires_at=? AND spiffe_id=?)"
    ], steps


def test_a_tasks_sub_tasks_are_read_by_index(tmp_path: Path, clock: FakeClock) -> None:
    """An end finds its sub-tasks by a search of migration 22's partial index, not by
    reading its runtime's every active task."""
    SqliteDataStore(tmp_path / "db", clock).close()
    steps = _query_plan(
        tmp_path / "db", ledger_queries.SUB_TASKS, {"parent_task_id": "t", "state": "active"}
    )
    assert steps == ["SEARCH tasks USING INDEX tasks_parent (parent_task_id=? AND state=?)"], steps


def test_the_newest_policy_announcement_is_read_by_index(tmp_path: Path, clock: FakeClock) -> None:
    """A server's start read the feed backwards from its head for the newest announcement:
    the whole feed when it held none (60 ms at a million rows). Migration 23's partial index
    holds the announcements only."""
    SqliteDataStore(tmp_path / "db", clock).close()
    steps = _query_plan(tmp_path / "db", queries.NEWEST_POLICY_ANNOUNCEMENT)
    assert steps == ["SCAN feed USING INDEX feed_policy"], steps


def test_a_datastore_of_migration_22_reads_its_policy_announcement_by_the_new_index(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upgraded from the previous schema: the announcements it holds are indexed too."""
    db = _created_at_version(tmp_path / "db", clock, monkeypatch, 22)
    # As version 22 wrote them: an announcement, and a newer row of another kind.
    db.execute("UPDATE counters SET value = 2 WHERE name = 'feed'")
    db.execute("INSERT INTO feed (revision, at, kind, key) VALUES (1, 5, 'policy', 'h1')")
    db.execute("INSERT INTO feed (revision, at, kind, key) VALUES (2, 5, 'task', 't1')")
    db.commit()
    db.close()
    store = SqliteDataStore(tmp_path / "db", clock)
    try:
        assert_migration_22_announcement_carried_over(store, clock)
    finally:
        store.close()
    plan = _query_plan(tmp_path / "db", queries.NEWEST_POLICY_ANNOUNCEMENT)
    assert plan == ["SCAN feed USING INDEX feed_policy"], plan


def test_tasks_stored_before_migration_22_are_found_by_their_parent(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A sub-task stored before the column existed has its parent only in its body: the
    migration copies it, or the parent's end would not end it."""
    path = tmp_path / "db"
    SqliteDataStore(path, clock).close()
    db = sqlite3.connect(path)
    try:
        # As a store at migration 21 held them.
        db.execute("DROP INDEX tasks_parent")
        db.execute("ALTER TABLE tasks DROP COLUMN parent_task_id")
        db.execute("DELETE FROM schema_migrations WHERE version = 22")
        db.executemany(
            "INSERT INTO tasks (task_id, agent_id, runtime_id, state, expires_at, "
            "created_at, body) VALUES (?, 'a', 'r', 'active', 9, 1, ?)",
            MIGRATION_21_TASK_BODIES,
        )
        db.commit()
    finally:
        db.close()
    store = SqliteDataStore(path, clock)
    try:
        assert_migration_22_parents_carried_over(store)
    finally:
        store.close()


def test_a_batch_of_a_workloads_jwts_is_written_in_few_pages(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Batch issuance commits a workload's JWTs of one second together: the indexes they go
    in must take them in a few pages, each page written to the WAL at the commit. An index
    keyed by the random jti (migration 14's) took a batch of 100 at random places among the
    second's earlier ones: about a page per JWT once that second held a few thousand, which
    cost batch issuance a fifth of its rate."""
    path = tmp_path / "db"
    store = admit(SqliteDataStore(path, clock), AGENT)
    exp = NOW + 300

    def batch() -> list[Credential]:
        # As issuance records them: random jtis, one workload, one agent, the same exp.
        return [
            Credential("jwt_id", os.urandom(16).hex(), AGENT, RUNTIME, "", exp) for _ in range(100)
        ]

    for _ in range(40):  # the second's earlier batches
        store.write_ledger(batch(), [])
    counter = sqlite3.connect(path)
    try:
        frames = []
        for _ in range(5):
            counter.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            store.write_ledger(batch(), [])
            # (busy, frames in the WAL, frames checkpointed): the WAL held only this commit.
            frames.append(counter.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    finally:
        counter.close()
        store.close()
    # About 20 pages a batch (the rows, the right edges of four indexes, their parents);
    # with migration 14's index, over 60.
    assert max(frames) <= 32, frames


def test_an_agents_credentials_are_read_by_index_with_the_tokens_it_acts_with(
    tmp_path: Path, clock: FakeClock
) -> None:
    """An agent's removal reads its credentials and the delegated tokens its workloads act with
    by two index searches (migration 15's partial index for the second), and the tokens
    derived from those by a search of migration 19's per step: no scan of the credentials
    (only of the steps' own rows)."""
    SqliteDataStore(tmp_path / "db", clock).close()
    steps = _query_plan(
        tmp_path / "db", ledger_queries.AGENT_CREDENTIALS, {"agent_id": AGENT, "needed_from": 1}
    )
    assert [s for s in steps if s.startswith(("SCAN", "SEARCH"))] == [
        "SEARCH credentials USING INDEX credentials_agent (agent_id=?)",
        "SEARCH credentials USING INDEX credentials_actor_agent (actor_agent_id=?)",
        "SCAN a",
        "SEARCH c USING INDEX credentials_derived_from (derived_from=?)",
        "SCAN acting",
    ], steps


def test_the_chain_a_token_was_derived_from_is_read_by_its_tasks_index(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A ledger write of a token exchanged for another reads the agents of that one's chain by a
    search of the task's credentials per step, no scan of the credentials."""
    SqliteDataStore(tmp_path / "db", clock).close()
    steps = _query_plan(tmp_path / "db", ledger_queries.CHAIN_AGENTS, {"task_id": "t", "jti": "j"})
    searches = [s for s in steps if s.startswith("SEARCH")]
    assert searches == [
        "SEARCH credentials USING INDEX credentials_task (task_id=?)",
        "SEARCH c USING INDEX credentials_task (task_id=?)",
    ], steps
    assert not [s for s in steps if s.startswith("SCAN") and s != "SCAN chain"], steps


def test_credentials_recorded_before_migration_15_read_back_with_no_actor_agent(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Written as version 14 wrote it: no actor_agent_id column yet.
    db = _created_at_version(tmp_path / "db", clock, monkeypatch, 14)
    db.execute(
        "INSERT INTO credentials (kind, value, agent_id, spiffe_id, task_id, expires_at, issuer) "
        "VALUES ('jwt_id', 'j1', ?, 'spiffe://example.org/web', 't1', 900, '')",
        (AGENT,),
    )
    db.commit()
    db.close()
    store = SqliteDataStore(tmp_path / "db", clock)
    assert store.schema_versions() == [m.version for m in MIGRATIONS]
    assert [(c.value, c.actor_agent_id) for c in store.agent_credentials(AGENT, 0)] == [
        ("j1", None)
    ]
    assert store.agent_credentials("spiffe://example.org/agent/other", 0) == []
    store.close()


def test_the_shared_sql_has_no_sqlite_only_syntax() -> None:
    """queries, ledger_queries and the migrations are what a PostgreSQL backend reuses: only the
    dialect words the migrations module names (BLOB, SEQ_KEY) may be SQLite's."""
    statements: list[str] = []
    for module in (queries, ledger_queries):
        statements += [v for k, v in vars(module).items() if k.isupper() and isinstance(v, str)]
    statements.append(
        ledger_queries.list_tasks(agent=True, state=True, runtime_count=2, after=True, limit=True)
    )
    statements.append(
        ledger_queries.audit_page(EventFilter("a", "t", 1.0, 2.0, "allow", "k", "n"))[0]
    )
    for migration in MIGRATIONS:
        migration.apply(statements.append)
    sqlite_only = (
        "INSERT OR",
        "REPLACE INTO",
        "ROWID",
        "AUTOINCREMENT",
        "PRAGMA",
        "WITHOUT",
        "STRICT",
        "IFNULL",
        "GLOB",
        "?",
        "DATETIME(",
        "IF NOT EXISTS",
    )
    found = [
        (word, sql.strip()[:60])
        for sql in statements
        for word in sqlite_only
        if word in sql.replace(migrations.SEQ_KEY, "").upper()
    ]
    assert found == []


def test_database_is_wal_fully_synced_and_owner_only(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "db"
    store = SqliteDataStore(path, clock)
    store.create_entry(entry())
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    _assert_owner_only(path)
    store.close()


def _assert_owner_only(path: Path) -> None:
    """The datastore file at `path` and its -wal and -shm beside it are 0600."""
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        mode = stat.S_IMODE(os.stat(file).st_mode)
        assert mode == 0o600, f"{file.name} has mode {oct(mode)}"


@contextlib.contextmanager
def _crash_left_companions(path: Path) -> Iterator[None]:
    """A writer of the datastore at `path` left open, as a crash leaves it: its -wal and -shm
    stay on disk, with rows, made 0644 (a loose umask, an older release)."""
    crashed = sqlite3.connect(path)
    crashed.execute("UPDATE counters SET value = value + 1 WHERE name = 'revision'")
    crashed.commit()
    try:
        for companion in (f"{path}-wal", f"{path}-shm"):
            os.chmod(companion, 0o644)
        yield
    finally:
        crashed.close()


def test_existing_file_is_made_owner_only(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    SqliteDataStore(path, clock).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_wal_and_shm_left_by_a_crash_are_made_owner_only(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A -wal/-shm left behind keeps the mode it was made with (0644 under a loose umask, or
    by an older release) and holds the same rows as the database: made 0600 at the next open."""
    path = tmp_path / "db"
    SqliteDataStore(path, clock).close()
    with _crash_left_companions(path):
        store = SqliteDataStore(path, clock)
        _assert_owner_only(path)
        store.close()


def test_the_companions_of_a_datastore_reached_through_a_symlink_are_made_owner_only(
    tmp_path: Path, clock: FakeClock
) -> None:
    """SQLite keeps the -wal and -shm beside the file a symlinked path resolves to, not beside
    the link: those are the ones a crash left, holding the same rows, to be made 0600."""
    real = tmp_path / "volume" / "db"
    real.parent.mkdir()
    SqliteDataStore(real, clock).close()
    with _crash_left_companions(real):
        link = tmp_path / "datastore"
        link.symlink_to(real)
        store = SqliteDataStore(link, clock)
        _assert_owner_only(real)
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes a file another user owns")
def test_a_companion_another_user_owns_refuses_the_open_naming_it(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A -wal another user owns stays theirs however its mode is set (a root server's chmod
    succeeds): they could read the token hashes in it, or change the rows it replays. The open
    is refused, naming the file and its owner, and the file is left as it was."""
    path = tmp_path / "db"
    SqliteDataStore(path, clock).close()
    wal = tmp_path / "db-wal"
    wal.touch(mode=0o644)
    os.chown(wal, 65534, 65534)
    with pytest.raises(StorageError) as refused:
        SqliteDataStore(path, clock)
    assert str(wal) in str(refused.value)
    assert "owned by uid 65534" in str(refused.value)
    assert wal.stat().st_uid == 65534


def test_a_companion_swapped_for_a_symlink_after_its_check_leaves_the_target_alone(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where others can write the datastore's directory, a -wal found a regular file can be
    swapped for a symlink before its chmod: a chmod by path follows it, to any file the
    server's user owns. The file checked is the file changed."""
    path = tmp_path / "db"
    SqliteDataStore(path, clock).close()
    wal = tmp_path / "db-wal"
    wal.touch(mode=0o644)
    victim = tmp_path / "victim"
    victim.touch(mode=0o644)
    real_lstat, real_fstat = os.lstat, os.fstat

    def swap_after(check: Any) -> Any:
        def checked(target: Any, *args: Any, **kwargs: Any) -> Any:
            found = check(target, *args, **kwargs)
            if wal.is_file() and not wal.is_symlink():
                wal.unlink()
                wal.symlink_to(victim)  # another user's move, between check and chmod
            return found

        return checked

    monkeypatch.setattr(os, "lstat", swap_after(real_lstat))
    monkeypatch.setattr(os, "fstat", swap_after(real_fstat))
    with contextlib.suppress(StorageError):  # SQLite refuses the symlinked -wal
        SqliteDataStore(path, clock).close()
    monkeypatch.undo()
    assert wal.is_symlink()  # the swap happened
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_closed_store_refuses_calls(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteDataStore(tmp_path / "db", clock)
    store.close()
    store.close()  # twice is fine
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store.list_entries()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store.create_entry(entry())


# -- the fault-injecting wrapper -----------------------------------------------------------------


def test_fault_injection_fails_matching_calls_in_order(datastore: DataStore) -> None:
    store = FaultInjectingDataStore(datastore)
    store.inject(sqlite3.OperationalError("disk I/O error"), method="create_entry")
    store.inject(RuntimeError("any method"))
    with pytest.raises(RuntimeError, match="any method"):
        store.list_entries()  # skips the create_entry fault, takes the catch-all
    with pytest.raises(sqlite3.OperationalError, match="disk"):
        store.create_entry(entry())
    assert datastore.list_entries() == []  # the failed call never reached the real store
    assert store.pending() == 0
    created = store.create_entry(entry())
    assert store.get_entry(created.id) == created
    assert store.calls == ["list_entries", "create_entry", "create_entry", "get_entry"]

"""Datastore batches: one transaction and one revision per batch, per-item results, and a failed
transaction leaving nothing behind. Backend-neutral tests run on every backend of the contract
(tests/server/test_datastore_contract.BACKENDS)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from server.datastore import (
    AlreadyExistsError,
    ConflictError,
    DataStore,
    Entry,
    NotFoundError,
    Selector,
)
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock
from tests.server.test_datastore_contract import BACKENDS, NOW

AGENT = "spiffe://example.org/svid/agent/join_token/t1"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture(params=sorted(BACKENDS))
def datastore(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[DataStore]:
    store = BACKENDS[request.param](request, tmp_path, clock)()
    yield store
    store.close()


def entry(path: str, *selectors: str, id: str = "") -> Entry:
    sels = tuple(Selector.parse(s) for s in (selectors or ("unix:uid:1000",)))
    return Entry(id, f"spiffe://example.org{path}", AGENT, sels)


def test_create_entries_stores_the_good_items_and_names_each_clash(
    datastore: DataStore, clock: FakeClock
) -> None:
    existing = datastore.create_entry(entry("/old"))
    before = datastore.revision()
    results = datastore.create_entries(
        [
            entry("/a"),
            entry("/old"),  # same identity as a stored entry
            entry("/b", id="chosen"),
            entry("/c", id=existing.id),  # a stored entry's id
            entry("/a"),  # same identity as an item earlier in this batch
        ]
    )
    a, old, chosen, same_id, again = results
    assert isinstance(a, Entry)
    assert a.revision == 1
    assert a.created_at == int(clock.now())
    assert isinstance(old, AlreadyExistsError)
    assert f"(id {existing.id})" in str(old)
    assert isinstance(chosen, Entry)
    assert chosen.id == "chosen"
    assert isinstance(same_id, AlreadyExistsError)
    assert f"entry id {existing.id} already exists" in str(same_id)
    assert isinstance(again, AlreadyExistsError)
    assert f"(id {a.id})" in str(again)
    assert datastore.revision() == before + 1  # one batch, one revision
    assert {e.id for e in datastore.list_entries()} == {existing.id, a.id, "chosen"}
    assert datastore.get_entry(a.id) == a


def test_a_batch_that_changes_nothing_leaves_the_revision(datastore: DataStore) -> None:
    datastore.create_entry(entry("/old"))
    before = datastore.revision()
    assert isinstance(datastore.create_entries([entry("/old")])[0], AlreadyExistsError)
    assert isinstance(datastore.delete_entries(["missing"])[0], NotFoundError)
    assert datastore.revision() == before


def test_update_entries_per_item(datastore: DataStore) -> None:
    a = datastore.create_entry(entry("/a"))
    b = datastore.create_entry(entry("/b"))
    before = datastore.revision()
    results = datastore.update_entries(
        [
            replace(a, hint="one"),
            replace(a, hint="two", revision=2),  # the revision the item before stored
            replace(b, revision=7),
            replace(b, spiffe_id=a.spiffe_id),  # would clash with a's identity
            replace(a, id="missing"),
        ]
    )
    one, two, stale, clash, missing = results
    assert isinstance(one, Entry)
    assert one.revision == 2
    assert isinstance(two, Entry)
    assert two.revision == 3
    assert isinstance(stale, ConflictError)
    assert isinstance(clash, AlreadyExistsError)
    assert isinstance(missing, NotFoundError)
    assert datastore.get_entry(a.id).hint == "two"
    assert datastore.get_entry(b.id) == b
    assert datastore.revision() == before + 1


def test_delete_entries_per_item(datastore: DataStore) -> None:
    a = datastore.create_entry(entry("/a"))
    b = datastore.create_entry(entry("/b"))
    results = datastore.delete_entries([a.id, a.id, "missing"])
    assert results[0] is None
    assert isinstance(results[1], NotFoundError)
    assert isinstance(results[2], NotFoundError)
    assert datastore.list_entries() == [b]


def test_a_failed_batch_transaction_writes_nothing(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteDataStore(tmp_path / "db.sqlite3", clock)
    try:
        store.create_entry(entry("/seed"))
        before = store.revision()
        # A trigger that fails the third insert stands in for a disk error mid-batch.
        store._db.execute(
            "CREATE TRIGGER fail_third BEFORE INSERT ON entries "
            "WHEN NEW.spiffe_id = 'spiffe://example.org/c' "
            "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
        with pytest.raises(sqlite3.IntegrityError, match="disk I/O error"):
            store.create_entries([entry("/a"), entry("/b"), entry("/c"), entry("/d")])
        assert [e.spiffe_id for e in store.list_entries()] == ["spiffe://example.org/seed"]
        assert store.revision() == before
    finally:
        store.close()


def test_a_batch_survives_a_reopen(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteDataStore(path, clock)
    created = store.create_entries([entry(f"/w/{n}") for n in range(300)])
    store.close()
    again = SqliteDataStore(path, clock)
    try:
        assert again.list_entries() == created
    finally:
        again.close()

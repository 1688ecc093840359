"""A COMMIT whose fsync (or other I/O) failed may still land: its WAL frames can be on disk and
be replayed at the next open. The store refuses every write after it and tells the server,
which stops; the caller is told the outcome is unknown, not that the write failed. A full disk
at COMMIT is no such case: nothing was committed, and the store goes on."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.audit.errors import LedgerError
from server.datastore.errors import CommitUnknownError, StorageError
from server.datastore.sqlite import SqliteDataStore
from server.issuance.ledger import LedgerUnavailableError
from server.status import STORAGE_MESSAGE, status_for
from svid._clock import FakeClock
from tests.server.test_datastore import entry


def _failing_commit(store: SqliteDataStore, code: int, name: str) -> Callable[[], None]:
    """Every COMMIT of `store` fails as SQLite fails it with `code` (an fsync the disk
    refused: SQLITE_IOERR_FSYNC); returns the undo."""
    db = store._db  # the one connection the store commits on
    real = db.execute

    def execute(sql: str, *args: Any, **kwargs: Any) -> Any:
        if sql == "COMMIT":
            real("ROLLBACK")  # what SQLite does with the pager's cache after such a failure
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorcode = code
            error.sqlite_errorname = name
            raise error
        return real(sql, *args, **kwargs)

    db.execute = execute  # type: ignore[method-assign]
    return lambda: setattr(db, "execute", real)


def test_an_fsync_failed_at_commit_leaves_the_outcome_unknown_and_refuses_all_later_writes(
    tmp_path: Path,
) -> None:
    told: list[CommitUnknownError] = []
    store = SqliteDataStore(tmp_path / "db", FakeClock(1000.0), on_commit_unknown=told.append)
    try:
        kept = store.create_entry(entry("/kept"))
        undo = _failing_commit(store, sqlite3.SQLITE_IOERR_FSYNC, "SQLITE_IOERR_FSYNC")
        with pytest.raises(CommitUnknownError) as unknown:
            store.create_entry(entry("/unknown"))
        undo()  # the disk answers again: the store still takes nothing
        said = str(unknown.value)
        assert str(tmp_path / "db") in said
        assert "disk I/O error" in said
        assert "unknown" in said
        assert told == [unknown.value]  # the server is told once
        for _ in range(2):
            with pytest.raises(StorageError, match="takes no more writes") as refused:
                store.create_entry(entry("/later"))
            assert not isinstance(refused.value, CommitUnknownError)  # its outcome is known
        assert told == [unknown.value]
        assert [e.id for e in store.list_entries()] == [kept.id]  # reads go on
    finally:
        store.close()


def test_a_full_disk_at_commit_is_a_refused_write_and_the_store_goes_on(tmp_path: Path) -> None:
    told: list[CommitUnknownError] = []
    store = SqliteDataStore(tmp_path / "db", FakeClock(1000.0), on_commit_unknown=told.append)
    try:
        undo = _failing_commit(store, sqlite3.SQLITE_FULL, "SQLITE_FULL")
        with pytest.raises(sqlite3.OperationalError):
            store.create_entry(entry("/full"))
        undo()
        assert told == []
        store.create_entry(entry("/space-back"))
        assert [e.spiffe_id for e in store.list_entries()] == ["spiffe://example.org/space-back"]
    finally:
        store.close()


def test_the_client_is_told_the_outcome_is_unknown_however_the_error_was_wrapped() -> None:
    unknown = CommitUnknownError("/var/lib/svid/datastore.sqlite3", "disk I/O error")
    ledger = LedgerError("cannot commit 1 credential record(s)")
    ledger.__cause__ = unknown
    issued = LedgerUnavailableError("I/O error")
    issued.__cause__ = ledger
    for exc in (unknown, ledger, issued):
        code, message = status_for(exc)
        assert code is grpc.StatusCode.UNAVAILABLE
        assert "outcome" in message
        assert "unknown" in message
        assert "nothing was issued" not in message
        assert "/var/lib" not in message
    # A write refused after it was never attempted: storage unavailable, as it is.
    refused = StorageError("the datastore takes no more writes")
    assert status_for(refused) == (grpc.StatusCode.UNAVAILABLE, STORAGE_MESSAGE)

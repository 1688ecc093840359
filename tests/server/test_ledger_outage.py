"""LedgerOutage and HealthReasons, the pieces behind the server's word on its ledger: one log
line when commits start failing and one when they work again, each turn told once, in order,
the health reasons of several causes standing together, and LedgerOutage's probe on a real
SQLite file finding each outage's end and recording each."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from psycopg import errors as pg_errors

from server.audit import AuditEvent, AuditLog, EventKind
from server.audit import outage as audit_outage
from server.audit.errors import LedgerError
from server.audit.outage import LedgerOutage, failure_reason, storage_fault
from server.datastore.errors import DatastoreMovedError, StorageError, UnreachableError
from server.datastore.postgres import PostgresDataStore
from server.datastore.postgres_dsn import scrub
from server.datastore.records import EventFilter
from server.datastore.sqlite import SqliteDataStore
from server.health_reasons import DATASTORE_VIEW, LEDGER, HealthReasons
from server.tasks.store import TaskStore
from svid._clock import FakeClock, SystemClock
from tests.log_lines import log_lines
from tests.server.test_legacy_import import task
from tests.waits import wait_for


def _full() -> LedgerError:
    error = LedgerError("cannot commit 1 audit event(s): database or disk is full")
    error.__cause__ = sqlite3.OperationalError("database or disk is full")
    return error


def test_an_outage_is_one_line_and_one_turn_each_way_however_many_commits_fail() -> None:
    clock = FakeClock()
    turns: list[str | None] = []
    outage = LedgerOutage(clock, turns.append)
    with log_lines("svid.server.audit") as lines:
        outage.worked()
        for _ in range(5):
            outage.failed(_full())
        clock.advance(12)
        outage.worked()
        outage.worked()
    assert turns == ["disk full", None]
    down, back = lines.records
    assert down.getMessage().startswith("the ledger cannot commit")
    assert down.__dict__["reason"] == "disk full"
    assert back.getMessage().startswith("the ledger commits again")
    assert (back.__dict__["seconds"], back.__dict__["failed_commits"]) == (12, 5)
    assert outage.reason is None


def test_health_turns_once_for_several_causes_and_names_each() -> None:
    turns: list[bool] = []
    health = HealthReasons(turns.append)
    health.set(LEDGER, "the audit ledger cannot commit (locked)")
    health.set(DATASTORE_VIEW, "this server's view of the datastore is stale")
    health.clear(LEDGER)
    assert health.reasons() == ["this server's view of the datastore is stale"]
    assert not health.healthy()
    health.clear(DATASTORE_VIEW)
    health.clear(DATASTORE_VIEW)
    assert turns == [False, True]
    assert health.healthy()


def _raised(error: StorageError, cause: BaseException) -> StorageError:
    error.__cause__ = cause
    return error


def test_a_task_row_write_is_an_outage_only_when_the_storage_failed_it() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    refused = sqlite3.IntegrityError("UNIQUE constraint failed: tasks.task_id")
    assert storage_fault(_raised(StorageError("cannot record the task: x"), full))
    assert storage_fault(UnreachableError("the database did not answer within 5 s"))
    assert not storage_fault(_raised(StorageError("cannot record the task: x"), refused))
    # PostgreSQL's, by SQLSTATE: a refusal of what was written, or contention, is none.
    for pg_refused in (
        pg_errors.UniqueViolation("duplicate key value violates unique constraint"),
        pg_errors.CharacterNotInRepertoire("invalid byte sequence for encoding"),
        pg_errors.SerializationFailure("could not serialize access"),
    ):
        assert not storage_fault(_raised(StorageError("cannot record the task"), pg_refused))
    full = pg_errors.DiskFull("n'a pas pu étendre le fichier")  # a server not in English
    assert storage_fault(_raised(StorageError("cannot record the task"), full))
    assert failure_reason(_raised(StorageError("cannot record the task"), full)) == "disk full"


def _refusing(store: SqliteDataStore, on: bool) -> None:
    """The real connection refuses writes, as a read-only file does (query_only)."""
    held: Any = store
    with held._lock:
        held._db.execute(f"PRAGMA query_only={int(on)}")


class _CutAfterTheProbe(AuditLog):
    """An audit log whose storage refuses writes again just after the probe's first
    ledger_outage event commits, before the probe hears back: another writer's commit fails
    in that gap, and then the storage recovers with no caller left to find it out."""

    def __init__(self, store: SqliteDataStore, clock: SystemClock, outage: LedgerOutage) -> None:
        super().__init__(store, clock, outage)
        self.cut = threading.Event()

    def append(self, kind: str, **fields_: Any) -> AuditEvent:
        event = super().append(kind, **fields_)
        if kind == EventKind.LEDGER_OUTAGE and not self.cut.is_set():
            _refusing(self._sqlite, True)
            with pytest.raises(LedgerError):
                super().append("policy_reload", decision="allow")
            self.cut.set()
        return event

    @property
    def _sqlite(self) -> SqliteDataStore:
        store = self.store
        assert isinstance(store, SqliteDataStore)
        return store


def test_an_outage_begun_as_the_probe_records_the_last_is_probed_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails without the probe telling the two outages apart: the second, begun between the
    first's event committing and the probe hearing so, was taken for the first, recorded, so
    no probe ran again and /healthz said 503 for good, nothing on the chain about it."""
    monkeypatch.setattr(audit_outage, "PROBE_INTERVAL", 0.02)
    clock = SystemClock()
    store = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
    reasons = HealthReasons()

    def turned(reason: str | None) -> None:  # as the server's health has it
        if reason is None:
            reasons.clear(LEDGER)
        else:
            reasons.set(LEDGER, reason)

    outage = LedgerOutage(clock, turned)
    log = _CutAfterTheProbe(store, clock, outage)
    try:
        _refusing(store, True)
        with pytest.raises(LedgerError):
            log.append("policy_reload", decision="allow")
        assert not reasons.healthy()
        _refusing(store, False)

        async def probed() -> None:
            stop = asyncio.Event()
            probe = asyncio.create_task(outage.run(stop, log, "spiffe://example.org/s"))
            try:
                await asyncio.to_thread(wait_for, log.cut.is_set, 5, "the probe's first event")
                assert not reasons.healthy()  # the second outage stands
                _refusing(store, False)
                await asyncio.to_thread(wait_for, reasons.healthy, 5, "the probe to commit")
            finally:
                stop.set()
                await probe

        asyncio.run(probed())
        events = list(store.audit_rows(EventFilter(kind=EventKind.LEDGER_OUTAGE)))
        first, second = events
        assert json.loads(second["extra"])["began_at"] >= int(first["ts"])
        assert log.verify().ok
    finally:
        store.close()


def test_a_postgres_database_refusing_writes_is_an_outage_named_read_only(
    postgres_dsn: str,
) -> None:
    """Fails while PostgreSQL's errors were read by their English words alone: a database that
    refuses writes (a standby the DSN reaches after a failover, default_transaction_read_only)
    was no outage at all on a task row, so an end or a revocation failed there with /healthz
    200, and a mere 'storage error' on the ledger's commits. A store that does not migrate
    makes every transaction READ ONLY: the real refusal."""
    clock = FakeClock()
    PostgresDataStore(postgres_dsn, clock).close()
    store = PostgresDataStore(postgres_dsn, clock, migrate=False)
    turns: list[str | None] = []
    outage = LedgerOutage(clock, turns.append)
    try:
        with pytest.raises(StorageError, match="read-only transaction"):
            TaskStore(store, outage).put_task(task(1, clock))
        assert turns == ["read-only"]
        outage.worked()
        with pytest.raises(LedgerError):
            AuditLog(store, clock, outage).append("policy_reload", decision="allow")
        assert turns == ["read-only", None, "read-only"]
    finally:
        store.close()


def test_a_datastore_file_moved_away_is_an_outage_named_so(tmp_path: Path) -> None:
    """Fails while the refusal was read by its words alone: none of a full disk's or a lock's
    in it, a task row's write refused so (a task end, a revocation) was no outage at all,
    /healthz 200 while every one failed, and the ledger's commits a mere 'storage error'."""
    clock = FakeClock()
    path = tmp_path / "datastore.sqlite3"
    store = SqliteDataStore(path, clock)
    turns: list[str | None] = []
    outage = LedgerOutage(clock, turns.append)
    path.rename(tmp_path / "moved")
    try:
        with pytest.raises(DatastoreMovedError):
            TaskStore(store, outage).put_task(task(1, clock))
        assert turns == ["datastore file gone"]
        outage.worked()
        with pytest.raises(LedgerError):
            AuditLog(store, clock, outage).append("policy_reload", decision="allow")
        assert turns == ["datastore file gone", None, "datastore file gone"]
    finally:
        store.close()


def test_the_outage_line_says_the_stores_words_not_the_drivers() -> None:
    """Fails while the line quoted the error a StorageError was raised from: the driver's own
    message, which the PostgreSQL store scrubs of its DSN's secrets (postgres_dsn.scrub) only
    in the StorageError's text it makes of it."""
    dsn = "postgresql://svidd:hunter2@db.internal:5432/svidd"
    driver = pg_errors.AdminShutdown(f"terminating connection ({dsn})")
    stored = _raised(StorageError(f"cannot end the task: {scrub(str(driver), dsn)}"), driver)
    with log_lines("svid.server.audit") as lines:
        LedgerOutage(FakeClock()).failed(stored)
    (down,) = lines.records
    assert "hunter2" not in down.__dict__["error"]
    assert down.__dict__["error"] == str(stored)

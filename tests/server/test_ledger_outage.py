"""LedgerOutage and HealthReasons, the pieces behind the server's word on its ledger: one log
line when commits start failing and one when they work again, each turn told once, in order,
and the health reasons of several causes standing together."""

from __future__ import annotations

import sqlite3

from server.audit.errors import LedgerError
from server.audit.outage import LedgerOutage, storage_fault
from server.datastore.errors import StorageError, UnreachableError
from server.health_reasons import DATASTORE_VIEW, LEDGER, HealthReasons
from svid._clock import FakeClock
from tests.log_lines import log_lines


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

"""The ledger adapter (server/tasks/ledger.py) on real SQLite files: a commit returns only once
its credentials and events are on disk, concurrent commits share a write, and a failed write
fails every caller it held with LedgerUnavailableError, then the next one works again."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.audit import AuditError, AuditLog, SqliteAuditStore
from server.audit.event import DRAFT_FIELDS
from server.issuance import Credential, LedgerUnavailableError
from server.tasks.ledger import StoreLedger, failure_reason
from server.tasks.store import TaskStore
from svid._clock import FakeClock

AGENT = "spiffe://example.org/svid/agent/join_token/abc"
WORKLOAD = "spiffe://example.org/w"
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"


def draft(jti: str, **changes: Any) -> tuple[Any, ...]:
    base = dict.fromkeys(DRAFT_FIELDS)
    base.update(kind="jwt_minted", agent_id=WORKLOAD, node_id=AGENT, decision="allow")
    base.update(credential_id=jti, policy_ids=(), ttl=300, extra={})
    base.update(changes)
    return tuple(base[name] for name in DRAFT_FIELDS)


def cred(jti: str) -> Credential:
    return Credential("jwt_id", jti, AGENT, WORKLOAD, "", 2_000_000_000)


class FaultyStore(TaskStore):
    """The real task store; `fail` makes `record` raise as a full disk does; `delay` slows it
    so that commits pile up behind a write."""

    fail: BaseException | None = None
    delay = 0.0

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[int] = []

    def record(self, creds: Any) -> None:
        rows = list(creds)
        if self.fail is not None:
            raise self.fail
        time.sleep(self.delay)
        self.writes.append(len(rows))
        super().record(rows)


class FaultyAuditStore(SqliteAuditStore):
    fail = False

    def append(self, rows: Any) -> None:
        if self.fail:
            raise AuditError("cannot append to audit database: disk I/O error")
        super().append(rows)


class Parts:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = FaultyStore(tmp / "tasks.db")
        self.audit_store = FaultyAuditStore(tmp / "audit.db")
        self.audit = AuditLog(self.audit_store, FakeClock(1_800_000_000))
        self.ledger = StoreLedger(self.store, self.audit)

    def on_disk(self) -> tuple[set[str], set[str]]:
        """jtis in tasks.db and in audit.db, read through fresh connections."""
        with sqlite3.connect(self.tmp / "tasks.db") as db:
            creds = {r[0] for r in db.execute("SELECT value FROM credentials")}
        with sqlite3.connect(self.tmp / "audit.db") as db:
            events = {r[0] for r in db.execute("SELECT credential_id FROM audit_events")}
        return creds, events


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    p = Parts(tmp_path)
    yield p
    p.ledger.close()
    p.store.close()
    p.audit_store.close()


async def commit_each(parts: Parts, jtis: Sequence[str]) -> list[BaseException | None]:
    async def one(jti: str) -> BaseException | None:
        try:
            await parts.ledger.commit([cred(jti)], [draft(jti)])
        except Exception as exc:
            return exc
        return None

    return await asyncio.gather(*(one(j) for j in jtis))


def test_a_commit_returns_once_its_rows_are_on_disk(parts: Parts) -> None:
    async def go() -> None:
        for i in range(5):
            await parts.ledger.commit([cred(f"j{i}")], [draft(f"j{i}")])
            # Read by another connection the moment commit returns: already there.
            creds, events = parts.on_disk()
            assert f"j{i}" in creds
            assert f"j{i}" in events

    asyncio.run(go())
    assert parts.audit.verify().ok


def test_concurrent_commits_share_a_write_and_each_waits_for_its_own(parts: Parts) -> None:
    parts.store.delay = 0.02  # a slow fsync: callers arrive while the writer writes
    jtis = [f"j{i}" for i in range(60)]
    assert asyncio.run(commit_each(parts, jtis)) == [None] * 60
    assert sum(parts.store.writes) == 60
    assert len(parts.store.writes) < 10, parts.store.writes
    assert parts.on_disk() == (set(jtis), set(jtis))


def test_a_commit_that_cannot_be_written_fails_every_caller_in_it(parts: Parts) -> None:
    parts.store.fail = sqlite3.OperationalError("database or disk is full")
    outcomes = asyncio.run(commit_each(parts, ["a", "b", "c"]))
    assert all(isinstance(o, LedgerUnavailableError) for o in outcomes)
    assert {o.reason for o in outcomes if isinstance(o, LedgerUnavailableError)} == {"disk full"}
    # The events went to the other file at the same time: they may name credentials that were
    # refused to their callers (never sent), which is the harmless direction.
    assert parts.on_disk()[0] == set()
    # Storage back: the very next commit works, no restart or reset needed.
    parts.store.fail = None
    assert asyncio.run(commit_each(parts, ["d"])) == [None]
    assert "d" in parts.on_disk()[0]
    assert "d" in parts.on_disk()[1]
    assert parts.audit.verify().ok


def test_an_audit_log_that_cannot_be_written_fails_the_commit(parts: Parts) -> None:
    parts.audit_store.fail = True
    (outcome,) = asyncio.run(commit_each(parts, ["a"]))
    assert isinstance(outcome, LedgerUnavailableError)
    assert outcome.reason == "I/O error"
    assert parts.on_disk()[1] == set()  # no event; the credential row names an unsent one
    parts.audit_store.fail = False
    assert asyncio.run(commit_each(parts, ["b"])) == [None]
    assert parts.on_disk()[1] == {"b"}
    assert parts.audit.verify().ok


def test_a_caller_whose_event_is_refused_fails_alone(parts: Parts) -> None:
    parts.store.delay = 0.02

    async def go() -> list[Any]:
        bad = parts.ledger.commit([cred("bad")], [draft("bad", reason=JWT)])
        good = commit_each(parts, ["g1", "g2"])
        return list(await asyncio.gather(bad, good, return_exceptions=True))

    bad, good = asyncio.run(go())
    assert isinstance(bad, AuditError)
    assert good == [None, None]
    assert parts.on_disk()[1] == {"g1", "g2"}


def test_a_blocking_commit_and_flush_wait_for_the_write(parts: Parts) -> None:
    parts.store.delay = 0.05
    thread = threading.Thread(target=parts.ledger.commit_blocking, args=([cred("t")], [draft("t")]))
    thread.start()
    time.sleep(0.01)
    parts.ledger.flush()
    assert parts.on_disk() == ({"t"}, {"t"})
    thread.join(5)


def test_a_closed_ledger_refuses(parts: Parts) -> None:
    parts.ledger.close()
    with pytest.raises(LedgerUnavailableError, match="shutting down"):
        asyncio.run(parts.ledger.commit([cred("x")], [draft("x")]))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (sqlite3.OperationalError("database or disk is full"), "disk full"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "read-only"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only"),
        (sqlite3.OperationalError("disk I/O error"), "I/O error"),
        (AuditError("cannot append to audit database: database or disk is full"), "disk full"),
        (AuditError("cannot append to audit database: locked"), "audit log"),
        (sqlite3.OperationalError("database is locked"), "storage error"),
    ],
)
def test_failure_reasons_name_the_fault_without_a_path(error: BaseException, reason: str) -> None:
    assert failure_reason(error) == reason


def test_a_failure_hidden_behind_a_failed_rollback_is_still_named() -> None:
    def write() -> None:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.Error:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active")  # noqa: B904

    with pytest.raises(sqlite3.Error) as caught:
        write()
    assert failure_reason(caught.value) == "disk full"

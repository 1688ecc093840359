"""The Ledger port's adapter (server/issuance/datastore_ledger.py) over the real datastore
ledger on a real SQLite file: a commit returns once its credentials and events are on disk,
concurrent commits each get theirs, and a refused write becomes LedgerUnavailableError with a
path-free reason; the next commit after the storage recovers works."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.audit import AuditLog
from server.audit.errors import LedgerError
from server.audit.event import DRAFT_FIELDS
from server.audit.outage import failure_reason
from server.datastore.sqlite import SqliteDataStore
from server.issuance import Credential, LedgerUnavailableError
from server.issuance.datastore_ledger import DatastoreLedger
from server.ledger import Ledger
from svid._clock import FakeClock
from tests.server.fixtures import admit_agents

AGENT = "spiffe://example.org/svid/agent/join_token/abc"
WORKLOAD = "spiffe://example.org/w"


def draft(jti: str) -> tuple[Any, ...]:
    base = dict.fromkeys(DRAFT_FIELDS)
    base.update(kind="jwt_minted", agent_id=WORKLOAD, node_id=AGENT, decision="allow")
    base.update(credential_id=jti, policy_ids=(), ttl=300, extra={})
    return tuple(base[name] for name in DRAFT_FIELDS)


def cred(jti: str) -> Credential:
    return Credential("jwt_id", jti, AGENT, WORKLOAD, "", 2_000_000_000)


class Parts:
    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "datastore.sqlite3"
        clock = FakeClock(1_800_000_000)
        self.datastore = SqliteDataStore(self.path, clock)
        admit_agents(self.datastore, AGENT)
        self.audit = AuditLog(self.datastore, clock)
        self.ledger = DatastoreLedger(Ledger(self.audit))

    def read_only(self, on: bool) -> None:
        datastore: Any = self.datastore
        with datastore._lock:
            datastore._db.execute(f"PRAGMA query_only={int(on)}")

    def on_disk(self) -> tuple[set[str], set[str]]:
        """jtis among the credential rows and the audit events, read by a fresh connection."""
        with sqlite3.connect(self.path) as db:
            creds = {r[0] for r in db.execute("SELECT value FROM credentials")}
            events = {r[0] for r in db.execute("SELECT credential_id FROM audit_events")}
        return creds, events


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    p = Parts(tmp_path)
    yield p
    p.datastore.close()


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
            creds, events = parts.on_disk()
            assert f"j{i}" in creds
            assert f"j{i}" in events

    asyncio.run(go())
    assert parts.audit.verify().ok


def test_concurrent_commits_each_return_with_their_rows_committed(parts: Parts) -> None:
    jtis = [f"j{i}" for i in range(60)]
    assert asyncio.run(commit_each(parts, jtis)) == [None] * 60
    assert parts.on_disk() == (set(jtis), set(jtis))


def test_a_refused_write_fails_every_caller_and_the_next_one_after_recovery_works(
    parts: Parts,
) -> None:
    parts.read_only(True)
    outcomes = asyncio.run(commit_each(parts, ["a", "b", "c"]))
    assert all(isinstance(o, LedgerUnavailableError) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, LedgerUnavailableError)} == {"read-only"}
    assert all(isinstance(o.__cause__, LedgerError) for o in outcomes if o is not None)
    assert parts.on_disk() == (set(), set())
    parts.read_only(False)
    assert asyncio.run(commit_each(parts, ["d"])) == [None]
    assert parts.on_disk() == ({"d"}, {"d"})
    assert parts.audit.verify().ok


def test_an_empty_commit_writes_nothing(parts: Parts) -> None:
    asyncio.run(parts.ledger.commit((), ()))
    assert parts.on_disk() == (set(), set())


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (sqlite3.OperationalError("database or disk is full"), "disk full"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "read-only"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only"),
        (sqlite3.OperationalError("disk I/O error"), "I/O error"),
        (
            LedgerError("cannot commit 3 credential record(s): database or disk is full"),
            "disk full",
        ),
        (sqlite3.OperationalError("database is locked"), "locked"),
        (sqlite3.OperationalError("no such table: audit_events"), "storage error"),
    ],
)
def test_failure_reasons_name_the_fault_without_a_path(error: BaseException, reason: str) -> None:
    assert failure_reason(error) == reason


def test_a_failure_behind_a_wrapper_or_a_failed_rollback_is_still_named() -> None:
    def write() -> None:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.Error:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active")  # noqa: B904

    with pytest.raises(sqlite3.Error) as caught:
        write()
    assert failure_reason(caught.value) == "disk full"
    wrapped = LedgerError("cannot commit")
    wrapped.__cause__ = caught.value
    assert failure_reason(wrapped) == "disk full"


def test_record_later_is_done_once_on_disk_and_the_caller_goes_on_meanwhile(
    parts: Parts,
) -> None:
    """A signing thread hands its records over and signs on; the loop awaits the future."""
    gate = threading.Event()
    real = parts.datastore.write_ledger

    def held(credentials: Any, audit_rows: Any, *args: Any, **kw: Any) -> None:
        gate.wait(10)
        real(credentials, audit_rows, *args, **kw)

    parts.datastore.write_ledger = held  # type: ignore[method-assign]
    futures = [parts.ledger.record_later([cred(f"j{i}")], [draft(f"j{i}")]) for i in range(5)]
    # Returned at once, with the commit still held: nothing is done, nothing is on disk.
    assert not any(f.done() for f in futures)
    assert parts.on_disk() == (set(), set())
    gate.set()

    async def wait_all() -> None:
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    asyncio.run(wait_all())
    jtis = {f"j{i}" for i in range(5)}
    assert parts.on_disk() == (jtis, jtis)
    assert parts.audit.verify().ok


def test_record_later_fails_with_the_ports_error_and_keeps_nothing(parts: Parts) -> None:
    parts.read_only(True)
    future = parts.ledger.record_later([cred("a")], [draft("a")])
    with pytest.raises(LedgerUnavailableError) as refused:
        future.result(10)
    assert refused.value.reason == "read-only"
    assert isinstance(refused.value.__cause__, LedgerError)
    assert parts.on_disk() == (set(), set())
    parts.read_only(False)
    parts.ledger.record_later([cred("b")], [draft("b")]).result(10)
    assert parts.on_disk() == ({"b"}, {"b"})
    assert parts.audit.verify().ok


def test_a_waiter_that_gives_up_does_not_stop_the_commit(parts: Parts) -> None:
    """The RPC may be cancelled while it awaits: the records are still written (a credential
    on record and never sent is allowed; the reverse never is)."""
    future = parts.ledger.record_later([cred("a")], [draft("a")])

    async def give_up() -> None:
        waiting = asyncio.ensure_future(asyncio.wrap_future(future))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(give_up())
    future.result(10)
    assert parts.on_disk() == ({"a"}, {"a"})

"""What the server's memory does when a write committed but the read after it failed (a
database connection cut in between, seen on PostgreSQL): the write is answered as done, and
what it changed is in memory, which Sync streams and agents are served from."""

from __future__ import annotations

import asyncio
from pathlib import Path

from server.datastore.errors import StorageError
from server.datastore.records import REVOKED_JWT_ID, Entry, Revocation
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.events import ChangeNotifier
from server.state import ServerState
from svid._clock import FakeClock

TD = "spiffe://example.org"
AGENT = f"{TD}/svid/agent/join_token/after1"


def _state(tmp_path: Path) -> tuple[ServerState, FaultInjectingDataStore]:
    clock = FakeClock(1000)
    faulty = FaultInjectingDataStore(SqliteDataStore(tmp_path / "ds.sqlite3", clock))
    state = ServerState(faulty, clock, ChangeNotifier())  # type: ignore[arg-type]
    state.load()
    return state, faulty


def test_a_write_that_committed_is_answered_as_done_when_the_read_after_it_fails(
    tmp_path: Path,
) -> None:
    # The revision is read after the write's own transaction: a database connection cut in
    # between (seen on PostgreSQL) used to answer a committed write UNAVAILABLE, and a client
    # that retried then found it there (ALREADY_EXISTS).
    state, faulty = _state(tmp_path)
    before = state.notifier.version
    faulty.inject(StorageError("cannot read the revision: connection lost"), "revision")
    made = asyncio.run(state.create_entry(Entry("", f"{TD}/a1", AGENT, ())))
    assert faulty.calls[-2:] == ["create_entry", "revision"]  # the read after it failed
    assert made.spiffe_id == f"{TD}/a1"
    assert made.id in state.entries.by_id
    assert faulty.inner.get_entry(made.id) == made
    assert state.notifier.version > before  # Sync streams still hear of it


def test_committed_revocations_reach_memory_when_the_read_after_them_fails(
    tmp_path: Path,
) -> None:
    # Memory is what agents are pushed: a revocation the datastore kept must be there even
    # when reading the list back fails (the caller, a task that ended, may not try again).
    state, faulty = _state(tmp_path)
    first = Revocation(REVOKED_JWT_ID, "j1", f"{TD}/w", 2000, "task ended", 1000)
    asyncio.run(state.add_revocations((first,)))
    second = Revocation(REVOKED_JWT_ID, "j2", f"{TD}/w", 2000, "task ended", 1000)
    faulty.inject(StorageError("cannot list revocations: connection lost"), "list_revocations")
    asyncio.run(state.add_revocations((second, first)))
    assert faulty.calls[-3:] == ["add_revocations", "list_revocations", "revision"]
    assert {r.value for r in state.revocations} == {"j1", "j2"}
    assert state.is_jwt_revoked("j2")
    assert {r.value for r in faulty.inner.list_revocations()} == {"j1", "j2"}

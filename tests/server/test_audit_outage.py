"""The audit chain through a datastore outage that fails the ledger write AND the head read (a
PostgreSQL server going away does both): the callers of the lost batch are refused, and the
chain goes on after the last committed event, never after the voided ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.audit.errors import LedgerError
from server.audit.log import AuditLog
from server.datastore import DataStore
from server.datastore.errors import StorageError
from server.datastore.testing import FaultInjectingDataStore
from svid._clock import FakeClock
from tests.server.held_ledger import GroupCommit
from tests.server.test_datastore_contract import BACKENDS

NOW = 1_700_000_000
AGENT = "spiffe://example.org/svid/agent/join_token/t1"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture(params=sorted(BACKENDS))
def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[FaultInjectingDataStore]:
    inner: DataStore = BACKENDS[request.param](request, tmp_path, clock)()
    yield FaultInjectingDataStore(inner)
    inner.close()


def test_an_outage_of_write_and_head_read_leaves_no_hole_in_the_chain(
    store: FaultInjectingDataStore, clock: FakeClock
) -> None:
    log = AuditLog(store, clock)
    log.append("task_begin", agent_id=AGENT, task_id="t1")
    store.inject(StorageError("the database is gone"), method="write_ledger")
    store.inject(StorageError("the database is gone"), method="audit_head")
    with pytest.raises((StorageError, LedgerError)):
        log.append("task_begin", agent_id=AGENT, task_id="lost")
    assert store.pending() == 0
    after = log.append("task_begin", agent_id=AGENT, task_id="t2")
    assert after.seq == 2  # the voided event's seq is taken again, its hash never chained on
    result = log.verify()
    assert result.ok, str(result)
    assert [r["task_id"] for r in store.audit_rows()] == ["t1", "t2"]


def test_every_caller_of_a_lost_batch_is_refused_even_when_the_head_cannot_be_read(
    store: FaultInjectingDataStore, clock: FakeClock
) -> None:
    """Callers whose events wait for another thread's commit learn its failure; none may
    return as if its events were recorded."""
    commit = GroupCommit(store, clock, fails=True)  # the lead's write, held, then fails
    log = commit.log
    store.inject(StorageError("the database is gone"), method="audit_head")

    def append(name: str) -> Callable[[], object]:
        return lambda: log.append("task_begin", agent_id=AGENT, task_id=name)

    commit.lead("first", append("first"))
    commit.queue({f"w{n}": append(f"w{n}") for n in range(3)})
    commit.wait_queued(3)  # the waiters have queued behind the commit in flight
    outcomes = commit.release()
    committed = {r["task_id"] for r in store.audit_rows()}
    for name, outcome in outcomes.items():
        # Each caller either got an error or really has its event in the store.
        assert outcome is not None or name in committed, (name, outcomes, committed)
    assert log.verify().ok

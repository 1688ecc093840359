"""The audit chain through a datastore outage that fails the ledger write AND the head read (a
PostgreSQL server going away does both): the callers of the lost batch are refused, and the
chain goes on after the last committed event, never after the voided ones."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.audit.errors import LedgerError
from server.audit.log import AuditLog
from server.datastore import DataStore
from server.datastore.errors import StorageError
from server.datastore.testing import FaultInjectingDataStore
from svid._clock import FakeClock
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
    log = AuditLog(store, clock)
    entered = threading.Event()
    release = threading.Event()
    real_write = store.inner.write_ledger

    def slow_failing_write(*args: object, **kwargs: object) -> None:
        entered.set()
        release.wait(10)
        raise StorageError("the database is gone")

    store.inner.write_ledger = slow_failing_write  # type: ignore[method-assign]
    store.inject(StorageError("the database is gone"), method="audit_head")
    outcomes: dict[str, BaseException | None] = {}

    def append(name: str) -> None:
        try:
            log.append("task_begin", agent_id=AGENT, task_id=name)
            outcomes[name] = None
        except Exception as e:
            outcomes[name] = e

    first = threading.Thread(target=append, args=("first",))
    first.start()
    assert entered.wait(10)
    waiters = [threading.Thread(target=append, args=(f"w{n}",)) for n in range(3)]
    for t in waiters:
        t.start()
    # The waiters have queued behind the commit in flight (they block on its lock).
    for _ in range(100):
        if len(log._tickets) == 3:  # the queue the waiters joined
            break
        threading.Event().wait(0.01)
    store.inner.write_ledger = real_write  # type: ignore[method-assign]
    release.set()
    for t in (first, *waiters):
        t.join(10)
    committed = {r["task_id"] for r in store.audit_rows()}
    for name, outcome in outcomes.items():
        # Each caller either got an error or really has its event in the store.
        assert outcome is not None or name in committed, (name, outcomes, committed)
    assert log.verify().ok

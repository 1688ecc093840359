"""The housekeeping lease as one server holds it (server/housekeeping.py), on a real datastore."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.datastore.errors import StorageError
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.housekeeping import HOUSEKEEPING_LEASE, Lease
from svid._clock import Clock, FakeClock
from tests.clocks import SleptClock, SteppedClock

TTL = 30


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> FaultInjectingDataStore:
    return FaultInjectingDataStore(SqliteDataStore(tmp_path / "datastore.sqlite3", clock))


def lease(store: FaultInjectingDataStore, clock: Clock, holder: str) -> Lease:
    return Lease(store, HOUSEKEEPING_LEASE, holder, clock, TTL)


def test_one_holder_renews_the_other_takes_over_when_it_lapses(
    store: FaultInjectingDataStore, clock: FakeClock
) -> None:
    a, b = lease(store, clock, "a"), lease(store, clock, "b")
    assert not a.held
    assert a.renew()  # taken
    assert a.held
    assert not a.renew()  # kept, not newly taken
    assert a.next_renewal() == clock.monotonic() + TTL / 3
    assert not b.renew()
    assert not b.held
    clock.advance(TTL * 2 / 3)  # a stopped renewing: it no longer acts on the lease...
    assert not a.held
    assert not b.renew()  # ...before its row lapses and b may take it
    clock.advance(TTL / 3)
    assert b.renew()
    assert b.held
    assert not a.renew()
    assert not a.held


def test_a_holder_whose_renewals_fail_stops_acting_in_time(
    store: FaultInjectingDataStore, clock: FakeClock
) -> None:
    a = lease(store, clock, "a")
    a.renew()
    for _ in range(2):
        clock.advance(TTL / 3)
        store.inject(StorageError("database unreachable"), method="acquire_lease")
        with pytest.raises(StorageError):
            a.renew()
    assert not a.held  # 2/3 of the lease's life after the last renewal that worked


def test_release_hands_over_at_once(store: FaultInjectingDataStore, clock: FakeClock) -> None:
    a, b = lease(store, clock, "a"), lease(store, clock, "b")
    b.release()  # never held: nothing to hand over, a's lease is not touched
    a.renew()
    b.release()
    assert not b.renew()
    a.release()
    assert not a.held
    assert b.renew()
    with pytest.raises(ValueError, match="at least 3"):
        Lease(store, HOUSEKEEPING_LEASE, "c", clock, 2)


def test_a_holder_whose_clock_steps_back_stops_acting_before_another_takes_over(
    store: FaultInjectingDataStore, clock: FakeClock
) -> None:
    # A's clock is stepped back an hour just after it renewed (a bad time source, a restored
    # VM). Its row lapses for B on time; counted on A's wall clock, A went on trusting its
    # renewal, and waiting for its next one, for the hour: two housekeepers, two checkpoint
    # signers, for as long as the step.
    stepped = SteppedClock(clock)
    a = lease(store, stepped, "a")
    b = lease(store, clock, "b")
    assert a.renew()
    stepped.offset = -3600.0
    clock.advance(TTL * 2 / 3)
    assert not a.held  # as without the step: two thirds of the life after its last renewal
    clock.advance(TTL / 3)
    assert b.renew()
    assert b.held
    assert not a.held


def test_a_holder_whose_host_slept_does_not_act_on_waking_after_another_took_over(
    store: FaultInjectingDataStore, clock: FakeClock
) -> None:
    # A's host slept a minute just after A renewed; meanwhile its row lapsed and B took the
    # lease. On the monotonic clock alone, which a suspend does not move, A woke trusting its
    # renewal for most of two thirds of the lease's life: two housekeepers until it renewed.
    slept = SleptClock(clock)
    a = lease(store, slept, "a")
    b = lease(store, clock, "b")
    assert a.renew()
    slept.sleep(2 * TTL)
    assert b.renew()
    assert not a.held
    assert a.due_in() <= 0  # and it asks the datastore at once

"""DatabaseTime (server/datastore/postgres_time.py): a store's clock turned into the database's,
measured once and again only when the store's clock steps."""

from __future__ import annotations

from server.datastore.postgres_time import DatabaseTime
from svid._clock import FakeClock

NOW = 1_700_000_000


class _SteppedClock(FakeClock):
    """A FakeClock whose wall time can step alone (NTP correcting a clock that was off)."""

    def step_wall(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def _database(at: list[float]) -> tuple[list[int], object]:
    reads: list[int] = []

    def read() -> float:
        reads.append(1)
        return at[0]

    return reads, read


def test_the_offset_is_measured_once_while_the_clock_moves_evenly() -> None:
    clock = FakeClock(NOW + 40)  # 40 s ahead of the database
    database = [float(NOW)]
    reads, read = _database(database)
    time = DatabaseTime(clock, read)  # type: ignore[arg-type]
    assert time.of(NOW + 40) == NOW
    clock.advance(100)  # a clock moved by hand keeps meaning what it says
    assert time.of(int(clock.now())) == NOW + 100
    assert len(reads) == 1


def test_a_step_of_the_wall_clock_is_measured_again() -> None:
    clock = _SteppedClock(NOW + 40)
    database = [float(NOW)]
    reads, read = _database(database)
    time = DatabaseTime(clock, read)  # type: ignore[arg-type]
    assert time.of(NOW + 40) == NOW
    clock.step_wall(-40)  # NTP sets it right; the database's clock did not move
    assert time.of(int(clock.now())) == NOW
    assert len(reads) == 2


def _slow_database(clock: FakeClock, trips: list[tuple[float, float]]) -> tuple[list[int], object]:
    """A database with no offset from `clock` whose answers take `trips` (before, after its
    clock is read: the way there and the way back), one a read, the last one ever after."""
    reads: list[int] = []

    def read() -> float:
        before, after = trips[min(len(reads), len(trips) - 1)]
        reads.append(1)
        clock.advance(before)
        database_now = clock.now() - 40  # the store's clock runs 40 s ahead
        clock.advance(after)
        return database_now

    return reads, read


def test_a_slow_answer_is_not_counted_as_offset() -> None:
    # The database was slow to answer (or the server stalled) for 12 s after it read its clock:
    # counted as offset, this store's lease times ran 12 s behind the other servers', past the
    # 10 s a holder has before another takes over. Read again, the shorter trip is kept.
    clock = FakeClock(NOW + 40)
    reads, read = _slow_database(clock, [(0.0, 12.0), (0.0, 0.0)])
    time = DatabaseTime(clock, read)  # type: ignore[arg-type]
    assert time.of(NOW + 40) == NOW
    assert len(reads) == 2


def test_a_database_always_slow_is_read_at_the_trip_midpoint() -> None:
    clock = FakeClock(NOW + 40)
    reads, read = _slow_database(clock, [(6.0, 6.0)])
    time = DatabaseTime(clock, read)  # type: ignore[arg-type]
    assert time.of(NOW + 40) == NOW
    assert len(reads) == 3  # tried a few times, then the shortest trip taken
    clock.advance(100)
    assert time.of(int(clock.now())) == int(clock.now()) - 40
    assert len(reads) == 3

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

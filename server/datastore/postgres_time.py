"""Lease and claim times on one clock for every server sharing a PostgreSQL database.

A lease row (`leases`, a removal's claim) is written with an expiry by the writer's clock and
taken over by another server once that expiry has passed by *its* clock. Servers' clocks
disagree (MAX_CLOCK_SKEW allows a minute): a server whose clock ran more than a third of the
lease's life ahead of the holder's found the row lapsed while the holder still trusted its
last renewal (Lease.held), and both rotated the CA or pruned the audit chain at once.

So each store counts lease times on the database's clock: the caller's `now` (by the store's
own clock) less the offset of that clock from the database's, measured with one query (at its
round trip's midpoint, taken again when the trip was slow) as the store opens, and again when
the store's clock is seen to step (its wall time and its monotonic time no longer moving
together: NTP stepping a clock that was off at boot), not at every call: an injected clock
moved by hand (tests) keeps meaning what it says.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from svid._clock import Clock

# How far the wall clock may move apart from the monotonic one before the offset is measured
# again: a step, not the slewing of NTP (at most 0.5 ms a second).
STEP = 1.0
# The database read its clock somewhere within the query's round trip, so a measure is off by
# up to half of it: one whose trip took longer than this (a database slow to answer, this
# process stalled) is taken again, up to TRIES times, and the shortest trip's kept. A trip of
# a third of the lease's life (10 s by default) had another server take over a live lease.
GOOD_TRIP = 0.5
TRIES = 3


class DatabaseTime:
    """Turns a time by `clock` into the database's clock, as `read_database_now` (one query,
    Unix seconds) tells it."""

    def __init__(self, clock: Clock, read_database_now: Callable[[], float]) -> None:
        self._clock = clock
        self._read = read_database_now
        self._lock = threading.Lock()
        self._offset: int | None = None
        self._wall = self._mono = 0.0

    def measure(self, read_database_now: Callable[[], float]) -> None:
        """Take the offset from the database's clock as `read_database_now` reads it (a
        connection of the store's opening). A store measures as it opens: stores opened
        together (servers, and tests' stores sharing one hand-moved clock) agree from then on,
        whatever their clocks do evenly."""
        with self._lock:
            self._measure(read_database_now)

    def of(self, now: int) -> int:
        """`now` (by the store's clock) on the database's clock, in whole seconds."""
        return now - self._current_offset()

    def _current_offset(self) -> int:
        with self._lock:
            wall, mono = self._clock.now(), self._clock.monotonic()
            stepped = abs((wall - self._wall) - (mono - self._mono)) > STEP
            if self._offset is None or stepped:
                self._measure(self._read)
            assert self._offset is not None
            return self._offset

    def _measure(self, read: Callable[[], float]) -> None:
        best: tuple[float, float, float, float] | None = None  # trip, offset, wall, mono
        for _ in range(TRIES):
            mono = self._clock.monotonic()
            database_now = read()
            after, mono_after = self._clock.now(), self._clock.monotonic()
            trip = max(0.0, mono_after - mono)
            # Read at the trip's midpoint as best known: neither way's time counted as offset
            # (the trip on the monotonic clock: a step of the wall one meanwhile is not a trip).
            sample = (trip, after - trip / 2 - database_now, after, mono_after)
            if best is None or trip < best[0]:
                best = sample
            if trip <= GOOD_TRIP:
                break
        assert best is not None
        _, offset, self._wall, self._mono = best
        self._offset = round(offset)

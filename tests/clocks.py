"""Clocks with a fault, over a FakeClock, for tests of what the fault does: a wall clock that
an NTP step (or a skew) moves while monotonic time runs on, and a host that sleeps, whose
monotonic clock (CLOCK_MONOTONIC) stands still while wall time runs on."""

from __future__ import annotations

from svid import FakeClock


class SteppedClock:
    """`base`'s wall time plus an `offset` a step changes at once; monotonic time is base's,
    which no step moves."""

    def __init__(self, base: FakeClock, offset: float = 0.0) -> None:
        self.base, self.offset = base, offset

    def now(self) -> float:
        return self.base.now() + self.offset

    def monotonic(self) -> float:
        return self.base.monotonic()


class SleptClock:
    """`base`'s wall time; its monotonic clock stood still for as long as `sleep` slept."""

    def __init__(self, base: FakeClock) -> None:
        self.base, self.slept = base, 0.0

    def now(self) -> float:
        return self.base.now()

    def monotonic(self) -> float:
        return self.base.monotonic() - self.slept

    def sleep(self, seconds: float) -> None:
        self.base.advance(seconds)
        self.slept += seconds

from __future__ import annotations

import threading
import time

import pytest

from svid import FakeClock, SystemClock, _clock
from svid._clock import ElapsedClock, to_datetime


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(1000.0)
    assert clock.now() == 1000.0
    assert clock.monotonic() == 0.0
    clock.advance(2.5)
    assert clock.now() == 1002.5
    assert clock.monotonic() == 2.5
    clock.set(2000.0)
    assert clock.now() == 2000.0
    assert clock.monotonic() == 1000.0


def test_fake_clock_never_goes_back() -> None:
    clock = FakeClock(1000.0)
    with pytest.raises(ValueError, match="back in time"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="back in time"):
        clock.set(999.0)
    assert clock.now() == 1000.0


def test_fake_clock_is_thread_safe() -> None:
    clock = FakeClock(0.0)

    def tick() -> None:
        for _ in range(1000):
            clock.advance(1)

    threads = [threading.Thread(target=tick) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock.now() == 4000.0


class _Hands:
    """A clock whose wall and monotonic times a test sets apart."""

    def __init__(self) -> None:
        self.wall, self.mono = 1000.0, 50.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


def test_elapsed_clock_counts_a_sleep_but_not_a_step_back() -> None:
    hands = _Hands()
    clock = ElapsedClock(hands)
    assert clock.monotonic() == 50.0
    hands.wall, hands.mono = 1010.0, 60.0  # both on by ten seconds: ten
    assert clock.monotonic() == 60.0
    hands.wall = 4610.0  # the host slept an hour: CLOCK_MONOTONIC stood still
    assert clock.monotonic() == 3660.0
    hands.wall, hands.mono = 1010.0, 65.0  # an NTP step back of an hour, five seconds on
    assert clock.monotonic() == 3665.0
    assert clock.now() == 1010.0
    hands.mono = 60.0  # a monotonic clock never goes back; neither does this one
    assert clock.monotonic() == 3665.0


def test_system_clock_is_plausible() -> None:
    clock = SystemClock()
    assert clock.now() > 1_600_000_000
    a = clock.monotonic()
    assert clock.monotonic() >= a


def test_to_datetime_is_utc() -> None:
    d = to_datetime(0)
    assert d.year == 1970
    assert d.utcoffset() is not None
    assert d.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="no CLOCK_BOOTTIME here")
def test_the_system_clocks_monotonic_time_counts_a_suspend_of_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CLOCK_MONOTONIC (time.monotonic) stands still while the host is suspended; every
    # deadline on it (a cached token's quarter life, a fetch's next time) came that long late.
    # CLOCK_BOOTTIME counts the suspend. Faked: the hour it slept shows on BOOTTIME alone.
    slept = [0.0]
    real = time.clock_gettime

    def clock_gettime(which: int) -> float:
        return real(which) + (slept[0] if which == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    clock = SystemClock()
    before = clock.monotonic()
    slept[0] = 3600.0
    assert clock.monotonic() - before >= 3600.0


def test_the_system_clock_falls_back_to_time_monotonic_without_boottime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_clock, "_BOOTTIME", None)
    monkeypatch.setattr(time, "clock_gettime", lambda which: -1.0)  # not read
    clock = SystemClock()
    a = time.monotonic()
    b = clock.monotonic()
    assert a <= b <= time.monotonic()

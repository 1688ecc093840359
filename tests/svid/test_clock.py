from __future__ import annotations

import threading

import pytest

from svid import FakeClock, SystemClock
from svid._clock import to_datetime


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

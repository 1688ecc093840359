"""Time as a dependency: nothing in svidd reads the wall clock except SystemClock."""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; for intervals and deadlines."""
        ...


def _boottime() -> int | None:
    """CLOCK_BOOTTIME where the host has it (Linux): a monotonic clock that also counts the
    time the host was suspended. None elsewhere, or on a kernel that refuses it."""
    which: int | None = getattr(time, "CLOCK_BOOTTIME", None)
    if which is None:
        return None
    try:
        time.clock_gettime(which)
    except OSError:
        return None
    return which


_BOOTTIME = _boottime()


class SystemClock:
    """The real clock. Its monotonic time is CLOCK_BOOTTIME where the host has it:
    time.monotonic() (CLOCK_MONOTONIC) stands still while the host is suspended, and every
    interval counted on it (a cached token's life, a fetch's next time, a lease) came that long
    late on waking. Elsewhere time.monotonic(); ElapsedClock also counts a suspend by the wall
    clock's jump (and a paused VM, which BOOTTIME does not see either).

    asyncio's timers stay on the loop's clock (CLOCK_MONOTONIC): readings of this clock are
    only ever compared with each other, never with loop.time() or time.monotonic()."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        if _BOOTTIME is None:
            return time.monotonic()
        return time.clock_gettime(_BOOTTIME)


class ElapsedCount:
    """Time elapsed since a first reading of the two clocks, counting a sleep of the host.
    CLOCK_MONOTONIC stands still while the host is suspended (or its VM paused), and a deadline
    on it alone came that long late: a token kept past its exp. The wall clock moves on
    meanwhile, but NTP steps it back too. Each reading moves the count on by the larger of the
    two clocks' moves since the last one: never back, never less than the monotonic clock, and
    a suspend (the wall clock's jump forward) counted. A wall-clock step forward is counted as
    time passed: a deadline then comes early, never late.

    Fed readings taken by its owner, who keeps it from two threads at once. A reading without
    the wall clock counts the monotonic one alone. A reading whose monotonic time is behind the
    last one's was taken before it (by another thread): it counts no time. `slack`: how far the
    wall clock may move ahead of the monotonic one between two readings and count nothing, for
    readings whose two clocks were read a moment apart (by callers, preempted between them):
    counted, each such gap ran the count ahead of time, reading after reading."""

    def __init__(
        self, mono: float, wall: float | None, start: float = 0.0, *, slack: float = 0.0
    ) -> None:
        self._mono, self._wall, self._value = mono, wall, start
        self._slack = slack

    def read(self, mono: float, wall: float | None) -> float:
        if mono < self._mono:
            return self._value
        moved = mono - self._mono
        if wall is not None and self._wall is not None:
            ahead = wall - self._wall - moved
            if ahead > self._slack:
                moved += ahead
        self._value += moved
        self._mono, self._wall = mono, wall
        return self._value


class ElapsedClock:
    """`clock`, whose monotonic time also counts a sleep of the host (see ElapsedCount).
    Thread-safe."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        wall, mono = clock.now(), clock.monotonic()
        self._count = ElapsedCount(mono, wall, start=mono)

    def now(self) -> float:
        return self._clock.now()

    def monotonic(self) -> float:
        with self._lock:
            wall, mono = self._clock.now(), self._clock.monotonic()
            return self._count.read(mono, wall)


class FakeClock:
    """A clock tests move by hand. Thread-safe; time only moves when told."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._now = float(start)
        self._mono = 0.0

    def now(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a FakeClock cannot go back in time")
        with self._lock:
            self._now += seconds
            self._mono += seconds

    def set(self, when: float) -> None:
        """Jump wall time to `when` (monotonic time moves by the same amount, never back)."""
        with self._lock:
            delta = when - self._now
            if delta < 0:
                raise ValueError("a FakeClock cannot go back in time")
            self._now = when
            self._mono += delta


def to_datetime(ts: float) -> datetime:
    """Unix seconds to an aware UTC datetime, as cryptography's X.509 API wants."""
    return datetime.fromtimestamp(ts, tz=UTC)


def format_utc(ts: float, *, millis: bool = False) -> str:
    """Unix seconds as RFC 3339 UTC (``2026-12-05T07:31:11Z``): the one way svidd shows a time.

    CLIs and log lines all print times through here, so an operator can compare them by eye
    and paste them back into any flag that takes an ISO 8601 time.
    """
    when = datetime.fromtimestamp(ts, tz=UTC)
    text = when.isoformat(timespec="milliseconds" if millis else "seconds")
    return text.removesuffix("+00:00") + "Z"


def parse_utc(text: str) -> float:
    """What a CLI flag accepts as a time: Unix seconds, or ISO 8601 (UTC unless it says).

    Raises ValueError naming the text when it is neither.
    """
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):  # float() reads nan and inf: no time at all
            raise ValueError(f"{text!r} is not a time")
        return seconds
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither Unix seconds nor an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def unix_times_as_numbers(data: object) -> object:
    """``data`` (a protobuf message as a JSON dict) with every ``*_at`` time as a number.

    Protobuf's JSON mapping writes int64 fields as strings; svidd's JSON output promises times
    as Unix seconds, and a script should not have to know which fields happen to be int64.
    """
    if isinstance(data, dict):
        return {
            k: int(v)
            if k.endswith("_at") and isinstance(v, str) and v.lstrip("-").isdigit()
            else unix_times_as_numbers(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [unix_times_as_numbers(v) for v in data]
    return data

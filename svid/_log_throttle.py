"""At most one log line per interval for a condition that can repeat as fast as clients (or a
loop retrying) make it: the first at once, then one per interval saying how many it stands for.
A metric counts each; the log only has to say it is happening."""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Mapping

from svid._clock import Clock


class LogThrottle:
    """Not thread-safe: used from one event loop, or under its owner's lock."""

    def __init__(self, interval: float, clock: Clock) -> None:
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._unlogged = 0

    def due(self) -> int:
        """Count one more occurrence; how many the line to write now stands for (this one and
        those not written since the last), or 0: no line now."""
        self._unlogged += 1
        now = self._clock.monotonic()
        if self._last is not None and now - self._last < self._interval:
            return 0
        self._last = now
        count, self._unlogged = self._unlogged, 0
        return count


class KeyedThrottles:
    """A LogThrottle for each key (a message, a kind of failure), usable from any thread."""

    def __init__(self, interval: float, clock: Clock) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._throttles: dict[Hashable, LogThrottle] = {}

    def due(self, key: Hashable) -> int:
        """LogThrottle.due for `key`'s own throttle."""
        with self._lock:
            throttle = self._throttles.get(key)
            if throttle is None:
                throttle = self._throttles[key] = LogThrottle(self._interval, self._clock)
            return throttle.due()


class ThrottledLines:
    """A LogThrottle for each of a few fixed info messages of one logger, usable from any
    thread: the first of each is written at once, then one per interval with `times`, how many
    it stands for."""

    def __init__(self, logger: logging.Logger, interval: float, clock: Clock) -> None:
        self._logger = logger
        self._throttles = KeyedThrottles(interval, clock)  # keyed by messages written in code

    def info(self, msg: str, extra: Mapping[str, object]) -> None:
        times = self._throttles.due(msg)
        if times:
            self._logger.info(msg, extra={**extra, "times": times})

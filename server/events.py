"""In-process change notification: a version number bumped on every committed write.

Subscribers see a version number, not a queue of events: a slow subscriber that misses several
changes wakes once. Sync streams do not wait here: server.propagation hands each change only
to the streams it concerns.
"""

from __future__ import annotations

import asyncio
import threading


class ChangeNotifier:
    """Fan-out of "something changed" to asyncio subscribers. `notify` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def notify(self) -> None:
        with self._lock:
            self._version += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                event.set()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    async def wait_beyond(self, seen: int) -> int:
        """Return the current version once it is greater than `seen`."""
        event = asyncio.Event()
        key = (asyncio.get_running_loop(), event)
        with self._lock:
            if self._version > seen:
                return self._version
            self._waiters.add(key)
        try:
            await event.wait()
        finally:
            with self._lock:
                self._waiters.discard(key)
        return self.version

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._waiters)

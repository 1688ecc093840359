"""The rotator: nothing but a ticker that calls `CaManager.rotate()` when the schedule says so."""

from __future__ import annotations

import asyncio
import logging

from server.ca.manager import CaManager
from svid._backoff import Retry
from svid._clock import Clock
from svid._waits import set_within

_log = logging.getLogger("svid.server.ca")

MAX_SLEEP_SECONDS = 10.0
MIN_SLEEP_SECONDS = 0.05
# After a failed tick, wait this long before the next, doubling per failure up to max_sleep:
# its event stays due, so without it an outage was retried (key made, traceback logged) every
# MIN_SLEEP_SECONDS.
FIRST_RETRY_SECONDS = 1.0


class Rotator:
    def __init__(
        self, manager: CaManager, clock: Clock, max_sleep: float = MAX_SLEEP_SECONDS
    ) -> None:
        self._manager = manager
        self._clock = clock
        self._max_sleep = max_sleep
        self._retry = Retry(FIRST_RETRY_SECONDS, max_sleep)

    def tick(self) -> bool:
        """Rotate if due; True when the bundle changed."""
        if self._clock.now() < self._manager.next_rotation_check():
            return False
        return self._manager.rotate()

    def delay(self) -> float:
        """Seconds until the next tick; capped so a jumped wall clock is noticed soon."""
        wait = self._manager.next_rotation_check() - self._clock.now()
        if self._retry.wait is not None:
            wait = max(wait, self._retry.wait)
        return max(MIN_SLEEP_SECONDS, min(self._max_sleep, wait))

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop` is set. Key generation and fsyncs run in a worker thread."""
        while not stop.is_set():
            await set_within(stop, self.delay())
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                # Keep serving with the current keys; the next tick retries, backing off.
                self._retry.failed()
                _log.exception("CA rotation failed; retrying in %g s", self.delay())
            else:
                self._retry.succeeded()

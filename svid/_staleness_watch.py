"""Ends the requests an adapter is serving once its verifiers would refuse them for stale
revocation data (``max_revocation_staleness``): a verifier that fails closed refuses new
requests, and a stream admitted before the feed was lost must not outlive that. A task revoked
while the agent was unreachable would otherwise keep its open SSE stream for as long as its
client holds it.

One asyncio task per loop, running only while requests are open: it sleeps until the data
could be too old (the time the verifiers say is left), looks again, and ends every open
request when none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from svid._open_requests import OpenRequests

# Past the moment the verifiers refuse: the feed's own clock and the loop's may differ by this.
SLACK = 0.01


class StalenessWatch:
    def __init__(
        self, fresh_for: Sequence[Callable[[], float | None]], open_requests: OpenRequests
    ) -> None:
        """``fresh_for``: each verifier's ``revocations_fresh_for``; the least of them counts."""
        self._fresh_for = tuple(fresh_for)
        self._open = open_requests
        self._task: asyncio.Task[None] | None = None

    def left(self) -> float | None:
        """Seconds until the first verifier refuses for staleness; None if none ever does."""
        times = [t for t in (f() for f in self._fresh_for) if t is not None]
        return min(times) if times else None

    def admitted(self) -> None:
        """A request was opened on the running loop: watch, if no one is watching there."""
        task = self._task
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._watch(), name="svid-staleness-watch")

    def closed(self) -> None:
        """A request ended: with nothing open, stop watching (a task left sleeping would
        outlive the server's loop)."""
        task = self._task
        if task is not None and self._open.empty():
            self._task = None
            task.cancel()

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed already
                task.get_loop().call_soon_threadsafe(task.cancel)

    async def _watch(self) -> None:
        while not self._open.empty():
            left = self.left()
            if left is None:
                return
            if left <= 0:
                for request in self._open.take_all():
                    request.end()
                return
            await asyncio.sleep(left + SLACK)

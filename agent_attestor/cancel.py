"""Ending background tasks on stop, even one that swallowed its cancellation.

On Python 3.11, `asyncio.wait_for` can swallow the CancelledError of a task cancelled just as
the awaited thing completes (CPython gh-86296, fixed in 3.12), and a loop around it then runs
on. Stop awaiting such a task forever was the agent hanging on SIGTERM. So each task still
running is cancelled again, and one that outlives every try is left, logged, rather than
awaited for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


async def cancel_all(
    tasks: Sequence[asyncio.Task[object]], *, tries: int = 5, patience: float = 1.0
) -> list[asyncio.Task[object]]:
    """Cancel `tasks` and wait for them to end, cancelling again those that go on; the ones
    still running after `tries` rounds of `patience` seconds each (logged, and returned)."""
    running = [t for t in tasks if not t.done()]
    for _ in range(tries):
        if not running:
            break
        for task in running:
            task.cancel()
        await asyncio.wait(running, timeout=patience)
        running = [t for t in running if not t.done()]
    for task in tasks:
        # Retrieved, as awaiting them did: else asyncio warns "exception was never retrieved".
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())
    if running:
        log.error(
            "background tasks did not stop when cancelled",
            extra={"tasks": [t.get_name() for t in running]},
        )
    return running

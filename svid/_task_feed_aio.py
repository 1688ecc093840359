"""The agent's revocation stream read for an asyncio task client, in a task of its own on the
client's event loop. As svid._task_feed: an accelerator that never blocks or fails a task call.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from svid._task_feed import BACKOFF, unimplemented
from svid._workload_calls import RevocationsUpdate
from svid._workload_client_aio import AsyncWatch
from svid._workload_errors import WorkloadApiError

log = logging.getLogger("svid.tasks")

OpenWatch = Callable[[], AsyncWatch[RevocationsUpdate]]
Deliver = Callable[[RevocationsUpdate], Awaitable[None]]


class AsyncRevocationFeed:
    """Reads the stream ``open_watch`` opens, awaiting ``deliver`` with each update,
    reconnecting with backoff until close()."""

    def __init__(self, open_watch: OpenWatch, deliver: Deliver, address: str) -> None:
        self._open = open_watch
        self._deliver = deliver
        self._address = address
        self._rand = random.Random()  # noqa: S311 - jitter, not a secret
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._attempt = 0  # failed connections since the last update

    def start(self) -> None:
        """Start reading on the running loop (once; never after close())."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="svid-task-revocations"
            )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Stop reading, and wait until the reading task is done (its stream cancelled)."""
        self._closed = True
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        # wait(), not await task: the task's CancelledError is its own, not the caller's; a
        # cancellation of the caller still stops this wait.
        await asyncio.wait([task])

    async def _run(self) -> None:
        while True:
            try:
                await self._read()
            except WorkloadApiError as exc:
                if unimplemented(exc, self._address):
                    return
                log.debug("task revocation stream lost, reconnecting: %s", exc)
            except Exception as exc:  # a background task: log, go on
                log.warning("task revocation stream failed, reconnecting: %r", exc)
            await asyncio.sleep(BACKOFF.delay(self._attempt, self._rand))
            self._attempt += 1

    async def _read(self) -> None:
        """Read one stream until it ends, delivering every update."""
        async with self._open() as watch:
            async for update in watch:
                self._attempt = 0  # an update came: the connection is good again
                await self._deliver(update)

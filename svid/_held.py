"""Work its caller, cancelled, still waits for to its end: the daemons' one way of it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

_T = TypeVar("_T")


async def to_its_end(
    work: Awaitable[_T], *, orphaned: Callable[[BaseException], None] | None = None
) -> _T:
    """`work` as a task of its own, awaited to its end. A thread cannot be stopped, and a
    coroutine cut short can leave a turn, a lock or a half-written file behind: a caller
    cancelled meanwhile (however often: a stop cancels again each second) waits for the work
    first, then raises the cancellation. The work's failure then has nobody to go to: it is
    retrieved, and handed to `orphaned` when given."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        failure = None if task.cancelled() else task.exception()
        if failure is not None and orphaned is not None:
            orphaned(failure)
        raise asyncio.CancelledError
    return task.result()

"""Work its caller, cancelled, still waits for to its end: the daemons' one way of it."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

_T = TypeVar("_T")
_P = ParamSpec("_P")


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


async def run_held(
    executor: Executor | None, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """`fn` in `executor` (None: the loop's default one), awaited to its end (to_its_end).

    A thread cannot be stopped: a caller cancelled (its deadline passed, its client gone, a
    stop) that returned at once would leave whatever turn, lock or share it holds while its
    thread runs on (another save writing the same temp files beside it), and a caller
    cancelling at will would hold every thread of the pool under a bound of a few.
    """
    loop = asyncio.get_running_loop()
    # The caller's context goes along, as asyncio.to_thread takes it.
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await to_its_end(loop.run_in_executor(executor, call))

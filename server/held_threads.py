"""Thread work whose caller, cancelled, still waits for the thread to end."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

from svid._held import to_its_end

_P = ParamSpec("_P")
_R = TypeVar("_R")


async def run_held(
    executor: Executor | None, fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs
) -> _R:
    """`fn` in `executor` (None: the loop's default one), awaited to its end.

    A thread cannot be stopped: a caller cancelled (its deadline passed, its client gone) that
    returned at once would leave whatever turn or share it holds while its thread runs on, and
    a caller cancelling at will would hold every thread of the pool under a bound of a few.
    So the cancellation is kept until the thread is done, then raised.
    """
    loop = asyncio.get_running_loop()
    # The caller's context goes along, as asyncio.to_thread takes it.
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await to_its_end(loop.run_in_executor(executor, call))

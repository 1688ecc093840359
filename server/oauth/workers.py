"""Threads for the token endpoint's blocking work (verify, decide, sign, the ledger commit).

`await workers.run(fn, arg)` runs `fn(arg)` on one of up to N threads and resumes the caller on
its event loop with the result. Why not `loop.run_in_executor`: that wraps a concurrent
Future in an asyncio Future and copies state across with three callbacks, and a thread pool's
submit takes two locks; per exchange that was about a tenth of the event loop's time
(profiled). Here a job is one queue put, its answer one `call_soon_threadsafe`.

Threads start as jobs find none idle, up to N: a grant waits for the ledger's commit holding
no GIL, and every request in flight should be able to join the commit under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

A = TypeVar("A")
T = TypeVar("T")
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[Any], Any], Any]


class Workers:
    def __init__(self, threads: int, name: str) -> None:
        self._max = threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def run(self, fn: Callable[[A], T], arg: A) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._submit((loop, future, fn, arg))
        return await future

    def close(self) -> None:
        """Let every thread finish its job and end; jobs queued after this never run."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._jobs.put(None)

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: closed")
            self._jobs.put(job)
            if self._idle.acquire(blocking=False) or len(self._threads) >= self._max:
                return
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, arg = job
            try:
                result, error = fn(arg), None
            except BaseException as exc:  # the caller gets it, as from an executor
                result, error = None, exc
            # Idle before the answer goes out: the caller's next job finds this thread free.
            self._idle.release()
            # RuntimeError: the loop closed meanwhile, nobody waits for the answer.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, error)
            del job, future, result, error


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
